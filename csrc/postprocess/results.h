// The decoders' raw outputs turned into a request's results: detections (boxes and masks in the original
// frame), the semantic map, poses and generated images. The arithmetic and the order are those of the SDK's
// Python post-processing: a [GRD] group keeps the query whose float64 sigmoid is highest; the [DET] groups
// share one top-k over (query, group) followed by class-aware NMS when the manifest sets `nms_iou`; the
// [SEG] groups build one semantic map; the pose branch keeps a query-major top-k.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "artifact/manifest.h"
#include "visionllm_edge/result.h"

namespace vle {

// One object group (det grd seg) as the object decoder saw it: `index` is its slot across the decoder calls,
// chunk = index / max_groups (which call), class column = index % max_groups.
struct ObjectGroup {
  std::string kind;
  std::string label;
  int64_t index = 0;
};

// The object decoder's outputs, one chunk per decoder call (float32):
//   logits [chunks, Q, max_groups], boxes [chunks, Q, 4] (cx, cy, w, h normalised to the resized image),
//   masks [chunks, Q, h, w] (mask logits at a quarter of the padded image, one per query in query order).
// `resized_hw` is the resized (unpadded) decoder image, (height, width); `width` x `height` the original
// image. Appends the [GRD] detections (in group order), then the [DET] ones (best first, after NMS), to
// result.detections, and sets result.segmentation when there are [SEG] groups.
void object_results(const Array& logits, const Array& boxes, const Array& masks,
                    const std::vector<ObjectGroup>& groups, int64_t max_groups,
                    std::pair<int64_t, int64_t> resized_hw, int64_t width, int64_t height,
                    const Postprocess& settings, Result& result);

// The keypoint decoder's outputs (float32): logits [1, G, slots] (one column per object slot; the first
// object_labels.size() are real), boxes [1, G, 4] (cx, cy, w, h normalised to the padded image) and
// keypoints [1, G, 3 * Kmax] (Kmax (x, y) pairs, then Kmax visibilities). `padded_hw` and `resized_hw` are
// the decoder image's padded and resized sizes, (height, width). Appends the kept poses to result.poses.
void pose_results(const Array& logits, const Array& boxes, const Array& keypoints,
                  const std::vector<std::string>& object_labels, const std::vector<std::string>& keypoint_names,
                  std::pair<int64_t, int64_t> padded_hw, std::pair<int64_t, int64_t> resized_hw, int64_t width,
                  int64_t height, const Postprocess& settings, Result& result);

// A VAE decoder's images [n, 3, H, W] (float32 in [0, 1]) to n [H, W, 3] uint8 arrays: clip to [0, 1],
// * 255, + 0.5 and truncate, each step in float32 (NaN gives 0).
std::vector<Array> images_to_uint8(const Array& images);

}  // namespace vle
