#include "loop/llm_state.h"

#include "artifact/contract.h"
#include "loop/pipeline_impl.h"

namespace vle {

using loop::Clock;
using loop::ms_since;

LlmState::LlmState(const LlmSetup& setup) : setup_(setup) {
  const int64_t layers = setup.arena->num_layers();
  for (int64_t l = 0; l < layers; ++l) {
    past_key_names_.push_back(contract::layer_name(contract::io::kPastKey, l));
    past_value_names_.push_back(contract::layer_name(contract::io::kPastValue, l));
    present_key_names_.push_back(contract::layer_name(contract::io::kPresentKey, l));
    present_value_names_.push_back(contract::layer_name(contract::io::kPresentValue, l));
  }
  inputs_.resize(static_cast<size_t>(3 + 2 * layers));
  bound_.resize(static_cast<size_t>(2 * layers));
  inputs_[0].first = contract::io::kInputsEmbeds;
  inputs_[1].first = contract::io::kPositionIds;
  inputs_[2].first = contract::io::kOutputRows;
  for (int64_t l = 0; l < layers; ++l) {
    const auto i = static_cast<size_t>(l);
    inputs_[3 + 2 * i].first = past_key_names_[i];
    inputs_[4 + 2 * i].first = past_value_names_[i];
    bound_[2 * i].first = present_key_names_[i];
    bound_[2 * i + 1].first = present_value_names_[i];
  }
  fetch_ = {contract::io::kLogits, contract::io::kHidden};
}

std::vector<Tensor> LlmState::run_step(void* embeds, const void* positions, const void* output_rows, int64_t s,
                                       int64_t num_output_rows, MemoryKind memory) {
  KVArena& a = *setup_.arena;
  a.check_room(s);
  const int64_t past = a.length();
  const int64_t kv = a.kv_heads(), dim = a.head_dim();
  const DType kv_dtype = a.dtype() == KVDType::kFloat16 ? DType::kFloat16 : DType::kFloat32;
  const MemoryKind kv_memory = a.memory();
  inputs_[0].second = {setup_.embed_dtype, {1, s, setup_.hidden}, embeds, memory};
  inputs_[1].second = {DType::kInt64, {s}, const_cast<void*>(positions), memory};
  inputs_[2].second = {DType::kInt64, {num_output_rows}, const_cast<void*>(output_rows), memory};
  for (int64_t l = 0; l < a.num_layers(); ++l) {
    const auto i = static_cast<size_t>(l);
    inputs_[3 + 2 * i].second = {kv_dtype, {past, kv, dim}, a.key_row(l, 0), kv_memory};
    inputs_[4 + 2 * i].second = {kv_dtype, {past, kv, dim}, a.value_row(l, 0), kv_memory};
    bound_[2 * i].second = {kv_dtype, {s, kv, dim}, a.key_row(l, past), kv_memory};
    bound_[2 * i + 1].second = {kv_dtype, {s, kv, dim}, a.value_row(l, past), kv_memory};
  }
  const auto t0 = Clock::now();
  std::vector<Tensor> out = setup_.engine->run(inputs_, bound_, fetch_, memory);
  last_engine_ms_ = ms_since(t0);
  a.commit(s);
  return out;
}

Tensor HostLlm::run(const float* embeds, int64_t s, const std::vector<int64_t>& output_rows) {
  const int64_t past = setup_.arena->length();
  positions_.resize(static_cast<size_t>(s));
  for (int64_t i = 0; i < s; ++i) positions_[static_cast<size_t>(i)] = past + i;
  rows_.assign(output_rows.begin(), output_rows.end());
  void* step_embeds = const_cast<float*>(embeds);
  if (setup_.embed_dtype == DType::kFloat16) {
    half_embeds_.resize(static_cast<size_t>(s * setup_.hidden));
    for (int64_t i = 0; i < s * setup_.hidden; ++i) half_embeds_[static_cast<size_t>(i)] = float_to_half(embeds[i]);
    step_embeds = half_embeds_.data();
  }
  const std::vector<Tensor> out = run_step(step_embeds, positions_.data(), rows_.data(), s,
                                           static_cast<int64_t>(rows_.size()), MemoryKind::kHost);
  const Tensor logits = loop::to_float(out[0]);
  const int64_t last = logits.shape()[0] - 1;
  const float* row = logits.data_as<float>() + last * setup_.vocab;
  logits_.assign(row, row + setup_.vocab);
  return loop::to_float(out[1]);
}

Tensor HostLlm::prefill(const AssemblyInputs& in, const std::vector<int64_t>& output_rows) {
  std::vector<float> embeds(static_cast<size_t>(in.num_ids * setup_.hidden));
  assemble_embeddings(in, embeds.data());
  return run(embeds.data(), in.num_ids, output_rows);
}

int64_t HostLlm::next_token(Sampler& sampler, const SamplingParams& params, const std::vector<int64_t>& penalized) {
  return sampler.sample(logits_.data(), setup_.vocab, params, penalized);
}

void HostLlm::step(const StepPlan& plan, SuperLinkRouter& router) {
  const std::vector<float> rows = router.step_embeddings(plan, setup_.token_table);
  const Tensor hidden = run(rows.data(), plan.rows, plan.output_rows);
  router.observe(plan, {hidden.data_as<float>(), hidden.shape()});
}

}  // namespace vle
