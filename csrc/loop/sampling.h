// Next-token choice (docs/architecture.md §3 step 6) with the reference loop's `_sample` semantics: HF-style repetition
// penalty over the ids the caller names, then greedy argmax, or temperature -> top-k (ties with the k-th
// value kept) -> softmax -> top-p (a token is dropped when the probability mass before it already exceeds
// top_p) -> a draw. The draw uses our own seeded PRNG, not torch's: the same seed gives the same sequence
// here on every platform, but not the reference's sequence.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace vle {

struct SamplingParams {
  bool do_sample = false;
  double temperature = 1.0;
  int64_t top_k = 0;          // 0: off
  double top_p = 1.0;         // 1: off
  double repetition_penalty = 1.0;  // 1: off
};

// Throws unless the parameters make sense (temperature > 0 when sampling, top_k >= 0, 0 < top_p <= 1,
// repetition_penalty > 0); the message names the parameter and its value.
void check_sampling_params(const SamplingParams& params);

// HF's RepetitionPenaltyLogitsProcessor on `logits[vocab]` in place, float32 math: a positive logit is
// divided by `penalty`, a negative one multiplied. Each id counts once; ids outside the vocabulary are
// an error naming the id.
void apply_repetition_penalty(float* logits, int64_t vocab, const std::vector<int64_t>& ids, double penalty);

// First index of the largest value (torch.argmax's tie rule).
int64_t argmax(const float* values, int64_t n);

// The distribution a draw uses, over the whole vocabulary (zeros for excluded tokens; one-hot at the argmax
// when not sampling). Probabilities are computed in double.
std::vector<double> sampling_probabilities(const float* logits, int64_t vocab, const SamplingParams& params,
                                           const std::vector<int64_t>& penalized_ids);

class Sampler {
 public:
  explicit Sampler(uint64_t seed) : rng_(seed) {}
  void reseed(uint64_t seed) { rng_.seed(seed); }
  // A uniform double in [0, 1) from the top 53 bits of the generator (std::uniform_real_distribution is
  // implementation-defined, which would break "same seed, same tokens" across compilers).
  double uniform() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }
  // The next token for `logits[vocab]`; greedy draws nothing from the generator.
  int64_t sample(const float* logits, int64_t vocab, const SamplingParams& params,
                 const std::vector<int64_t>& penalized_ids);

 private:
  std::mt19937_64 rng_;
};

}  // namespace vle
