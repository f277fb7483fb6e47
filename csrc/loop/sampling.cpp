#include "loop/sampling.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <utility>
#include <stdexcept>
#include <string>

namespace vle {

void check_sampling_params(const SamplingParams& p) {
  if (p.do_sample && !(p.temperature > 0.0)) {
    throw std::invalid_argument("temperature must be positive when sampling, got " +
                                std::to_string(p.temperature));
  }
  if (p.top_k < 0) {
    throw std::invalid_argument("top_k must be >= 0 (0 turns it off), got " + std::to_string(p.top_k));
  }
  if (!(p.top_p > 0.0 && p.top_p <= 1.0)) {  // 0 would keep no token; NaN fails both comparisons
    throw std::invalid_argument("top_p must be in (0, 1], got " + std::to_string(p.top_p));
  }
  if (!(p.repetition_penalty > 0.0)) {
    throw std::invalid_argument("repetition_penalty must be positive, got " +
                                std::to_string(p.repetition_penalty));
  }
}

void apply_repetition_penalty(float* logits, int64_t vocab, const std::vector<int64_t>& ids, double penalty) {
  if (penalty == 1.0 || ids.empty()) return;
  std::vector<int64_t> unique(ids);
  std::sort(unique.begin(), unique.end());
  unique.erase(std::unique(unique.begin(), unique.end()), unique.end());
  if (unique.front() < 0 || unique.back() >= vocab) {
    const int64_t bad = unique.front() < 0 ? unique.front() : unique.back();
    throw std::invalid_argument("penalized_ids: id " + std::to_string(bad) +
                                " is outside the vocabulary of " + std::to_string(vocab));
  }
  const auto f = static_cast<float>(penalty);
  for (int64_t id : unique) {
    const float v = logits[id];
    logits[id] = v > 0.0f ? v / f : v * f;
  }
}

namespace {

void check_logits(const float* logits, int64_t vocab) {
  for (int64_t i = 0; i < vocab; ++i) {
    // -inf is a masked token; NaN or +inf means the graph's arithmetic broke, and argmax or a softmax over
    // it would still return a plausible-looking token.
    if (std::isnan(logits[i]) || logits[i] == std::numeric_limits<float>::infinity()) {
      throw std::invalid_argument("logits: token " + std::to_string(i) + " of " + std::to_string(vocab) + " is " +
                                  (std::isnan(logits[i]) ? "NaN" : "+inf") +
                                  " (the llm graph's output is not finite)");
    }
  }
}

}  // namespace

int64_t argmax(const float* values, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (values[i] > values[best]) best = i;
  }
  return best;
}

