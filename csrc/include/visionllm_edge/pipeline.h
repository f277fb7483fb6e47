// The visionllm-edge C++ API: an exported artifact folder in, answers with boxes, masks, keypoints and
// images out.
//
//   vle::LoadOptions options;  options.threads = 2;
//   auto pipe = vle::Pipeline::load("artifact/", options);
//   vle::Result r = pipe.run(vle::Image::rgb(pixels, width, height), "Please detect the person.");
//   pipe.run(image, prompt, {}, [](std::string_view piece) { /* streamed text */ });
//   auto chat = pipe.chat(image);  chat.ask("What is this?");  chat.ask("And on the left?");
//   pipe.detect(image, {"person", "car"});  // ground, segment, pose, generate_image, edit_image
//
// One request: preprocessing, the vision (and region) encoder, the chat template and tokens, embedding
// assembly, prefill into the KV arena, decoding with the super link (a routing token's step is the 1 + N rows
// [E(token); Q_kind]), dispatch of the groups to the decoders, the diffusion loop for [GEN]/[EDIT],
// post-processing. A Pipeline keeps the last frame's encodings and KV rows and reuses the longest common
// prefix, so several requests on one frame encode it once, and a request on a new frame recomputes only from
// the first image row on (the system prompt's rows are kept). A Pipeline serves one request at a time: calls
// from several threads are serialised by its mutex and each gets the answer it would get alone (greedy:
// identical to the same calls made one after another; tests/test_hostile.py runs 8 threads). A Chat's turns
// are serialised by the Chat's own lock. For requests in parallel use one Pipeline per thread.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "visionllm_edge/errors.h"
#include "visionllm_edge/result.h"

namespace vle {

// An 8-bit RGB image, H x W x 3, rows packed. `rgb` / `bgr` copy the caller's pixels; `view` borrows them
// for as long as the Image (and the request using it) lives.
class Image {
 public:
  Image() = default;
  static Image rgb(const uint8_t* pixels, int64_t width, int64_t height);
  static Image bgr(const uint8_t* pixels, int64_t width, int64_t height);
  static Image view(const uint8_t* pixels, int64_t width, int64_t height);
  // Decodes a PNG / JPEG / BMP file (grayscale and alpha are converted to RGB); an InputError naming it.
  static Image load(const std::string& path);

  int64_t width() const { return width_; }
  int64_t height() const { return height_; }
  const uint8_t* data() const { return data_.get(); }
  bool empty() const { return !data_; }

 private:
  int64_t width_ = 0, height_ = 0;
  std::shared_ptr<const uint8_t> data_;
};

// A visual prompt for one `<region>` of the prompt, in the original image's frame: a mask, a box or a point.
struct Region {
  enum class Kind { kMask, kBox, kPoint, kThumbnailMask } kind = Kind::kBox;
  std::vector<float> coords;    // box: x0, y0, x1, y1; point: x, y (pixels)
  std::vector<uint8_t> mask;    // kMask: H x W (the image's size), kThumbnailMask: S x S floats' 0/1 as bytes
  int64_t mask_width = 0, mask_height = 0;

