// The decoders' raw tensors to detections, the semantic map, poses and uint8 images (see results.h).
#include "postprocess/results.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <string>

#include "memory/tensor.h"  // shape_text
#include "postprocess/postprocess.h"
#include "visionllm_edge/errors.h"

namespace vle {
namespace {

// A float32 array of `rank` dimensions, or an InputError naming `what` with the shape expected.
void require_float(const Array& a, size_t rank, const std::string& what, const std::string& expected) {
  if (a.empty() || a.type != Array::Type::kFloat32 || a.shape.size() != rank) {
    throw InputError(what + ": expected a float32 array " + expected + ", got " +
                     (a.empty() ? std::string("none") : shape_text(a.shape)) +
                     (a.empty() || a.type == Array::Type::kFloat32 ? "" : " of another type"));
  }
}

Detection make_detection(const ObjectGroup& group, int64_t query, double score, int64_t chunk,
                         const Array& boxes, const Array& masks, Size2 resized, int64_t width, int64_t height,
                         double mask_threshold) {
  const int64_t queries = boxes.shape[1];
  const View2<float> box{boxes.as<float>() + (chunk * queries + query) * 4, 1, 4, 4, 1};
  double xyxy[4];
  boxes_cxcywh_to_xyxy(box, static_cast<double>(width), static_cast<double>(height), xyxy);

  const int64_t mh = masks.shape[2], mw = masks.shape[3];
  const View3<float> mask{masks.as<float>() + (chunk * masks.shape[1] + query) * mh * mw, 1, mh, mw, mh * mw, mw, 1};
  Detection d;
  d.label = group.label;
  d.kind = group.kind;
  d.score = score;
  d.box_xyxy = {xyxy[0], xyxy[1], xyxy[2], xyxy[3]};
  d.mask = Array::make(Array::Type::kBool, {height, width});
  masks_to_image(mask, resized, Size2{height, width}, mask_threshold, d.mask.as<bool>());
  d.query_index = query;
  return d;
}

}  // namespace

void object_results(const Array& logits, const Array& boxes, const Array& masks,
                    const std::vector<ObjectGroup>& groups, int64_t max_groups,
                    std::pair<int64_t, int64_t> resized_hw, int64_t width, int64_t height,
                    const Postprocess& settings, Result& result) {
  require_float(logits, 3, "object decoder logits", "[chunks, queries, max_groups]");
  const int64_t chunks = logits.shape[0], queries = logits.shape[1], columns = logits.shape[2];
  require_float(boxes, 3, "object decoder pred_boxes", "[chunks, queries, 4]");
  require_float(masks, 4, "object decoder pred_masks", "[chunks, queries, h, w]");
  if (boxes.shape != std::vector<int64_t>{chunks, queries, 4} || masks.shape[0] != chunks ||
      masks.shape[1] != queries) {
    throw InputError("object decoder outputs disagree: logits " + shape_text(logits.shape) + ", pred_boxes " +
                     shape_text(boxes.shape) + ", pred_masks " + shape_text(masks.shape) +
                     " (expected [chunks, queries, 4] boxes and [chunks, queries, h, w] masks)");
  }
  if (max_groups <= 0) {
    throw InputError("object results: max_groups must be positive, got " + std::to_string(max_groups));
  }
  if (width <= 0 || height <= 0) {
    throw InputError("object results: the image size must be positive, got " + std::to_string(width) + "x" +
                     std::to_string(height));
  }
  const Size2 resized{resized_hw.first, resized_hw.second};
  const float* lg = logits.as<float>();

  struct Column {
    const ObjectGroup* group;
    int64_t chunk;
    int64_t column;
  };
  std::vector<Column> det, seg;
  for (const ObjectGroup& g : groups) {
    const int64_t chunk = g.index / max_groups, k = g.index % max_groups;
    if (g.index < 0 || chunk >= chunks || k >= columns) {
      throw InputError("object group '" + g.label + "' (" + g.kind + "): slot " + std::to_string(g.index) +
                       " is outside the " + std::to_string(chunks) + " decoder call(s) of " +
                       std::to_string(max_groups) + " groups (logits " + shape_text(logits.shape) + ")");
    }
    if (g.kind == "grd") {
      // The sigmoid in float64, the first maximum.
      int64_t best = 0;
      double best_prob = 0;
      for (int64_t q = 0; q < queries; ++q) {
        const double x = lg[(chunk * queries + q) * columns + k];
        const double p = 1.0 / (1.0 + std::exp(-x));
        if (q == 0 || p > best_prob) {
          best = q;
          best_prob = p;
        }
      }
      result.detections.push_back(make_detection(g, best, best_prob, chunk, boxes, masks, resized, width,
                                                 height, settings.mask_threshold));
    } else if (g.kind == "det") {
      det.push_back({&g, chunk, k});
    } else if (g.kind == "seg") {
      seg.push_back({&g, chunk, k});
    } else {
      throw InputError("object group '" + g.label + "': kind '" + g.kind + "' is not det, grd or seg");
    }
  }

  if (!det.empty()) {
    // The [DET] columns side by side, [queries, groups], then one top-k over (query, group).
    const int64_t n = static_cast<int64_t>(det.size());
    std::vector<float> columns_det(queries * n);
    for (int64_t q = 0; q < queries; ++q) {
      for (int64_t c = 0; c < n; ++c) columns_det[q * n + c] = lg[(det[c].chunk * queries + q) * columns + det[c].column];
    }
    const TopK top = topk_query_class(View2<float>{columns_det.data(), queries, n, n, 1}, settings.det_top_k,
                                      settings.det_score_threshold, false);
    std::vector<Detection> found;
    for (size_t i = 0; i < top.scores.size(); ++i) {
      const Column& col = det[top.classes[i]];
      found.push_back(make_detection(*col.group, top.queries[i], top.scores[i], col.chunk, boxes, masks, resized,
                                     width, height, settings.mask_threshold));
    }
    if (settings.nms_iou && !found.empty()) {
      // Labels are compared by their index among the sorted distinct labels.
      std::set<std::string> distinct;
      for (const Detection& d : found) distinct.insert(d.label);
      const std::vector<std::string> names(distinct.begin(), distinct.end());
      const int64_t m = static_cast<int64_t>(found.size());
      std::vector<double> xyxy(m * 4), scores(m);
      std::vector<int64_t> label_ids(m);
      for (int64_t i = 0; i < m; ++i) {
        std::copy(found[i].box_xyxy.begin(), found[i].box_xyxy.end(), xyxy.begin() + i * 4);
        scores[i] = found[i].score;
        label_ids[i] = std::lower_bound(names.begin(), names.end(), found[i].label) - names.begin();
      }
      const std::vector<int64_t> keep =
          nms_class_aware(View2<double>{xyxy.data(), m, 4, 4, 1}, View1<double>{scores.data(), m, 1},
                          View1<int64_t>{label_ids.data(), m, 1}, *settings.nms_iou);
      std::vector<Detection> kept;
      kept.reserve(keep.size());
      for (int64_t i : keep) kept.push_back(std::move(found[i]));
      found = std::move(kept);
    }
    for (Detection& d : found) result.detections.push_back(std::move(d));
  }

  if (!seg.empty()) {
    // Each [SEG] group's class column scores the masks of its own decoder call. With every group in one
    // call, that call's queries and masks are used as they are; across calls, the queries of each call used
    // are stacked, and a class's logits are -inf (probability 0, adding exactly nothing) on the rows of the
    // other calls, so every class sums over its own call's queries in order.
    const int64_t n = static_cast<int64_t>(seg.size());
    std::vector<int64_t> calls;
    for (const Column& c : seg) {
      if (std::find(calls.begin(), calls.end(), c.chunk) == calls.end()) calls.push_back(c.chunk);
    }
    const int64_t rows = queries * static_cast<int64_t>(calls.size());
    const int64_t mh = masks.shape[2], mw = masks.shape[3];
    std::vector<float> class_logits(rows * n, -INFINITY);
    std::vector<float> stacked;
    const float* mask_data = masks.as<float>() + calls[0] * queries * mh * mw;
    if (calls.size() > 1) {
      stacked.resize(static_cast<size_t>(rows * mh * mw));
      for (size_t i = 0; i < calls.size(); ++i) {
        const float* src = masks.as<float>() + calls[i] * queries * mh * mw;
        std::copy(src, src + queries * mh * mw, stacked.begin() + static_cast<int64_t>(i) * queries * mh * mw);
      }
      mask_data = stacked.data();
    }
    for (int64_t c = 0; c < n; ++c) {
      const int64_t block = std::find(calls.begin(), calls.end(), seg[c].chunk) - calls.begin();
      for (int64_t q = 0; q < queries; ++q) {
        class_logits[(block * queries + q) * n + c] = lg[(seg[c].chunk * queries + q) * columns + seg[c].column];
      }
    }
    const View3<float> mask{mask_data, rows, mh, mw, mh * mw, mw, 1};
    SemanticMap map;
    map.label_map = Array::make(Array::Type::kInt32, {height, width});
    semantic_map(View2<float>{class_logits.data(), rows, n, n, 1}, mask, resized, Size2{height, width},
                 settings.seg_score_threshold, map.label_map.as<int32_t>());
    for (const Column& c : seg) map.labels.push_back(c.group->label);
    result.segmentation = std::move(map);
    result.has_segmentation = true;
  }
}

void pose_results(const Array& logits, const Array& boxes, const Array& keypoints,
                  const std::vector<std::string>& object_labels, const std::vector<std::string>& keypoint_names,
                  std::pair<int64_t, int64_t> padded_hw, std::pair<int64_t, int64_t> resized_hw, int64_t width,
                  int64_t height, const Postprocess& settings, Result& result) {
  require_float(logits, 3, "pose decoder pred_logits", "[1, queries, object slots]");
  require_float(boxes, 3, "pose decoder pred_boxes", "[1, queries, 4]");
  require_float(keypoints, 3, "pose decoder pred_keypoints", "[1, queries, 3 * keypoints]");
  const int64_t queries = logits.shape[1], slots = logits.shape[2];
  if (logits.shape[0] < 1 || boxes.shape[0] != logits.shape[0] || boxes.shape[1] != queries ||
      boxes.shape[2] != 4 || keypoints.shape[0] != logits.shape[0] || keypoints.shape[1] != queries) {
    throw InputError("pose decoder outputs disagree: pred_logits " + shape_text(logits.shape) + ", pred_boxes " +
                     shape_text(boxes.shape) + ", pred_keypoints " + shape_text(keypoints.shape));
  }
  const int64_t objects = static_cast<int64_t>(object_labels.size());
  if (objects < 1 || objects > slots) {
    throw InputError("pose results: expected 1 to " + std::to_string(slots) + " object groups, got " +
                     std::to_string(objects));
  }
  // The real object columns of the first (only) image, read in place.
  const TopK top = topk_query_class(View2<float>{logits.as<float>(), queries, objects, slots, 1},
                                    settings.pose_top_k, settings.pose_score_threshold, true);
  const int64_t n = static_cast<int64_t>(top.queries.size());
  if (n == 0) return;
  const int64_t kcols = keypoints.shape[2];
  std::vector<float> picked_boxes(n * 4), picked_keypoints(n * kcols);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t q = top.queries[i];
    std::copy_n(boxes.as<float>() + q * 4, 4, picked_boxes.begin() + i * 4);
    std::copy_n(keypoints.as<float>() + q * kcols, kcols, picked_keypoints.begin() + i * kcols);
  }
  const int64_t k = static_cast<int64_t>(keypoint_names.size());
  std::vector<double> xyxy(n * 4);
  std::vector<float> points(n * k * 3);
  keypoints_to_pixels(View2<float>{picked_boxes.data(), n, 4, 4, 1},
                      View2<float>{picked_keypoints.data(), n, kcols, kcols, 1}, k,
                      Size2{padded_hw.first, padded_hw.second}, Size2{resized_hw.first, resized_hw.second}, width,
                      height, xyxy.data(), points.data());
  for (int64_t i = 0; i < n; ++i) {
    Pose p;
    p.label = object_labels[top.classes[i]];
    p.score = top.scores[i];
    p.box_xyxy = {xyxy[i * 4], xyxy[i * 4 + 1], xyxy[i * 4 + 2], xyxy[i * 4 + 3]};
    p.keypoints = Array::make(Array::Type::kFloat32, {k, 3});
    std::copy_n(points.begin() + i * k * 3, k * 3, p.keypoints.as<float>());
    p.keypoint_names = keypoint_names;
    p.query_index = top.queries[i];
    result.poses.push_back(std::move(p));
  }
}

