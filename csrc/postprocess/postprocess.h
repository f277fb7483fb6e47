// Decoder post-processing of the runtime (docs/architecture.md §3 step 8), matching the reference
// (`ReferencePipeline._postprocess` and helpers in export/reference.py): top-k over query x class, boxes to
// pixels, class-aware NMS, mask upsampling (PyTorch's bilinear, align_corners=False) and threshold, the
// semantic map, and the pose branch's keypoints to pixels.
#pragma once

#include <cstdint>
#include <vector>

#include "preprocess/image_ops.h"

namespace vle {

// A read-only strided 1-D / 2-D / 3-D view (strides in elements, any sign), so numpy slices such as
// `logits[:, k]` or `logits.T` are read in place.
template <typename T>
struct View1 {
  const T* data;
  int64_t size;
  int64_t stride;

  T operator()(int64_t i) const { return data[i * stride]; }
};

template <typename T>
struct View2 {
  const T* data;
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
  int64_t col_stride;

  T operator()(int64_t i, int64_t j) const { return data[i * row_stride + j * col_stride]; }
};

template <typename T>
struct View3 {
  const T* data;
  int64_t dim0;
  int64_t dim1;
  int64_t dim2;
  int64_t stride0;
  int64_t stride1;
  int64_t stride2;

  T operator()(int64_t i, int64_t j, int64_t k) const {
    return data[i * stride0 + j * stride1 + k * stride2];
  }
};

// The kept (query, class) pairs of a top-k, best first.
struct TopK {
  std::vector<float> scores;
  std::vector<int64_t> queries;
  std::vector<int64_t> classes;
};

// Sigmoid of `logits` [Q, K], then the first `k` pairs by (-score, class, query) — the reference's `[DET]`
// order, ties to the lower class then the lower query — of those with score >= threshold (taking the top
// k and then thresholding, as the reference does, keeps the same pairs). With `query_major` the tie order
// is (-score, query, class) instead: the pose branch's stable argsort over the flattened [Q, K].
TopK topk_query_class(const View2<float>& logits, int64_t k, double threshold, bool query_major);

// (cx, cy, w, h) normalised boxes [n, 4] to (x0, y0, x1, y1) * (scale_w, scale_h), computed in double as
// the reference does with Python floats. `out` is [n, 4].
void boxes_cxcywh_to_xyxy(const View2<float>& boxes, double scale_w, double scale_h, double* out);

// Class-aware greedy NMS, as the reference's `_nms`: visit boxes by descending score (stable, so equal
// scores keep their input order), drop one whose IoU with a kept box of the same label is > iou_threshold.
// Returns the kept indices in visiting order. Instantiated for float and double boxes and scores.
template <typename Box, typename Score>
std::vector<int64_t> nms_class_aware(const View2<Box>& boxes, const View1<Score>& scores,
                                     const View1<int64_t>& labels, double iou_threshold);

// Mask logits [n, h4, w4] (the decoder's quarter resolution of the PADDED image) to bool masks
// [n, out.height, out.width] in the original frame: bilinear x4 (PyTorch, align_corners=False), crop to
// the resized (unpadded) region, bilinear to the original size, then sigmoid > threshold (0 < threshold
// < 1; compared in logit space, which differs from the reference's float32 sigmoid only within rounding
// of the threshold).
void masks_to_image(const View3<float>& mask_logits, Size2 resized, Size2 out, double threshold,
                    bool* masks);

// The reference's `_semantic_map`: for every class c, sum over queries q of sigmoid(class_logits[q, c]) x
// sigmoid(upsampled mask q); the label is the argmax over classes (the first on ties), or -1 where the
// best sum is below threshold. class_logits [Q, C], mask_logits [Q, h4, w4]; `labels` is
// [out.height, out.width].
void semantic_map(const View2<float>& class_logits, const View3<float>& mask_logits, Size2 resized,
                  Size2 out, double threshold, int32_t* labels);

// The pose branch: boxes [n, 4] (cx, cy, w, h) and keypoints [n, 3 * Kmax] (Kmax (x, y) pairs, then Kmax
// visibilities) normalised to the PADDED decoder image, to original pixels: the scale per axis is
// padded * image / resized. Writes boxes_xyxy [n, 4] (double, as the reference's Python floats) and
// keypoints [n, num_keypoints, 3] (x, y, visibility; float32 of the double products, as the reference).
void keypoints_to_pixels(const View2<float>& boxes, const View2<float>& keypoints, int64_t num_keypoints,
                         Size2 padded, Size2 resized, int64_t image_width, int64_t image_height,
                         double* boxes_xyxy, float* keypoints_out);

}  // namespace vle
