// Post-processing (postprocess/postprocess.cpp) on arbitrary decoder outputs: class logits, boxes, mask
// logits and keypoints whose every value is any float (NaN, inf, denormals, huge) and whose shapes are any
// the decoders may return, through the steps the dispatch runs: top-k over query x class, boxes to pixels,
// class-aware NMS, masks upsampled and thresholded, the semantic map, keypoints to pixels. The geometry
// (resized size within the x4 mask, the padded size, the original image) is drawn as the preprocessing
// makes it; thresholds come from the manifest's validated ranges, sometimes from anywhere (refused with
// std::invalid_argument, the helpers' contract).
#include <fuzzer/FuzzedDataProvider.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "postprocess/postprocess.h"
#include "visionllm_edge/errors.h"

namespace {

float next_float(FuzzedDataProvider& in) {
  const uint32_t bits = in.ConsumeIntegral<uint32_t>();
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

std::vector<float> values(FuzzedDataProvider& in, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  // A few values from the input, repeated: the rest of the tensor is as hostile as its first entries.
  std::vector<float> pool(in.ConsumeIntegralInRange<size_t>(1, 16));
  for (float& v : pool) v = next_float(in);
  for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = pool[static_cast<size_t>(i) % pool.size()];
  return out;
}

double threshold(FuzzedDataProvider& in) {
  if (in.ConsumeIntegralInRange<int>(0, 7) == 0) {
    const uint64_t bits = in.ConsumeIntegral<uint64_t>();
    double value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  }
  return in.ConsumeFloatingPointInRange<double>(1e-6, 1.0 - 1e-6);
}

void run(FuzzedDataProvider& in) {
  const int64_t queries = in.ConsumeIntegralInRange<int64_t>(1, 32);
  const int64_t classes = in.ConsumeIntegralInRange<int64_t>(1, 8);
  const int64_t h4 = in.ConsumeIntegralInRange<int64_t>(1, 12);
  const int64_t w4 = in.ConsumeIntegralInRange<int64_t>(1, 12);
  const vle::Size2 resized{in.ConsumeIntegralInRange<int64_t>(1, 4 * h4), in.ConsumeIntegralInRange<int64_t>(1, 4 * w4)};
  const vle::Size2 padded{4 * h4, 4 * w4};
  const vle::Size2 image{in.ConsumeIntegralInRange<int64_t>(1, 64), in.ConsumeIntegralInRange<int64_t>(1, 64)};
  const bool query_major = in.ConsumeBool();
  const int64_t k = in.ConsumeIntegralInRange<int64_t>(0, queries * classes + 2);
  const double score_threshold = in.ConsumeFloatingPointInRange<double>(0.0, 1.0);
  const double iou = in.ConsumeFloatingPointInRange<double>(0.0, 1.0);
  const double mask_threshold = threshold(in);

  const std::vector<float> logits = values(in, queries * classes);
  const std::vector<float> boxes = values(in, queries * 4);
  const std::vector<float> masks = values(in, queries * h4 * w4);

  // Top-k, then the kept queries' boxes in pixels, NMS over them, their masks in the image.
  const vle::TopK top = vle::topk_query_class({logits.data(), queries, classes, classes, 1}, k, score_threshold, query_major);
  const int64_t kept = static_cast<int64_t>(top.queries.size());
  if (kept > k || top.scores.size() != top.queries.size() || top.classes.size() != top.queries.size()) __builtin_trap();
  std::vector<float> kept_boxes(static_cast<size_t>(kept * 4));
  std::vector<float> kept_masks(static_cast<size_t>(kept * h4 * w4));
  for (int64_t i = 0; i < kept; ++i) {
    const int64_t q = top.queries[static_cast<size_t>(i)];
    if (q < 0 || q >= queries || top.classes[static_cast<size_t>(i)] < 0 || top.classes[static_cast<size_t>(i)] >= classes) {
      __builtin_trap();
    }
    std::memcpy(&kept_boxes[static_cast<size_t>(i * 4)], &boxes[static_cast<size_t>(q * 4)], 4 * sizeof(float));
    std::memcpy(&kept_masks[static_cast<size_t>(i * h4 * w4)], &masks[static_cast<size_t>(q * h4 * w4)],
                static_cast<size_t>(h4 * w4) * sizeof(float));
  }
  std::vector<double> xyxy(static_cast<size_t>(kept * 4));
  vle::boxes_cxcywh_to_xyxy({kept_boxes.data(), kept, 4, 4, 1}, static_cast<double>(image.width),
                            static_cast<double>(image.height), xyxy.data());
  const std::vector<int64_t> survivors = vle::nms_class_aware<double, float>(
      {xyxy.data(), kept, 4, 4, 1}, {top.scores.data(), kept, 1}, {top.classes.data(), kept, 1}, iou);
  for (int64_t s : survivors) {
    if (s < 0 || s >= kept) __builtin_trap();
  }
  if (kept > 0) {
    std::vector<uint8_t> out(static_cast<size_t>(kept * image.height * image.width));
    vle::masks_to_image({kept_masks.data(), kept, h4, w4, h4 * w4, w4, 1}, resized, image, mask_threshold,
                        reinterpret_cast<bool*>(out.data()));
  }

  // The semantic map over all queries.
  std::vector<int32_t> labels(static_cast<size_t>(image.height * image.width));
  vle::semantic_map({logits.data(), queries, classes, classes, 1}, {masks.data(), queries, h4, w4, h4 * w4, w4, 1},
                    resized, image, score_threshold, labels.data());
  for (int32_t label : labels) {
    if (label < -1 || label >= classes) __builtin_trap();
  }

  // The pose branch: keypoints [Q, 3 * Kmax] of which num_keypoints are read.
  const int64_t max_keypoints = in.ConsumeIntegralInRange<int64_t>(1, 17);
  const int64_t num_keypoints = in.ConsumeIntegralInRange<int64_t>(0, max_keypoints);
  const std::vector<float> keypoints = values(in, queries * 3 * max_keypoints);
  std::vector<double> pose_boxes(static_cast<size_t>(queries * 4));
  std::vector<float> pose_keypoints(static_cast<size_t>(queries * num_keypoints * 3));
  vle::keypoints_to_pixels({boxes.data(), queries, 4, 4, 1}, {keypoints.data(), queries, 3 * max_keypoints, 3 * max_keypoints, 1},
                           num_keypoints, padded, resized, image.width, image.height, pose_boxes.data(),
                           pose_keypoints.data());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  try {
    run(in);
  } catch (const vle::Error&) {
  } catch (const std::invalid_argument&) {
    // The helpers' refusal of a threshold outside (0, 1): the manifest parser keeps these in range.
  }
  return 0;
}
