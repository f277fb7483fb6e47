#include "postprocess/postprocess.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>

namespace vle {

namespace {

// torch.sigmoid on float32: 1 / (1 + exp(-x)) in float.
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

std::string pair_text(int64_t a, int64_t b) {
  return "(" + std::to_string(a) + ", " + std::to_string(b) + ")";
}

// --- PyTorch's bilinear interpolation (upsample_bilinear2d, align_corners=False, CPU float) ---------------
//
// For each output index: two source indices and two float weights, computed as ATen's
// compute_source_index_and_lambda does in float (scale = in / out, source = scale * (i + 0.5) - 0.5
// clamped at 0). ATen's kernel then evaluates (src[y0][x0] * wx0 + src[y0][x1] * wx1) * wy0 +
// (src[y1][x0] * wx0 + src[y1][x1] * wx1) * wy1, which is exactly a horizontal pass followed by a vertical
// pass, so the separable evaluation below rounds identically.
struct LinearTaps {
  std::vector<int64_t> i0;
  std::vector<int64_t> i1;
  std::vector<float> w0;
  std::vector<float> w1;
};

// Taps of the first `count` outputs of an in_size -> out_size resize.
LinearTaps torch_linear_taps(int64_t in_size, int64_t out_size, int64_t count) {
  LinearTaps t;
  t.i0.resize(count);
  t.i1.resize(count);
  t.w0.resize(count);
  t.w1.resize(count);
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  for (int64_t i = 0; i < count; ++i) {
    if (in_size == out_size) {  // ATen copies in this case
      t.i0[i] = t.i1[i] = i;
      t.w0[i] = 1.0f;
      t.w1[i] = 0.0f;
      continue;
    }
    float real = scale * (static_cast<float>(i) + 0.5f) - 0.5f;
    if (real < 0.0f) real = 0.0f;
    const int64_t index = std::min(static_cast<int64_t>(std::floor(real)), in_size - 1);
    const float lambda = std::min(std::max(real - static_cast<float>(index), 0.0f), 1.0f);
    t.i0[i] = index;
    t.i1[i] = index + (index < in_size - 1 ? 1 : 0);
    t.w1[i] = lambda;
    t.w0[i] = 1.0f - lambda;
  }
  return t;
}

// The reference's `_mask_to_image` chain: x4 upsample, crop to the resized image, resize to the original
// size. The taps are shared; `run` produces one band of output rows of one mask, computing only the
// intermediate rows that band reads, so bands can go to different threads with identical arithmetic and a
// full-resolution float mask is never stored.
class MaskUpsampler {
 public:
  // Per-thread buffers, reused across masks.
  struct Scratch {
    std::vector<float> rows4;    // x-upsampled rows of the quarter-resolution logits
    std::vector<float> cropped;  // one row of the cropped x4 image
    std::vector<float> wide;     // x-resized rows of the cropped image
    std::vector<float> row;      // one output row
  };

  MaskUpsampler(const View3<float>& logits, Size2 resized, Size2 out)
      : logits_(logits),
        resized_(resized),
        out_(out),
        up_y_(torch_linear_taps(logits.dim1, 4 * logits.dim1, resized.height)),
        up_x_(torch_linear_taps(logits.dim2, 4 * logits.dim2, resized.width)),
        down_y_(torch_linear_taps(resized.height, out.height, out.height)),
        down_x_(torch_linear_taps(resized.width, out.width, out.width)) {}