namespace {

// One pixel: clip, * 255, + 0.5 and truncate, each step rounded to float32 as NumPy computes it on a float32
// array (no fused multiply-add, which GCC would otherwise form on targets that have one).
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
uint8_t to_uint8(float v) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  if (std::isnan(v)) return 0;
  const float clipped = std::min(std::max(v, 0.0f), 1.0f);
  const float scaled = clipped * 255.0f;
  const float shifted = scaled + 0.5f;
  return static_cast<uint8_t>(shifted);
}

}  // namespace

std::vector<Array> images_to_uint8(const Array& images) {
  require_float(images, 4, "generated images", "[n, 3, H, W]");
  const int64_t n = images.shape[0], channels = images.shape[1], h = images.shape[2], w = images.shape[3];
  if (channels != 3) {
    throw InputError("generated images: expected 3 channels [n, 3, H, W], got " + shape_text(images.shape));
  }
  std::vector<Array> out;
  out.reserve(n);
  const float* src = images.as<float>();
  for (int64_t i = 0; i < n; ++i) {
    Array im = Array::make(Array::Type::kUInt8, {h, w, 3});
    uint8_t* dst = im.as<uint8_t>();
    for (int64_t c = 0; c < 3; ++c) {
      const float* plane = src + (i * 3 + c) * h * w;
      for (int64_t p = 0; p < h * w; ++p) dst[p * 3 + c] = to_uint8(plane[p]);
    }
    out.push_back(std::move(im));
  }
  return out;
}

}  // namespace vle
