// What one request returns: the answer's text and tokens, its super-link groups, and every decoder's
// post-processed output. `to_json()` gives the same document as the Python SDK's `Result.to_json()`.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace vle {

// A float32 / int32 / int64 / uint8 / bool array returned by the loop (raw decoder tensors, masks, link
// states, images): C-contiguous, shared (copies share the buffer).
struct Array {
  enum class Type { kFloat32, kInt32, kInt64, kUInt8, kBool };
  Type type = Type::kFloat32;
  std::vector<int64_t> shape;
  std::shared_ptr<void> data;

  int64_t numel() const;
  size_t bytes() const;
  bool empty() const { return !data; }
  template <typename T> const T* as() const { return static_cast<const T*>(data.get()); }
  template <typename T> T* as() { return static_cast<T*>(data.get()); }
  // A zero-filled array of that type and shape.
  static Array make(Type type, std::vector<int64_t> shape);
};
size_t element_size(Array::Type type);

struct Link {
  std::string kind;    // det grd seg pose gen edit
  std::string label;   // the phrase the group stands for
  int64_t position = 0;  // of the routing token in the sequence
  Array states;        // [N, H] float32, post-final-norm hidden states of the query rows
};

struct Detection {
  std::string label;
  std::string kind;    // det grd seg
  double score = 0;    // a [GRD] score is a float64 sigmoid, a [DET] one a float32 sigmoid
  std::array<double, 4> box_xyxy{};  // original-image pixels, computed in double
  Array mask;          // [H, W] bool in the original frame; empty when none
  int64_t query_index = -1;
};

struct SemanticMap {
  Array label_map;     // [H, W] int32, index into labels, -1 where no class scored
  std::vector<std::string> labels;
};

struct Pose {
  std::string label;
  double score = 0;    // a float32 sigmoid
  std::array<double, 4> box_xyxy{};  // original-image pixels, computed in double
  Array keypoints;     // [K, 3] float32: x, y, visibility in original-image pixels
  std::vector<std::string> keypoint_names;
  int64_t query_index = -1;
};

struct Result {
  std::string text;
  std::vector<int64_t> token_ids;  // the answer's tokens (placeholders after routing tokens left out)
  std::string stop_reason = "eos";  // eos | length | stop
  std::vector<Link> links;
  std::vector<Detection> detections;
  bool has_segmentation = false;
  SemanticMap segmentation;
  std::vector<Pose> poses;
  std::vector<Array> images;       // [H, W, 3] uint8 each
  std::vector<std::pair<std::string, double>> timings_ms;  // per stage, in the order they ended (a stage
                                                           // listed twice counts as the sum of its times;
                                                           // the keys: docs/architecture.md §3; "denoise"
                                                           // is a part of gen_decoder / edit_decoder)

  // For parity checks and benchmarks: the whole id sequence, every decoder's raw tensors (by decoder, then
  // output name) and loop counters (reused_rows, decode_steps, decode_engine_ms, ...).
  std::vector<int64_t> input_ids;
  std::map<std::string, std::map<std::string, Array>> decoders;
  std::map<std::string, double> stats;

  double timing(const std::string& stage) const;  // 0 when the stage did not run
  // The JSON text Python's json.dumps(result.to_dict(), indent=indent) writes (ASCII, the shortest
  // round-trip float digits); indent < 0 is Python's indent=None (one line, ", " and ": ").
  std::string to_json(int indent = 2) const;
};

}  // namespace vle