  static Region box(float x0, float y0, float x1, float y1) { return {Kind::kBox, {x0, y0, x1, y1}, {}, 0, 0}; }
  static Region point(float x, float y) { return {Kind::kPoint, {x, y}, {}, 0, 0}; }
  static Region from_mask(std::vector<uint8_t> mask, int64_t width, int64_t height) {
    return {Kind::kMask, {}, std::move(mask), width, height};
  }
};

// The decoders' input prepared by the caller (parity tests hand both sides the same one).
struct DetectionInput {
  Array pixel_values;  // [1, 3, H, W] float32
  Array pixel_mask;    // [1, H, W] bool
  std::pair<int64_t, int64_t> resized_hw{0, 0};
};

struct LoadOptions {
  // "onnxruntime", or "tensorrt": ONNX Runtime's TensorRT provider with profiles, precision and stamped
  // engine caches built from the manifest (docs/architecture.md §5); a BackendUnavailableError naming what
  // the loaded onnxruntime has when it lacks that provider.
  std::string backend = "onnxruntime";
  std::vector<std::string> providers;       // ONNX Runtime execution providers; empty: CPU
  std::map<std::string, std::map<std::string, std::string>> provider_options;
  int threads = 0;                          // intra-op threads per engine; 0: ONNX Runtime's default
  int64_t max_context = 0;                  // KV arena capacity cap; 0: the manifest's max context
  std::vector<std::string> components;      // load these now (vision, region, llm, det, pose, gen, edit)
  bool verify_hashes = true;                // check every file's sha256 against the manifest
  std::string onnxruntime_library;          // libonnxruntime to open; empty: the build's default
  // Overrides of the manifest's post-processing defaults by name: det_top_k, det_score_threshold, nms_iou
  // (a negative value switches NMS off), mask_threshold, seg_score_threshold, pose_top_k,
  // pose_score_threshold. An unknown name is an InputError.
  std::map<std::string, double> postprocess;
  // The tensorrt backend's: fp16 asks TensorRT 10 for fp16 kernels (TensorRT 11 takes the precision from
  // the graphs, so there it needs an fp16 export); engine_cache is the folder of the stamped engines, one
  // sub-folder per graph (empty: the artifact's engines/). Either with the onnxruntime backend is an
  // InputError: its precision is the artifact's, and it caches nothing.
  bool fp16 = false;
  std::string engine_cache;
  int device_id = 0;                        // the CUDA device of the CUDA and TensorRT providers
  // A folder: each engine writes ONNX Runtime's session profile there (<folder>/<graph>_<date>.json, every
  // node's op, shapes and time), completed by Pipeline::end_profiling(); the bench counts FLOPs from it.
  std::string profile_dir;
};

struct RunOptions {
  std::vector<Region> regions;              // one per `<region>` of the prompt, in order
  std::vector<std::pair<std::string, std::string>> history;  // earlier (user, assistant) turns
  std::optional<std::string> answer_prefix;  // forced start of the answer (routing tokens honoured)
  std::optional<std::string> answer;         // a complete forced answer: one prefill, no decode loop
  std::optional<std::string> instruction;    // labels [GEN]/[EDIT] groups (the task shortcuts set it)
  int64_t max_new_tokens = 64;
  bool do_sample = false;
  double temperature = 1.0;
  int64_t top_k = 0;
  double top_p = 1.0;
  double repetition_penalty = 1.0;
  uint64_t seed = 0;
  std::optional<Image> det_image;            // the decoders' image when it differs from the request's
  std::optional<DetectionInput> det_input;   // or their prepared input
  std::optional<Array> noise;                // [n, 4, h, w] initial latents for [GEN]/[EDIT]
  bool decode_images = true;                 // false: [GEN]/[EDIT] stop at the conditioning
  // Polled between the stages of the request and at every decoding and denoising step (not inside a graph
  // call); returning true ends the request with vle::InterruptedError. The Pipeline stays usable: the next
  // request answers as if the interrupted one had never run. vle-run sets it from SIGINT, the Python SDK
  // from Python's own signal handling.
  std::function<bool()> interrupted;
};

// Receives each new piece of the answer's text as it is decoded.
using TextCallback = std::function<void(std::string_view piece)>;

class Chat;

class Pipeline {
 public:
  static Pipeline load(const std::string& artifact_dir, const LoadOptions& options = {});
  Pipeline(Pipeline&&) noexcept;
  Pipeline& operator=(Pipeline&&) noexcept;
  ~Pipeline();

  // One request. `image` may be empty for a text-only request (generation).
  Result run(const Image& image, const std::string& prompt, const RunOptions& options = {},
             const TextCallback& on_text = nullptr);

  // The official forced answers: one prefill, no decoding loop.
  Result detect(const Image& image, const std::vector<std::string>& classes, RunOptions options = {});
  Result ground(const Image& image, const std::string& phrase, RunOptions options = {});
  Result segment(const Image& image, const std::vector<std::string>& classes, RunOptions options = {});
  Result pose(const Image& image, const std::vector<std::string>& keypoint_names,
              const std::vector<std::string>& objects = {"person"}, RunOptions options = {});
  Result generate_image(const std::string& prompt, RunOptions options = {});
  Result edit_image(const Image& image, const std::string& instruction, RunOptions options = {});

  Chat chat(const Image& image, RunOptions defaults = {});

  // The decoders' input for an image, as the loop prepares it.
  DetectionInput detection_input(const Image& image);
  // Forgets the last frame's encodings: the next request encodes its image as a new frame (preprocess,
  // vision, region run again; the KV rows before the first image row stay). Benchmarks repeat one request
  // this way.
  void forget_frame();
  // KV arena facts: capacity in rows, rows in use, bytes reserved.
  int64_t context_capacity() const;
  int64_t context_length() const;
  int64_t arena_bytes() const;
  // With LoadOptions::profile_dir: ends the profile of every engine made so far and returns graph -> file.
  // Their sessions profile no more; an engine made later starts a profile of its own.
  std::map<std::string, std::string> end_profiling();
  // The artifact folder and the components (graph groups) it holds.
  const std::string& artifact_dir() const;
  std::vector<std::string> components() const;

  struct Impl;

 private:
  explicit Pipeline(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// A conversation about one image: each ask() adds a turn and reuses the KV rows of the earlier ones.
class Chat {
 public:
  Result ask(const std::string& prompt, const TextCallback& on_text = nullptr);
  Result ask(const std::string& prompt, const RunOptions& options, const TextCallback& on_text = nullptr);
  // A copy: another thread's ask may be adding a turn.
  std::vector<std::pair<std::string, std::string>> history() const;

 private:
  friend class Pipeline;
  Chat(Pipeline& pipeline, Image image, RunOptions defaults)
      : pipeline_(&pipeline), image_(std::move(image)), defaults_(std::move(defaults)),
        mutex_(std::make_shared<std::mutex>()) {}
  Pipeline* pipeline_;
  Image image_;
  RunOptions defaults_;
  std::vector<std::pair<std::string, std::string>> history_;
  // One turn at a time: a turn reads the history, runs, and appends to it as one step, so turns asked from
  // several threads each see every earlier turn (in the order they took the lock). Shared by copies.
  std::shared_ptr<std::mutex> mutex_;
};

}  // namespace vle