  // Calls row_fn(y, row) for output rows y in [y_begin, y_end) of mask m; row holds out.width logits.
  template <typename RowFn>
  void run(int64_t m, int64_t y_begin, int64_t y_end, Scratch& s, RowFn&& row_fn) const {
    const int64_t rw = resized_.width, ow = out_.width;
    // Taps are monotonic, so a band of rows reads a contiguous range at each stage.
    const int64_t c_lo = down_y_.i0[y_begin], c_hi = down_y_.i1[y_end - 1];
    const int64_t r_lo = up_y_.i0[c_lo], r_hi = up_y_.i1[c_hi];
    s.rows4.resize((r_hi - r_lo + 1) * rw);
    s.cropped.resize(rw);
    s.wide.resize((c_hi - c_lo + 1) * ow);
    s.row.resize(ow);
    for (int64_t r = r_lo; r <= r_hi; ++r) {
      const float* src = logits_.data + m * logits_.stride0 + r * logits_.stride1;
      const int64_t cs = logits_.stride2;
      float* dst = &s.rows4[(r - r_lo) * rw];
      for (int64_t x = 0; x < rw; ++x) {
        dst[x] = src[up_x_.i0[x] * cs] * up_x_.w0[x] + src[up_x_.i1[x] * cs] * up_x_.w1[x];
      }
    }
    for (int64_t c = c_lo; c <= c_hi; ++c) {
      blend_rows(&s.rows4[(up_y_.i0[c] - r_lo) * rw], up_y_.w0[c], &s.rows4[(up_y_.i1[c] - r_lo) * rw],
                 up_y_.w1[c], rw, s.cropped.data());
      const float* src = s.cropped.data();
      float* dst = &s.wide[(c - c_lo) * ow];
      for (int64_t x = 0; x < ow; ++x) {
        dst[x] = src[down_x_.i0[x]] * down_x_.w0[x] + src[down_x_.i1[x]] * down_x_.w1[x];
      }
    }
    for (int64_t y = y_begin; y < y_end; ++y) {
      blend_rows(&s.wide[(down_y_.i0[y] - c_lo) * ow], down_y_.w0[y], &s.wide[(down_y_.i1[y] - c_lo) * ow],
                 down_y_.w1[y], ow, s.row.data());
      row_fn(y, s.row.data());
    }
  }

 private:
  static void blend_rows(const float* a, float wa, const float* b, float wb, int64_t n, float* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = a[i] * wa + b[i] * wb;
  }

  View3<float> logits_;
  Size2 resized_, out_;
  LinearTaps up_y_, up_x_, down_y_, down_x_;
};

// Output rows per thread at least; below this, thread start-up costs more than it saves.
// Starting a thread costs tens of microseconds (and more when the CPUs are busy with engine threads): split
// only frames big enough for the split to pay, e.g. a 1080-row mask.
constexpr int64_t kMinRowsPerThread = 256;

void check_mask_geometry(const char* fn, const View3<float>& mask_logits, Size2 resized, Size2 out) {
  if (mask_logits.dim1 <= 0 || mask_logits.dim2 <= 0) {
    throw std::invalid_argument(std::string(fn) + ": mask_logits has zero spatial size " +
                                pair_text(mask_logits.dim1, mask_logits.dim2));
  }
  if (resized.height <= 0 || resized.width <= 0 || resized.height > 4 * mask_logits.dim1 ||
      resized.width > 4 * mask_logits.dim2) {
    throw std::invalid_argument(std::string(fn) + ": resized_hw " + pair_text(resized.height, resized.width) +
                                " must be positive and within the x4 mask size " +
                                pair_text(4 * mask_logits.dim1, 4 * mask_logits.dim2));
  }
  if (out.height <= 0 || out.width <= 0) {
    throw std::invalid_argument(std::string(fn) + ": out_hw must be positive, got " +
                                pair_text(out.height, out.width));
  }
}

double box_iou(const double* a, const double* b) {
  // The reference's _box_iou, operation for operation.
  const double x0 = std::max(a[0], b[0]), y0 = std::max(a[1], b[1]);
  const double x1 = std::min(a[2], b[2]), y1 = std::min(a[3], b[3]);
  const double inter = std::max(0.0, x1 - x0) * std::max(0.0, y1 - y0);
  const double uni = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
  return uni > 0 ? inter / uni : 0.0;
}

}  // namespace

TopK topk_query_class(const View2<float>& logits, int64_t k, double threshold, bool query_major) {
  if (k < 0) throw std::invalid_argument("topk_query_class: k must be >= 0, got " + std::to_string(k));
  struct Candidate {
    float score;
    int64_t query;
    int64_t cls;
  };
  std::vector<Candidate> kept;
  for (int64_t q = 0; q < logits.rows; ++q) {
    for (int64_t c = 0; c < logits.cols; ++c) {
      const float s = sigmoid(logits(q, c));
      if (static_cast<double>(s) >= threshold) kept.push_back({s, q, c});  // NaN never passes
    }
  }
  auto better = [query_major](const Candidate& a, const Candidate& b) {
    if (a.score != b.score) return a.score > b.score;
    if (query_major) return a.query != b.query ? a.query < b.query : a.cls < b.cls;
    return a.cls != b.cls ? a.cls < b.cls : a.query < b.query;
  };
  const int64_t n = std::min<int64_t>(k, static_cast<int64_t>(kept.size()));
  std::partial_sort(kept.begin(), kept.begin() + n, kept.end(), better);
  TopK out;
  out.scores.reserve(n);
  out.queries.reserve(n);
  out.classes.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    out.scores.push_back(kept[i].score);
    out.queries.push_back(kept[i].query);
    out.classes.push_back(kept[i].cls);
  }
  return out;
}

