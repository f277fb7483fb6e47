// The LLM's steps and where their buffers live (docs/architecture.md §3 steps 5-6, §4). One interface, two
// implementations: HostLlm keeps everything in host memory (the loop as it always ran, and the only one of
// a build without CUDA or a session on the CPU provider); the device one (cuda/llm_device.h) keeps the KV
// arena, the token and query tables, the step's inputs, the logits and the link rows on the GPU, so that a
// decode step moves only the token id between host and device.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "engines/engine.h"
#include "loop/assemble.h"
#include "loop/router.h"
#include "loop/sampling.h"
#include "memory/kv_arena.h"
#include "memory/tensor.h"

namespace vle {

// What both implementations read, owned by the pipeline for its lifetime.
struct LlmSetup {
  Engine* engine = nullptr;   // the llm graph's
  KVArena* arena = nullptr;   // in the memory the implementation works in
  int64_t hidden = 0, vocab = 0;
  DType embed_dtype = DType::kFloat32;              // the graph's inputs_embeds
  FloatArrayRef token_table;                        // [V, H], host
  const std::unordered_map<std::string, std::vector<float>>* query_tables = nullptr;  // kind -> [N, H], host
  int device_id = 0;
};

class LlmState {
 public:
  explicit LlmState(const LlmSetup& setup);
  virtual ~LlmState() = default;
  LlmState(const LlmState&) = delete;
  LlmState& operator=(const LlmState&) = delete;

  // Where the buffers live: the stats' "llm_device" (1 on the GPU, 0 on the host).
  virtual bool on_device() const = 0;

  // Runs the rows `in` assembles (the ids after the arena's length; its table refs are the host ones) and
  // returns the float32 hidden states of `output_rows` on the host ([len, H]). The logits of the last
  // output row are kept for `next_token`.
  virtual Tensor prefill(const AssemblyInputs& in, const std::vector<int64_t>& output_rows) = 0;

  // Decoding. `start_decode` names the ids the repetition penalty applies to, `penalize` adds one; the
  // host passes `penalized` to the Sampler each step, the device keeps them as flags.
  virtual void start_decode(const std::vector<int64_t>& penalized) = 0;
  virtual void penalize(int64_t token) = 0;
  // The next token from the kept logits: the same token for the same Sampler state on either side (the
  // device draws its uniform from `sampler` when sampling, as Sampler::sample does).
  virtual int64_t next_token(Sampler& sampler, const SamplingParams& params, const std::vector<int64_t>& penalized) = 0;
  // Feeds a planned step (plan.feed) and keeps its logits; a routing step's query rows are the group's link,
  // observed by `router` now (host) or all at once in `finish_decode` (device: one copy after decoding).
  virtual void step(const StepPlan& plan, SuperLinkRouter& router) = 0;
  virtual void finish_decode(SuperLinkRouter& router) = 0;

  double last_engine_ms() const { return last_engine_ms_; }

 protected:
  // Binds the step's inputs (embeds [1, s, H], positions [s], output_rows [r], all in `memory`) with the
  // arena's past and its next s rows, runs the graph, commits the rows and returns {logits, hidden} as the
  // engine fetched them (into `memory`).
  std::vector<Tensor> run_step(void* embeds, const void* positions, const void* output_rows, int64_t s,
                               int64_t num_output_rows, MemoryKind memory);

  LlmSetup setup_;

 private:
  std::vector<std::string> past_key_names_, past_value_names_, present_key_names_, present_value_names_;
  std::vector<NamedView> inputs_, bound_;
  std::vector<std::string> fetch_;
  double last_engine_ms_ = 0;  // the last engine call alone
};

// The host implementation.
class HostLlm final : public LlmState {
 public:
  explicit HostLlm(const LlmSetup& setup) : LlmState(setup) {}
  bool on_device() const override { return false; }
  Tensor prefill(const AssemblyInputs& in, const std::vector<int64_t>& output_rows) override;
  void start_decode(const std::vector<int64_t>&) override {}
  void penalize(int64_t) override {}
  int64_t next_token(Sampler& sampler, const SamplingParams& params, const std::vector<int64_t>& penalized) override;
  void step(const StepPlan& plan, SuperLinkRouter& router) override;
  void finish_decode(SuperLinkRouter&) override {}

 private:
  // Runs `s` rows of float32 embeddings (converted to the graph's dtype) and keeps the last output row's logits.
  Tensor run(const float* embeds, int64_t s, const std::vector<int64_t>& output_rows);

  std::vector<int64_t> positions_, rows_;
  std::vector<uint16_t> half_embeds_;
  std::vector<float> logits_;  // [V]
};

}  // namespace vle
