// Next-token choice on the GPU (cuda/sampling.h) against the CPU Sampler (loop/sampling.h) on fresh random
// logits: greedy with and without the repetition penalty, float32 and float16 logits, ties (torch's
// first-index rule), and the sampling path over temperature, top-k, top-p and the penalty with the same
// uniform draw. Skipped without a GPU, naming the CUDA error.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <iostream>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/memory.h"
#include "cuda/sampling.h"
#include "cuda_skip.h"
#include "loop/sampling.h"
#include "memory/half.h"

namespace {

uint32_t fresh_seed() {
  const uint32_t seed = std::random_device{}();
  std::cout << "[ seed     ] " << seed << "\n";
  return seed;
}

// Logits as a peaked LLM gives them, now and then rounded to few values so that ties are common.
std::vector<float> random_logits(std::mt19937& rng, int64_t vocab) {
  std::normal_distribution<float> normal(0.f, 2.f);
  std::vector<float> logits(static_cast<size_t>(vocab));
  const bool coarse = rng() % 3 == 0;
  for (float& x : logits) x = coarse ? std::round(normal(rng)) : normal(rng);
  for (int i = 0; i < 3; ++i) logits[rng() % static_cast<uint32_t>(vocab)] += 8.f;  // a few likely tokens
  return logits;
}

std::vector<int64_t> random_ids(std::mt19937& rng, int64_t vocab) {
  std::vector<int64_t> ids(rng() % 40);
  for (int64_t& id : ids) id = static_cast<int64_t>(rng() % static_cast<uint32_t>(vocab));
  return ids;
}

struct DeviceLogits {
  vle::Tensor f32, f16;
  std::vector<float> f16_as_float;  // what the CPU loop sees for half logits (to_float)
  explicit DeviceLogits(const std::vector<float>& logits) {
    const auto n = static_cast<int64_t>(logits.size());
    std::vector<uint16_t> halves(logits.size());
    for (size_t i = 0; i < logits.size(); ++i) {
      halves[i] = vle::float_to_half(logits[i]);
      f16_as_float.push_back(vle::half_to_float(halves[i]));
    }
    f32 = vle::Tensor(vle::DType::kFloat32, {n}, vle::cuda::device_allocator());
    f16 = vle::Tensor(vle::DType::kFloat16, {n}, vle::cuda::device_allocator());
    vle::cuda::copy_to_device(f32.data(), logits.data(), f32.bytes());
    vle::cuda::copy_to_device(f16.data(), halves.data(), f16.bytes());
  }
};

TEST(CudaSampling, GreedyMatchesTheCpuWithPenaltyTiesAndHalfLogits) {
  VLE_REQUIRE_GPU();
  std::mt19937 rng(fresh_seed());
  vle::cuda::Stream stream;
  for (const int64_t vocab : {int64_t{1}, int64_t{7}, int64_t{1024}, int64_t{1025}, int64_t{32000}}) {
    vle::cuda::DeviceSampler device(vocab);
    for (int round = 0; round < 40; ++round) {
      const std::vector<float> logits = random_logits(rng, vocab);
      const DeviceLogits on_device(logits);
      vle::SamplingParams params;
      params.repetition_penalty = round % 2 ? 1.0 + (rng() % 100) / 50.0 : 1.0;
      const std::vector<int64_t> penalized = random_ids(rng, vocab);
      device.set_penalized(penalized, stream.get());
      vle::Sampler cpu(0);
      SCOPED_TRACE("vocab " + std::to_string(vocab) + ", round " + std::to_string(round));
      EXPECT_EQ(device.next_token(on_device.f32.data(), vle::DType::kFloat32, params, 0.0, stream.get()),
                cpu.sample(logits.data(), vocab, params, penalized));
      EXPECT_EQ(device.next_token(on_device.f16.data(), vle::DType::kFloat16, params, 0.0, stream.get()),
                cpu.sample(on_device.f16_as_float.data(), vocab, params, penalized));
    }
  }
}

TEST(CudaSampling, GreedyFollowsTheCpuOnNaN) {
  VLE_REQUIRE_GPU();
  vle::cuda::Stream stream;
  vle::cuda::DeviceSampler device(5);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (const std::vector<float>& logits : {std::vector<float>{nan, 1.f, 3.f, 3.f, 0.f},
                                           std::vector<float>{1.f, nan, 3.f, nan, 3.f},
                                           std::vector<float>{nan, nan, nan, nan, nan}}) {
    const DeviceLogits on_device(logits);
    device.set_penalized({}, stream.get());
    vle::Sampler cpu(0);
    EXPECT_EQ(device.next_token(on_device.f32.data(), vle::DType::kFloat32, {}, 0.0, stream.get()),
              cpu.sample(logits.data(), 5, {}, {}));
  }
}

TEST(CudaSampling, SampledTokensMatchTheCpuForTheSameDraw) {
  VLE_REQUIRE_GPU();
  std::mt19937 rng(fresh_seed());
  vle::cuda::Stream stream;
  int compared = 0;
  for (const int64_t vocab : {int64_t{3}, int64_t{1000}, int64_t{32000}}) {
    vle::cuda::DeviceSampler device(vocab);
    for (int round = 0; round < 150; ++round) {
      const std::vector<float> logits = random_logits(rng, vocab);
      const DeviceLogits on_device(logits);
      vle::SamplingParams params;
      params.do_sample = true;
      params.temperature = 0.2 + (rng() % 100) / 40.0;
      const int64_t ks[] = {0, 1, 5, 50, vocab, vocab + 3};
      params.top_k = ks[rng() % 6];
      const double ps[] = {1.0, 0.95, 0.7, 0.3, 0.0};
      params.top_p = ps[rng() % 5];
      params.repetition_penalty = rng() % 2 ? 1.3 : 1.0;
      const std::vector<int64_t> penalized = random_ids(rng, vocab);
      device.set_penalized(penalized, stream.get());
      const uint64_t seed = rng();
      vle::Sampler cpu(seed), draws(seed);
      SCOPED_TRACE("vocab " + std::to_string(vocab) + ", T " + std::to_string(params.temperature) + ", top_k " +
                   std::to_string(params.top_k) + ", top_p " + std::to_string(params.top_p) + ", penalty " +
                   std::to_string(params.repetition_penalty));
      for (int draw = 0; draw < 4; ++draw) {
        const vle::Tensor& t = draw % 2 ? on_device.f16 : on_device.f32;
        const std::vector<float>& seen = draw % 2 ? on_device.f16_as_float : logits;
        const int64_t want = cpu.sample(seen.data(), vocab, params, penalized);
        const double u = draws.uniform();
        EXPECT_EQ(device.next_token(t.data(), t.dtype(), params, u, stream.get()), want) << "u " << u;
        ++compared;
      }
    }
  }
  EXPECT_EQ(compared, 3 * 150 * 4);
}

TEST(CudaSampling, AddedPenaltiesActLikeTheCpuSet) {
  VLE_REQUIRE_GPU();
  std::mt19937 rng(fresh_seed());
  vle::cuda::Stream stream;
  const int64_t vocab = 500;
  vle::cuda::DeviceSampler device(vocab);
  std::vector<int64_t> penalized = random_ids(rng, vocab);
  device.set_penalized(penalized, stream.get());
  vle::SamplingParams params;
  params.repetition_penalty = 2.5;
  // Greedy with a strong penalty walks through the likely tokens one after the other, as decoding does.
  std::vector<float> logits = random_logits(rng, vocab);
  for (float& x : logits) x = std::abs(x) + 0.5f;
  const DeviceLogits on_device(logits);
  vle::Sampler cpu(0);
  for (int step = 0; step < 30; ++step) {
    const int64_t want = cpu.sample(logits.data(), vocab, params, penalized);
    ASSERT_EQ(device.next_token(on_device.f32.data(), vle::DType::kFloat32, params, 0.0, stream.get()), want)
        << "step " << step;
    penalized.push_back(want);
    device.add_penalized(want, stream.get());
  }
  EXPECT_THROW(device.add_penalized(vocab, stream.get()), std::invalid_argument);
  EXPECT_THROW(device.set_penalized({-1}, stream.get()), std::invalid_argument);
}

TEST(CudaSampling, NoFiniteLogitIsTheCpuError) {
  VLE_REQUIRE_GPU();
  vle::cuda::Stream stream;
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> logits(100, -inf);
  const DeviceLogits on_device(logits);
  vle::cuda::DeviceSampler device(100);
  device.set_penalized({}, stream.get());
  vle::SamplingParams params;
  params.do_sample = true;
  vle::Sampler cpu(1);
  EXPECT_THROW(cpu.sample(logits.data(), 100, params, {}), std::invalid_argument);
  EXPECT_THROW(device.next_token(on_device.f32.data(), vle::DType::kFloat32, params, 0.5, stream.get()),
               std::invalid_argument);
  params.temperature = 0.0;
  EXPECT_THROW(device.next_token(on_device.f32.data(), vle::DType::kFloat32, params, 0.5, stream.get()),
               std::invalid_argument);
}

}  // namespace
