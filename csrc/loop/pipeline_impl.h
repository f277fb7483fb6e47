// The request loop's private state, shared by its three files: pipeline.cpp (loading, sequences, the LLM,
// requests), frames.cpp (a frame's preprocessing and encoders) and dispatch.cpp (decoders, diffusion).
#pragma once

#include "visionllm_edge/pipeline.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <mutex>
#include <random>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include "artifact/contract.h"
#include "artifact/files.h"
#include "artifact/manifest.h"
#include "artifact/safetensors.h"
#include "engines/engine.h"
#include "loop/assemble.h"
#include "loop/diffusion.h"
#include "loop/labels.h"
#include "loop/llm_state.h"
#include "loop/router.h"
#include "loop/sampling.h"
#include "loop/templates.h"
#include "memory/finite.h"
#include "memory/half.h"
#include "memory/kv_arena.h"
#include "memory/tensor.h"
#include "postprocess/postprocess.h"
#include "postprocess/results.h"
#include "preprocess/image_ops.h"
#include "preprocess/preprocess.h"
#include "text/utf8.h"
#include "tokenizer/tokenizer.h"

namespace vle {
namespace loop {

using Clock = std::chrono::steady_clock;

// The decoders the routing table names (contract::decoder_of): the object decoder takes [DET] [GRD] [SEG]
// groups, the keypoint decoder [POSE] groups; gen and edit are named like their kinds.
inline const std::string kObjectDecoder = contract::decoder_of("det");
inline const std::string kPoseDecoder = contract::decoder_of("pose");

inline double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

inline void add_timing(Result& result, const std::string& stage, double ms) {
  for (auto& [name, value] : result.timings_ms) {
    if (name == stage) {
      value += ms;
      return;
    }
  }
  result.timings_ms.emplace_back(stage, ms);
}

// Adds the time from its construction to its destruction to one stage of a result.
class StageTimer {
 public:
  StageTimer(Result& result, std::string stage) : result_(result), stage_(std::move(stage)), start_(Clock::now()) {}
  ~StageTimer() { add_timing(result_, stage_, ms_since(start_)); }
  StageTimer(const StageTimer&) = delete;
  StageTimer& operator=(const StageTimer&) = delete;

 private:
  Result& result_;
  std::string stage_;
  Clock::time_point start_;
};

inline Array::Type array_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return Array::Type::kFloat32;
    case DType::kInt64: return Array::Type::kInt64;
    case DType::kInt32: return Array::Type::kInt32;
    case DType::kBool: return Array::Type::kBool;
    case DType::kFloat16: break;
  }
  throw InputError("float16 tensors are converted to float32 before they become results");
}

// An engine output as a float32 tensor (fp16 artifacts return halves).
inline Tensor to_float(const Tensor& t) {
  if (t.dtype() == DType::kFloat32) return t;
  if (t.dtype() != DType::kFloat16) {
    throw EngineError(std::string("expected a float output, got ") + dtype_name(t.dtype()));
  }
  Tensor out(DType::kFloat32, t.shape());
  const auto* src = t.data_as<uint16_t>();
  float* dst = out.data_as<float>();
  for (int64_t i = 0; i < t.numel(); ++i) dst[i] = half_to_float(src[i]);
  return out;
}

// A result array sharing an engine output's buffer (float16 converted).
inline Array to_array(const Tensor& tensor) {
  const Tensor t = tensor.dtype() == DType::kFloat16 ? to_float(tensor) : tensor;
  Array a;
  a.type = array_type(t.dtype());
  a.shape = t.shape();
  // The tensor's buffer stays alive as long as the array: the aliasing constructor shares its owner.
  auto holder = std::make_shared<Tensor>(t);
  a.data = std::shared_ptr<void>(holder, holder->data());
  return a;
}

inline Array float_array(const float* data, std::vector<int64_t> shape) {
  Array a = Array::make(Array::Type::kFloat32, std::move(shape));
  std::memcpy(a.data.get(), data, a.bytes());
  return a;
}

inline int64_t fact_int(const GraphEntry& graph, const std::string& key, std::optional<int64_t> fallback = {}) {
  const auto it = graph.facts.find(key);
  if (it == graph.facts.end() || it->is_null()) {
    if (fallback) return *fallback;
    throw ArtifactError("graphs." + graph.name + ".facts." + key + ": missing (the loop needs it)");
  }
  if (!it->is_number_integer()) {
    throw ArtifactError("graphs." + graph.name + ".facts." + key + ": expected an integer, got " + it->dump());
  }
  return it->get<int64_t>();
}

inline ImageView image_view(const Image& image) {
  return {image.data(), image.height(), image.width(), image.width() * 3, 3, 1};
}

// A frame: one image and what has been computed from it.
struct Frame {
  std::string key;
  Image image;                      // empty for a text-only request
  int64_t width = 0, height = 0;
  std::vector<float> tiles;         // [T, 3, S, S]
  int64_t num_tiles = 0;
  std::vector<float> image_embeds;  // [T * P, H]
  int64_t num_patches = 0;          // T * P
  Tensor region_levels;             // the vision graph's output, handed to the region graph as it is
  std::vector<float> region_rows;   // [R, H]
  int64_t num_regions = 0;
  std::optional<DetectionInput> det;
};

