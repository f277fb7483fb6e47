// The benchmarks' summary statistic (loop/summary.h) against numpy's percentile and median, and the
// denoising loop's per-step times (the stats' diffusion_step_ms_*): one per scheduler step, each covering
// its UNet call. The timing keys of whole requests (link, denoise, diffusion_steps) are checked through the
// Pipeline on the tiny-random artifact in tests/test_pipeline_timings.py, and `vle-run --bench` in
// tests/test_vle_run.py.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "loop/diffusion.h"
#include "loop/summary.h"
#include "test_util.h"
#include "visionllm_edge/errors.h"

namespace {

using vle::test_util::message_of;

// --- the statistic ------------------------------------------------------------------------------------------

TEST(Percentile, InterpolatesLinearlyBetweenOrderStatistics) {
  // 1..10 shuffled: the 90th percentile is at index 9 * 0.9 = 8.1, between 9 and 10; the median between 5, 6.
  const std::vector<double> v = {7, 3, 10, 1, 5, 9, 2, 8, 6, 4};
  EXPECT_DOUBLE_EQ(vle::percentile(v, 90), 9.1);
  EXPECT_DOUBLE_EQ(vle::median(v), 5.5);
  EXPECT_DOUBLE_EQ(vle::percentile(v, 50), 5.5);
  EXPECT_EQ(vle::percentile(v, 0), 1.0);
  EXPECT_EQ(vle::percentile(v, 100), 10.0);
  EXPECT_DOUBLE_EQ(vle::percentile({3, 1, 2}, 90), 2.8);   // index 1.8: 2 + 0.8
  EXPECT_DOUBLE_EQ(vle::percentile({5, 1}, 90), 4.6);      // index 0.9: 1 + 0.9 * 4
  EXPECT_EQ(vle::median({5, 1}), 3.0);
  EXPECT_EQ(vle::median({4, 1, 9}), 4.0);
  for (double q : {0.0, 37.5, 90.0, 100.0}) EXPECT_EQ(vle::percentile({2.5}, q), 2.5) << q;
}

TEST(Percentile, RoundsAsNumpyDoesAboveHalfway) {
  // Past the midpoint numpy interpolates from the upper neighbour, b - (b - a)(1 - t), which differs from
  // a + (b - a) t in the last bit for these values. Expected: float(np.percentile(v, 90)).hex() and
  // float(np.median(v)).hex() with numpy 2.4.6 (values drawn by np.random.default_rng(1).uniform(0, 100)).
  const std::vector<double> four = {0x1.4a31f3bc44bfdp+6, 0x1.07362d2520feep+4, 0x1.2c1e1ad994901p+5,
                                    0x1.fac7f3f93b75dp+4};
  EXPECT_EQ(vle::percentile(four, 90), 0x1.14277b71399bfp+6);
  EXPECT_EQ(vle::median(four), 0x1.14c10a6b19258p+5);
  const std::vector<double> two = {0x1.1db70a92a6c20p+4, 0x1.3d014313e0579p+5};
  EXPECT_EQ(vle::percentile(two, 90), 0x1.2b97167f9f0bbp+5);
  EXPECT_EQ(vle::median(two), 0x1.cbdcc85d33b89p+4);
  // The plain formula gives another double here: the test tells the two apart.
  const double a = two[0], b = two[1], t = 0.9;
  EXPECT_NE(a + (b - a) * t, vle::percentile(two, 90));
}

TEST(Summary, NamesTheFiguresOfOneQuantity) {
  const vle::Summary s = vle::summarize({4, 8, 1, 6, 2});
  EXPECT_EQ(s.min, 1.0);
  EXPECT_EQ(s.max, 8.0);
  EXPECT_EQ(s.median, 4.0);
  EXPECT_DOUBLE_EQ(s.p90, 7.2);  // index 3.6 of 1 2 4 6 8: 6 + 0.6 * 2
  EXPECT_EQ(s.n, 5);
  EXPECT_LE(s.min, s.median);
  EXPECT_LE(s.median, s.p90);
  EXPECT_LE(s.p90, s.max);
}

TEST(Summary, RefusesNoValuesANaNAndAQuantileOutOfRange) {
  using vle::InputError;
  EXPECT_EQ(message_of<InputError>([] { vle::summarize({}); }), "summary: no values to summarise");
  EXPECT_EQ(message_of<InputError>([] { vle::median({1.0, std::nan("")}); }), "median: a value is NaN");
  EXPECT_EQ(message_of<InputError>([] { vle::percentile({1.0}, 100.5); }),
            "percentile: q must be in [0, 100], got 100.5");
  EXPECT_EQ(message_of<InputError>([] { vle::percentile({1.0}, -1); }), "percentile: q must be in [0, 100], got -1.0");
}

// --- the denoising loop's steps ---------------------------------------------------------------------------

TEST(DenoiseSteps, OneTimePerSchedulerStepEachCoveringItsUNetCall) {
  constexpr int64_t kSteps = 4;
  const int64_t n = 1, length = 2, width = 3, channels = 4, side = 2;
  std::vector<float> cond(static_cast<size_t>(n * length * width), 0.5f);
  std::vector<float> uncond(static_cast<size_t>(length * width), 0.0f);
  std::vector<float> noise(static_cast<size_t>(n * channels * side * side), 0.25f);
  // Step i's UNet call takes at least (i + 1) * 3 ms.
  std::vector<int> sleeps_ms;
  const vle::UNetFn unet = [&](const vle::TensorView&, const vle::TensorView&, const vle::TensorView&,
                               const vle::TensorView& out) {
    const int ms = 3 * (static_cast<int>(sleeps_ms.size()) + 1);
    sleeps_ms.push_back(ms);
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    std::fill_n(static_cast<float*>(out.data), out.numel(), 0.1f);
  };
  std::vector<double> step_ms = {-1.0};  // appended to, not replaced
  const auto start = std::chrono::steady_clock::now();
  vle::denoise(unet, {vle::DType::kFloat32, {n, length, width}, cond.data()},
               {vle::DType::kFloat32, {1, length, width}, uncond.data()},
               {vle::DType::kFloat32, {n, channels, side, side}, noise.data()}, kSteps, 7.5, std::nullopt, 1.5, {},
               &step_ms);
  const double whole_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();

  ASSERT_EQ(step_ms.size(), 1u + vle::DDIMSchedule(kSteps).timesteps().size());
  EXPECT_EQ(step_ms[0], -1.0);
  ASSERT_EQ(sleeps_ms.size(), static_cast<size_t>(kSteps));
  for (size_t i = 0; i < sleeps_ms.size(); ++i) EXPECT_GE(step_ms[i + 1], sleeps_ms[i]) << "step " << i;
  EXPECT_LE(std::accumulate(step_ms.begin() + 1, step_ms.end(), 0.0), whole_ms);
}

}  // namespace