std::vector<double> sampling_probabilities(const float* logits, int64_t vocab, const SamplingParams& params,
                                           const std::vector<int64_t>& penalized_ids) {
  check_sampling_params(params);
  if (vocab <= 0) {
    throw std::invalid_argument("logits must be a non-empty 1-D array");
  }
  check_logits(logits, vocab);
  std::vector<float> penalized(logits, logits + vocab);
  apply_repetition_penalty(penalized.data(), vocab, penalized_ids, params.repetition_penalty);
  std::vector<double> probs(static_cast<size_t>(vocab), 0.0);
  if (!params.do_sample) {
    probs[static_cast<size_t>(argmax(penalized.data(), vocab))] = 1.0;
    return probs;
  }
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  std::vector<double> z(static_cast<size_t>(vocab));
  for (size_t i = 0; i < z.size(); ++i) z[i] = static_cast<double>(penalized[i]) / params.temperature;
  // `live`: the tokens that can still be drawn, in index order. Every other token has probability exactly 0,
  // so the sums and divisions below skip them without changing a bit of the result.
  std::vector<int64_t> live;
  if (params.top_k > 0 && params.top_k < vocab) {
    // Everything below the k-th largest value goes; ties with it stay (the reference's `logits < kth`).
    std::vector<double> sorted(z);
    std::nth_element(sorted.begin(), sorted.begin() + (params.top_k - 1), sorted.end(), std::greater<>());
    const double kth = sorted[static_cast<size_t>(params.top_k - 1)];
    for (size_t i = 0; i < z.size(); ++i) {
      if (z[i] < kth) {
        z[i] = kNegInf;
      } else {
        live.push_back(static_cast<int64_t>(i));
      }
    }
  } else {
    live.resize(static_cast<size_t>(vocab));
    for (int64_t i = 0; i < vocab; ++i) live[static_cast<size_t>(i)] = i;
  }
  double max_z = kNegInf;
  for (int64_t i : live) max_z = std::max(max_z, z[static_cast<size_t>(i)]);
  if (!std::isfinite(max_z)) {
    throw std::invalid_argument("logits: no finite value to sample from");
  }
  double total = 0.0;
  for (int64_t i : live) {
    const double p = std::exp(z[static_cast<size_t>(i)] - max_z);
    probs[static_cast<size_t>(i)] = p;
    total += p;
  }
  for (int64_t i : live) probs[static_cast<size_t>(i)] /= total;
  if (params.top_p < 1.0) {
    // Most probable first, equal probabilities by index (unique keys: the order is well defined). Tokens
    // with p above a cutoff are a prefix of that order; when their mass already exceeds top_p (with a
    // margin for summation order), the nucleus lies inside them and only they are sorted. A peaked LLM
    // distribution has few such tokens, so the usual step sorts a handful instead of all V.
    double max_p = 0.0;
    for (int64_t i : live) max_p = std::max(max_p, probs[static_cast<size_t>(i)]);
    std::vector<std::pair<double, int64_t>> order;
    for (const double cutoff : {max_p * 1e-3, 0.0}) {
      order.clear();
      double mass = 0.0;
      for (int64_t i : live) {
        const double p = probs[static_cast<size_t>(i)];
        if (p > cutoff) {
          order.emplace_back(-p, i);
          mass += p;
        }
      }
      if (mass > params.top_p + 1e-9) break;
    }
    std::sort(order.begin(), order.end());
    size_t keep = order.size();
    double before = 0.0;
    for (size_t i = 0; i < order.size(); ++i) {
      if (before > params.top_p) {
        keep = i;  // the first token whose preceding mass exceeds top_p, and all after it, are dropped
        break;
      }
      before -= order[i].first;
    }
    for (int64_t i : live) probs[static_cast<size_t>(i)] = 0.0;
    double kept = 0.0;
    for (size_t k = 0; k < keep; ++k) {
      probs[static_cast<size_t>(order[k].second)] = -order[k].first;
      kept -= order[k].first;
    }
    for (size_t k = 0; k < keep; ++k) probs[static_cast<size_t>(order[k].second)] /= kept;
  }
  return probs;
}

int64_t Sampler::sample(const float* logits, int64_t vocab, const SamplingParams& params,
                        const std::vector<int64_t>& penalized_ids) {
  if (!params.do_sample) {
    // Greedy needs no distribution: argmax of the penalized logits.
    check_sampling_params(params);
    if (vocab <= 0) throw std::invalid_argument("logits must be a non-empty 1-D array");
    check_logits(logits, vocab);
    std::vector<float> penalized(logits, logits + vocab);
    apply_repetition_penalty(penalized.data(), vocab, penalized_ids, params.repetition_penalty);
    return argmax(penalized.data(), vocab);
  }
  const std::vector<double> probs = sampling_probabilities(logits, vocab, params, penalized_ids);
  // Inverse CDF over the vocabulary in index order; the last token with mass catches rounding at the top.
  const double u = uniform();
  double cumulative = 0.0;
  int64_t last = -1;
  for (size_t i = 0; i < probs.size(); ++i) {
    if (probs[i] <= 0.0) continue;
    cumulative += probs[i];
    last = static_cast<int64_t>(i);
    if (u < cumulative) return last;
  }
  return last;
}

}  // namespace vle