void boxes_cxcywh_to_xyxy(const View2<float>& boxes, double scale_w, double scale_h, double* out) {
  if (boxes.cols != 4) {
    throw std::invalid_argument("boxes: expected [n, 4] (cx, cy, w, h), got " +
                                pair_text(boxes.rows, boxes.cols));
  }
  for (int64_t i = 0; i < boxes.rows; ++i) {
    const double cx = boxes(i, 0), cy = boxes(i, 1), w = boxes(i, 2), h = boxes(i, 3);
    out[i * 4 + 0] = (cx - w / 2) * scale_w;
    out[i * 4 + 1] = (cy - h / 2) * scale_h;
    out[i * 4 + 2] = (cx + w / 2) * scale_w;
    out[i * 4 + 3] = (cy + h / 2) * scale_h;
  }
}

template <typename Box, typename Score>
std::vector<int64_t> nms_class_aware(const View2<Box>& boxes, const View1<Score>& scores,
                                     const View1<int64_t>& labels, double iou_threshold) {
  const int64_t n = boxes.rows;
  if (boxes.cols != 4 || scores.size != n || labels.size != n) {
    throw std::invalid_argument("nms_class_aware: expected boxes [n, 4], scores [n] and labels [n], got boxes " +
                                pair_text(boxes.rows, boxes.cols) + ", scores (" + std::to_string(scores.size) +
                                ",) and labels (" + std::to_string(labels.size) + ",)");
  }
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  // Python's sorted(key=-score) is stable.
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return static_cast<double>(scores(a)) > static_cast<double>(scores(b));
  });
  std::vector<double> xyxy(n * 4);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < 4; ++j) xyxy[i * 4 + j] = static_cast<double>(boxes(i, j));
  }
  std::vector<int64_t> keep;
  for (int64_t i : order) {
    bool suppressed = false;
    for (int64_t kept : keep) {
      if (labels(kept) == labels(i) && box_iou(&xyxy[kept * 4], &xyxy[i * 4]) > iou_threshold) {
        suppressed = true;
        break;
      }
    }
    if (!suppressed) keep.push_back(i);
  }
  return keep;
}

template std::vector<int64_t> nms_class_aware(const View2<float>&, const View1<float>&,
                                              const View1<int64_t>&, double);
template std::vector<int64_t> nms_class_aware(const View2<float>&, const View1<double>&,
                                              const View1<int64_t>&, double);
template std::vector<int64_t> nms_class_aware(const View2<double>&, const View1<float>&,
                                              const View1<int64_t>&, double);
template std::vector<int64_t> nms_class_aware(const View2<double>&, const View1<double>&,
                                              const View1<int64_t>&, double);

void masks_to_image(const View3<float>& mask_logits, Size2 resized, Size2 out, double threshold,
                    bool* masks) {
  check_mask_geometry("masks_to_image", mask_logits, resized, out);
  if (!(threshold > 0.0 && threshold < 1.0)) {
    throw std::invalid_argument("masks_to_image: threshold must be in (0, 1), got " +
                                std::to_string(threshold));
  }
  // sigmoid(x) > t  <=>  x > log(t / (1 - t)): no exp per pixel.
  const double logit_threshold = std::log(threshold / (1.0 - threshold));
  const MaskUpsampler up(mask_logits, resized, out);
  const int64_t plane = out.height * out.width;
  parallel_chunks(out.height, kMinRowsPerThread, [&](int64_t y_begin, int64_t y_end) {
    MaskUpsampler::Scratch scratch;
    for (int64_t m = 0; m < mask_logits.dim0; ++m) {
      bool* dst = masks + m * plane;
      up.run(m, y_begin, y_end, scratch, [&](int64_t y, const float* row) {
        bool* d = dst + y * out.width;
        for (int64_t x = 0; x < out.width; ++x) d[x] = static_cast<double>(row[x]) > logit_threshold;
      });
    }
  });
}

