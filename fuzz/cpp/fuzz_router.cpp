// The super link (loop/router.cpp, loop/labels.cpp) fed arbitrary token-id streams, as the decode loop feeds
// it: each sampled id is planned against the KV arena's length and capacity, a fed step gets its input rows
// (E(token), then the query rows of a routing token) and its hidden states observed, groups are collected
// per decoder, and the answer's text (the shapes-tiny tokenizer fixture decodes the ids) gets its labels.
// The same ids also go through the prefill path (an answer prefix that already holds groups). Routes are the
// contract's six kinds on the fixture's routing and placeholder ids, N = 4 for perception and 8 for
// generation (64 in a real artifact; the count changes no branch), hidden size 8.
//
// The sampler only ever gives ids inside the vocabulary; the stream here mostly stays there and sometimes
// leaves it, which the router's helpers refuse (std::invalid_argument naming the id).
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "artifact/contract.h"
#include "loop/labels.h"
#include "loop/router.h"
#include "tokenizer/tokenizer.h"
#include "visionllm_edge/errors.h"

namespace {

constexpr int64_t kHidden = 8;
constexpr int64_t kGenerationQueries = 8;

struct World {
  vle::Tokenizer tokenizer{vle::TokenizerFiles{VLE_SOURCE_DIR "/csrc/tests/data/tokenizer/tokenizer.json",
                                               VLE_SOURCE_DIR "/csrc/tests/data/tokenizer/tokenizer.model",
                                               std::nullopt, std::nullopt}};
  int64_t vocab = tokenizer.vocab_size();
  std::vector<float> token_table = std::vector<float>(static_cast<size_t>(vocab * kHidden), 0.5f);
  std::vector<std::vector<float>> query_tables;
  std::vector<vle::Route> routes;

  World() {
    for (int64_t i = 0; i < vocab * kHidden; ++i) token_table[static_cast<size_t>(i)] = static_cast<float>(i % 97) / 97.f;
    const std::vector<std::string>& kinds = vle::contract::routing_kinds();
    query_tables.reserve(kinds.size());
    for (const std::string& kind : kinds) {
      std::vector<int64_t> placeholders;
      const bool generation = vle::contract::is_generation_kind(kind);
      const int64_t n = generation ? kGenerationQueries : 4;
      for (int64_t i = 0; i < n; ++i) {
        placeholders.push_back(tokenizer.token_id(generation ? vle::contract::kGenerationPlaceholder
                                                             : vle::contract::placeholders()[static_cast<size_t>(i)]));
      }
      query_tables.emplace_back(static_cast<size_t>(n * kHidden), 0.25f);
      routes.emplace_back(tokenizer.token_id(vle::contract::routing_token_of(kind)), kind,
                          vle::contract::decoder_of(kind), placeholders,
                          vle::FloatArrayRef{query_tables.back().data(), {n, kHidden}});
    }
  }
};

const World& world() {
  static const World instance;
  return instance;
}

// Mostly a special or ordinary id of the vocabulary, sometimes any int64.
int64_t next_id(FuzzedDataProvider& in, int64_t vocab) {
  switch (in.ConsumeIntegralInRange<int>(0, 15)) {
    case 0:
      return in.ConsumeIntegral<int64_t>();
    case 1:
    case 2:
    case 3:
    case 4:
    case 5:
      return in.ConsumeIntegralInRange<int64_t>(0, 40);  // the added tokens: routing, placeholders, EOS
    default:
      return in.ConsumeIntegralInRange<int64_t>(0, vocab - 1);
  }
}

float next_float(FuzzedDataProvider& in) {
  const uint32_t bits = in.ConsumeIntegral<uint32_t>();  // any float: NaN, inf, denormals included
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

void decode_loop(const World& w, FuzzedDataProvider& in) {
  vle::SuperLinkRouter router(w.routes, w.tokenizer.eos_id());
  const vle::FloatArrayRef table{w.token_table.data(), {w.vocab, kHidden}};
  const int64_t capacity = in.ConsumeIntegralInRange<int64_t>(0, 256);
  int64_t length = in.ConsumeIntegralInRange<int64_t>(0, capacity);
  const int64_t max_new_tokens = in.ConsumeIntegralInRange<int64_t>(1, 96);
  std::vector<int64_t> answer;
  for (int64_t step = 0; step < max_new_tokens && in.remaining_bytes() > 0; ++step) {
    const vle::StepPlan plan = router.plan(next_id(in, w.vocab), length, capacity, step + 1 == max_new_tokens);
    if (plan.feed) {
      const std::vector<float> rows = router.step_embeddings(plan, table);
      if (static_cast<int64_t>(rows.size()) != plan.rows * kHidden) __builtin_trap();
      // The hidden states of the whole step or of its query rows, as the LLM's outputs may give them.
      const int64_t hidden_rows = in.ConsumeBool() ? plan.rows : static_cast<int64_t>(plan.output_rows.size());
      std::vector<float> hidden(static_cast<size_t>(hidden_rows * kHidden));
      for (float& v : hidden) v = next_float(in);
      router.observe(plan, vle::FloatArrayRef{hidden.data(), {hidden_rows, kHidden}});
      length += plan.rows;
    }
    answer.insert(answer.end(), plan.ids.begin(), plan.ids.end());
    if (length > capacity) __builtin_trap();
    if (plan.stop != vle::StopReason::kNone) break;
  }
  for (const std::string& decoder : {"object", "pose", "gen", "edit"}) {
    try {
      (void)router.groups_for(decoder);
    } catch (const std::invalid_argument&) {  // a decoder the routes do not name
    }
  }
  const std::string text = w.tokenizer.decode(answer, /*skip_special_tokens=*/false);
  std::optional<std::string> instruction;
  if (in.ConsumeBool()) instruction = in.ConsumeRandomLengthString(64);
  (void)vle::label_groups(text, in.ConsumeRandomLengthString(128), instruction);
}

void prefill(const World& w, FuzzedDataProvider& in) {
  vle::SuperLinkRouter router(w.routes, w.tokenizer.eos_id());
  std::vector<int64_t> ids;
  const int64_t start = in.ConsumeIntegralInRange<int64_t>(-2, 64);
  while (in.remaining_bytes() > 0 && ids.size() < 512) ids.push_back(next_id(in, w.vocab));
  const int64_t n = static_cast<int64_t>(ids.size());
  const std::vector<int64_t> rows = router.prefill_query_rows(ids.data(), n, start);
  std::vector<float> hidden(static_cast<size_t>(n * kHidden), 1.f);
  router.observe_prefill(ids.data(), n, start, vle::FloatArrayRef{hidden.data(), {n, kHidden}});
  size_t queries = 0;
  for (const vle::LinkGroup& g : router.links()) queries += static_cast<size_t>(g.num_queries);
  if (queries != rows.size()) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  (void)world();  // a fixture that does not load is a broken build, not a finding: fail before fuzzing
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const World& w = world();
  try {
    if (in.ConsumeBool()) {
      decode_loop(w, in);
    } else {
      prefill(w, in);
    }
  } catch (const vle::Error&) {
    // A refusal naming the id (the tokenizer's decode of an id outside the vocabulary).
  } catch (const std::invalid_argument&) {
    // The router's refusal of an id outside the token table or a routing token without its placeholders.
  }
  return 0;
}