// A conversation's ids, where the answer starts, and what the labels refer to.
struct Sequence {
  std::vector<int64_t> ids;
  int64_t answer_start = 0;
  std::string question;
  std::optional<std::string> instruction;
  bool forced = false;  // a complete answer: prefill only
  std::vector<std::string> history_answers;
};

struct Prefilled {
  // The [DET] groups of earlier turns, the keypoint decoder's objects when the answer has none of its own.
  std::vector<LinkGroup> history_objects;
};

}  // namespace loop

using loop::Frame;
using loop::Prefilled;
using loop::Sequence;

struct Pipeline::Impl {
  std::string dir;
  LoadOptions options;
  Manifest manifest;
  std::unique_ptr<Tokenizer> tokenizer;
  int64_t hidden = 0, vocab = 0;
  std::unique_ptr<SafetensorsFile> embeddings;                    // mapped for the pipeline's lifetime
  const float* token_rows = nullptr;                              // [V, H]: in the mapping, or the copy
  std::vector<float> token_table_copy;                            // a converted fp16 table
  std::unordered_map<std::string, std::vector<float>> query_tables;  // by routing kind, [N, H]
  std::unique_ptr<KVArena> arena;
  DType embed_dtype = DType::kFloat32;
  int64_t patch_id = 0, region_id = 0, eos_id = 0;
  std::unordered_set<int64_t> placeholder_ids;
  std::unordered_map<int64_t, std::string> kind_of;                // routing token id -> kind
  std::unordered_map<int64_t, std::string> specials;               // added token id -> its spelling
  DetectionInput det_scratch;                                      // the decoders' input of a det_image
  std::unique_ptr<SuperLinkRouter> router;
  std::set<std::string> decoders;                                  // decoders the routing table names
  std::map<std::string, std::unique_ptr<Engine>> engines;
  std::optional<Frame> frame;
  std::vector<int64_t> cached_ids;  // the ids whose KV rows are in the arena
  std::mutex mutex;                 // one request at a time

  // Throws InterruptedError ("the request was interrupted <where>") when o.interrupted says so.
  static void interruption_point(const RunOptions& o, const char* where);

  // The LLM's steps, on the host or (a CUDA build, a GPU, an llm engine with device_io()) the device; made
  // with the llm engine, before the arena holds anything.
  std::unique_ptr<LlmState> llm_state;

  Engine& engine(const std::string& graph);
  const GraphEntry& graph(const std::string& name) const { return manifest.graph(name); }
  // A view of float32 data in the dtype the graph's input wants (converted into `storage` when it differs).
  TensorView float_input(const std::string& graph_name, const std::string& input, const float* data,
                         std::vector<int64_t> shape, std::vector<uint16_t>& storage) const;

  Result run(const Image& image, const std::string& prompt, const RunOptions& options, const TextCallback& on_text);
  Frame& frame_for(const Image& image, const RunOptions& options, Result& result);
  void encode_regions(Frame& frame, const std::vector<Region>& regions);
  DetectionInput detection_input(const Image& image) const;
  const DetectionInput& frame_detection_input(Frame& frame, const RunOptions& options);
  Sequence sequence(const Frame& frame, const std::string& prompt, const RunOptions& options) const;
  std::vector<int64_t> conversation_ids(const std::vector<std::pair<std::string, std::optional<std::string>>>& turns,
                                        const Frame& frame, const std::optional<std::string>& open_answer) const;
  LlmState& llm();
  Prefilled prefill(Sequence& seq, const Frame& frame, Result& result);
  // Decodes from the logits the prefill left in the LLM state.
  std::string decode(Sequence& seq, const RunOptions& options, Result& result, const TextCallback& on_text);
  std::string answer_text(const std::vector<int64_t>& ids, size_t start) const;
  // Hands on_text the answer's text past `streamed` (ids from `start`) and moves `streamed` on; `last`: the
  // answer is complete, so a trailing incomplete character is no longer held back.
  void stream_text(const std::vector<int64_t>& ids, size_t start, std::string& streamed, const TextCallback& on_text,
                   bool last) const;
  std::vector<int64_t> answer_tokens(const std::vector<int64_t>& ids, size_t start) const;
  void dispatch(Frame& frame, const std::map<int64_t, std::string>& labels, const std::vector<LinkGroup>& history,
                const RunOptions& options, Result& result);
  // The mapper on the groups' link states ([n, nq, H], gathered by dispatch as part of the link stage), the
  // denoising loop (its steps' times appended to `step_ms`) and the VAE.
  void diffusion(const std::string& kind, const std::vector<DecoderGroup>& groups, const std::vector<float>& states,
                 const Frame& frame, const RunOptions& options, Result& result, std::vector<double>& step_ms);
};

}  // namespace vle