void semantic_map(const View2<float>& class_logits, const View3<float>& mask_logits, Size2 resized,
                  Size2 out, double threshold, int32_t* labels) {
  check_mask_geometry("semantic_map", mask_logits, resized, out);
  if (class_logits.rows != mask_logits.dim0) {
    throw std::invalid_argument("semantic_map: class_logits has " + std::to_string(class_logits.rows) +
                                " queries but mask_logits has " + std::to_string(mask_logits.dim0));
  }
  const int64_t classes = class_logits.cols;
  const int64_t plane = out.height * out.width;
  if (classes == 0) {
    std::fill(labels, labels + plane, -1);
    return;
  }
  const int64_t queries = mask_logits.dim0;
  std::vector<float> class_prob(queries * classes);
  for (int64_t q = 0; q < queries; ++q) {
    for (int64_t c = 0; c < classes; ++c) class_prob[q * classes + c] = sigmoid(class_logits(q, c));
  }
  std::vector<float> scores(classes * plane, 0.0f);
  const MaskUpsampler up(mask_logits, resized, out);
  // torch.max over classes: the first maximum wins; then `best >= threshold` in float32.
  const float thr = static_cast<float>(threshold);
  parallel_chunks(out.height, kMinRowsPerThread, [&](int64_t y_begin, int64_t y_end) {
    MaskUpsampler::Scratch scratch;
    std::vector<float> prob(out.width);
    for (int64_t q = 0; q < queries; ++q) {
      const float* weights = &class_prob[q * classes];
      up.run(q, y_begin, y_end, scratch, [&](int64_t y, const float* row) {
        for (int64_t x = 0; x < out.width; ++x) prob[x] = sigmoid(row[x]);
        for (int64_t c = 0; c < classes; ++c) {
          float* acc = &scores[c * plane + y * out.width];
          const float w = weights[c];
          for (int64_t x = 0; x < out.width; ++x) acc[x] += w * prob[x];
        }
      });
    }
    for (int64_t p = y_begin * out.width; p < y_end * out.width; ++p) {
      float best = scores[p];
      int32_t label = 0;
      for (int64_t c = 1; c < classes; ++c) {
        const float v = scores[c * plane + p];
        if (v > best) {
          best = v;
          label = static_cast<int32_t>(c);
        }
      }
      labels[p] = best >= thr ? label : -1;
    }
  });
}

void keypoints_to_pixels(const View2<float>& boxes, const View2<float>& keypoints, int64_t num_keypoints,
                         Size2 padded, Size2 resized, int64_t image_width, int64_t image_height,
                         double* boxes_xyxy, float* keypoints_out) {
  if (keypoints.rows != boxes.rows) {
    throw std::invalid_argument("keypoints_to_pixels: boxes has " + std::to_string(boxes.rows) +
                                " rows but keypoints has " + std::to_string(keypoints.rows));
  }
  if (keypoints.cols % 3 != 0) {
    throw std::invalid_argument("keypoints_to_pixels: keypoints: expected [n, 3 * K] ((x, y) pairs then "
                                "visibilities), got " + std::to_string(keypoints.cols) + " columns");
  }
  const int64_t max_keypoints = keypoints.cols / 3;
  if (num_keypoints < 0 || num_keypoints > max_keypoints) {
    throw std::invalid_argument("keypoints_to_pixels: num_keypoints must be in [0, " +
                                std::to_string(max_keypoints) + "], got " + std::to_string(num_keypoints));
  }
  if (padded.height <= 0 || padded.width <= 0 || resized.height <= 0 || resized.width <= 0 ||
      image_width <= 0 || image_height <= 0) {
    throw std::invalid_argument("keypoints_to_pixels: padded_hw " + pair_text(padded.height, padded.width) +
                                ", resized_hw " + pair_text(resized.height, resized.width) +
                                " and image_size " + pair_text(image_width, image_height) +
                                " must be positive");
  }
  // The reference: sx = pw * w / rw in Python (an exact integer product, one rounded division).
  const double sx = static_cast<double>(padded.width * image_width) / static_cast<double>(resized.width);
  const double sy = static_cast<double>(padded.height * image_height) / static_cast<double>(resized.height);
  boxes_cxcywh_to_xyxy(boxes, sx, sy, boxes_xyxy);
  for (int64_t i = 0; i < keypoints.rows; ++i) {
    float* dst = keypoints_out + i * num_keypoints * 3;
    for (int64_t j = 0; j < num_keypoints; ++j) {
      dst[j * 3 + 0] = static_cast<float>(static_cast<double>(keypoints(i, 2 * j)) * sx);
      dst[j * 3 + 1] = static_cast<float>(static_cast<double>(keypoints(i, 2 * j + 1)) * sy);
      dst[j * 3 + 2] = keypoints(i, 2 * max_keypoints + j);
    }
  }
}

}  // namespace vle
