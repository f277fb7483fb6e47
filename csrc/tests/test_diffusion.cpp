// The DDIM schedule against its formulas (computed here, in long double), the scheduler facts parser, and
// the loop's wiring: which batch, context and image channels the UNet sees, how guidance combines them, and
// what the loop refuses. tests/test_core_diffusion.py checks the loop's numbers against the torch reference.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "loop/diffusion.h"
#include "visionllm_edge/errors.h"

namespace {

using vle::DDIMConfig;
using vle::DDIMSchedule;
using vle::DType;
using vle::TensorView;

// EXPECT_THROW that also checks the message holds `text`.
template <typename Error, typename F>
void expect_error(F&& f, const std::string& text) {
  try {
    f();
    ADD_FAILURE() << "no exception; expected one saying: " << text;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
  }
}

TensorView view(std::vector<float>& data, std::vector<int64_t> shape) {
  return {DType::kFloat32, std::move(shape), data.data()};
}

std::vector<float> filled(size_t n, float start, float stride) {
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = start + stride * static_cast<float>(i % 7) - 0.3f * (i % 3);
  return out;
}

// --- schedule ----------------------------------------------------------------------------------------------

TEST(DDIMSchedule, TimestepsAreLeadingSpacedWithTheOffset) {
  EXPECT_EQ(vle::ddim_timesteps(1), (std::vector<int64_t>{1}));
  EXPECT_EQ(vle::ddim_timesteps(4), (std::vector<int64_t>{751, 501, 251, 1}));
  EXPECT_EQ(vle::ddim_timesteps(3), (std::vector<int64_t>{667, 334, 1}));  // ratio 333
  for (int64_t steps : {7, 20, 50, 999}) {
    const std::vector<int64_t> t = DDIMSchedule(steps).timesteps();
    ASSERT_EQ(static_cast<int64_t>(t.size()), steps);
    for (int64_t i = 0; i < steps; ++i) EXPECT_EQ(t[i], (steps - 1 - i) * (1000 / steps) + 1) << steps;
  }
  EXPECT_EQ(DDIMSchedule(50).timesteps().front(), 981);
  EXPECT_EQ(vle::ddim_timesteps(5, 100, 0), (std::vector<int64_t>{80, 60, 40, 20, 0}));
}

TEST(DDIMSchedule, AlphasCumprodFollowTheScaledLinearBetas) {
  for (const DDIMConfig& config : {DDIMConfig{}, DDIMConfig{10, 0.001, 0.02}, DDIMConfig{1, 0.1, 0.1}}) {
    const std::vector<double> got = vle::alphas_cumprod(config);
    ASSERT_EQ(static_cast<int64_t>(got.size()), config.train_timesteps);
    const long double lo = std::sqrt(static_cast<long double>(config.beta_start));
    const long double hi = std::sqrt(static_cast<long double>(config.beta_end));
    long double product = 1;
    for (int64_t i = 0; i < config.train_timesteps; ++i) {
      const int64_t last = config.train_timesteps - 1;
      const long double f = last > 0 ? static_cast<long double>(i) / last : 0;
      const long double root = lo + f * (hi - lo);
      product *= 1 - root * root;
      EXPECT_NEAR(got[i], static_cast<double>(product), 1e-13 * static_cast<double>(product)) << i;
    }
  }
  const std::vector<double> sd = vle::alphas_cumprod(DDIMConfig{});
  EXPECT_DOUBLE_EQ(sd.front(), 1.0 - 0.00085);
  EXPECT_NEAR(sd.back(), 0.0046, 0.0001);  // SD-1.5's last alpha_cumprod, about 0.00466
}

TEST(DDIMSchedule, AlphasPairEachTimestepWithThePreviousOne) {
  const DDIMSchedule s(20);
  const std::vector<double>& ac = s.alphas_cumprod();
  EXPECT_EQ(s.alphas(951), std::make_pair(ac[951], ac[901]));
  EXPECT_EQ(s.alphas(51), std::make_pair(ac[51], ac[1]));
  // The step after the last timestep lands on alphas_cumprod[0] (set_alpha_to_one false) ...
  EXPECT_EQ(s.alphas(1), std::make_pair(ac[1], ac[0]));
  EXPECT_EQ(s.final_alpha_cumprod(), ac[0]);
  // ... or on 1.
  DDIMConfig one;
  one.set_alpha_to_one = true;
  EXPECT_EQ(DDIMSchedule(20, one).alphas(1).second, 1.0);
  expect_error<vle::InputError>([&] { s.alphas(1000); }, "timestep must be in [0, 1000), got 1000");
  expect_error<vle::InputError>([&] { s.alphas(-1); }, "timestep must be in [0, 1000), got -1");
}

TEST(DDIMSchedule, StepIsTheDDIMUpdate) {
  const DDIMSchedule s(10);
  std::vector<float> x = {0.5f, -1.25f, 2.0f, 0.0f};
  const std::vector<float> eps = {0.1f, 0.7f, -0.4f, 1.0f};
  const std::vector<float> before = x;
  for (int64_t t : s.timesteps()) {
    const auto [a, a_prev] = s.alphas(t);
    std::vector<double> want(x.size());
    for (size_t k = 0; k < x.size(); ++k) {
      const double x0 = (x[k] - std::sqrt(1 - a) * eps[k]) / std::sqrt(a);
      want[k] = std::sqrt(a_prev) * x0 + std::sqrt(1 - a_prev) * eps[k];
    }
    s.step(eps.data(), t, x.data(), static_cast<int64_t>(x.size()));
    for (size_t k = 0; k < x.size(); ++k) EXPECT_NEAR(x[k], want[k], 1e-5 * (1 + std::fabs(want[k]))) << t;
  }
  EXPECT_NE(x, before);
}

TEST(DDIMSchedule, RefusesStepsOutsideTheSchedule) {
  expect_error<vle::InputError>([] { DDIMSchedule(0); }, "steps must be an int in [1, 1000], got 0");
  expect_error<vle::InputError>([] { DDIMSchedule(1001); }, "steps must be an int in [1, 1000], got 1001");
  expect_error<vle::InputError>([] { DDIMSchedule(1000); },
                                "1000 steps with steps_offset 1 start at timestep 1000, outside [0, 1000)");
}

// --- the scheduler constants -------------------------------------------------------------------------------

nlohmann::json sd15_facts() {
  return {{"train_timesteps", 1000},      {"beta_start", 0.00085},         {"beta_end", 0.012},
          {"beta_schedule", "scaled_linear"}, {"timestep_spacing", "leading"}, {"steps_offset", 1},
          {"set_alpha_to_one", false},    {"prediction_type", "epsilon"},  {"clip_sample", false},
          {"eta", 0.0},                   {"init_noise_sigma", 1}};
}

TEST(DDIMConfig, FromFactsReadsEveryKey) {
  nlohmann::json facts = sd15_facts();
  facts["steps_offset"] = 0;
  facts["set_alpha_to_one"] = true;
  facts["beta_end"] = 0.02;
  const DDIMConfig c = DDIMConfig::from_facts(facts);
  EXPECT_EQ(c.steps_offset, 0);
  EXPECT_TRUE(c.set_alpha_to_one);
  EXPECT_EQ(c.beta_end, 0.02);
  EXPECT_EQ(c.init_noise_sigma, 1.0);  // an integer is a fine float
}

TEST(DDIMConfig, FromFactsNamesTheKey) {
  auto with = [](const char* key, nlohmann::json value) {
    nlohmann::json facts = sd15_facts();
    facts[key] = std::move(value);
    return facts;
  };
  auto refuses = [](const nlohmann::json& facts, const std::string& text) {
    expect_error<vle::ArtifactError>([&] { DDIMConfig::from_facts(facts); }, text);
  };
  refuses(nlohmann::json::array(), "scheduler facts must be an object, got list");
  refuses(with("eta2", 0.0), "scheduler facts: unknown key(s) ['eta2']");
  nlohmann::json missing = sd15_facts();
  missing.erase("steps_offset");
  missing.erase("eta");
  refuses(missing, "scheduler facts: missing key(s) ['eta', 'steps_offset']");
  refuses(with("train_timesteps", 1000.0), "scheduler facts: 'train_timesteps' must be int, got float");
  refuses(with("steps_offset", true), "scheduler facts: 'steps_offset' must be int, got bool");
  refuses(with("set_alpha_to_one", 0), "scheduler facts: 'set_alpha_to_one' must be bool, got int");
  refuses(with("beta_start", "0.1"), "scheduler facts: 'beta_start' must be float, got str");
  refuses(with("timestep_spacing", "trailing"),
          "DDIM timestep_spacing must be 'leading' (the only one implemented), got 'trailing'");
  refuses(with("eta", 0.5), "DDIM eta must be 0.0 (the only one implemented), got 0.5");
  refuses(with("clip_sample", true), "DDIM clip_sample must be False (the only one implemented), got True");
  refuses(with("train_timesteps", 0), "DDIM train_timesteps must be >= 1, got 0");
  refuses(with("beta_end", 0.0001),
          "DDIM betas must satisfy 0 < beta_start <= beta_end < 1, got 0.00085, 0.0001");
}

// --- the loop ----------------------------------------------------------------------------------------------

// A UNet that records what it was given and predicts, for each row, a constant read off its context's first
// value (so conditional and unconditional rows predict different noise).
struct RecordingUNet {
  std::vector<std::vector<int64_t>> sample_shapes, timesteps;
  std::vector<std::vector<float>> samples, contexts;

  vle::UNetFn fn() {
    return [this](const TensorView& sample, const TensorView& timestep, const TensorView& context,
                  const TensorView& out) {
      sample_shapes.push_back(sample.shape);
      const auto* s = static_cast<const float*>(sample.data);
      samples.emplace_back(s, s + sample.numel());
      const auto* t = static_cast<const int64_t*>(timestep.data);
      timesteps.emplace_back(t, t + timestep.numel());
      const auto* c = static_cast<const float*>(context.data);
      contexts.emplace_back(c, c + context.numel());
      const int64_t rows = out.shape[0], per_row = out.numel() / rows, per_context = context.numel() / rows;
      auto* o = static_cast<float*>(out.data);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t k = 0; k < per_row; ++k) o[r * per_row + k] = 0.1f * c[r * per_context] + 0.01f;
      }
    };
  }
};

// What the loop should give for a UNet whose guided noise is the constant `eps` everywhere.
std::vector<float> constant_noise_loop(std::vector<float> x, float eps, int64_t steps) {
  const DDIMSchedule s(steps);
  const std::vector<float> e(x.size(), eps);
  for (int64_t t : s.timesteps()) s.step(e.data(), t, x.data(), static_cast<int64_t>(x.size()));
  return x;
}

std::vector<float> as_vector(const vle::Tensor& t) {
  return {t.data_as<float>(), t.data_as<float>() + t.numel()};
}

constexpr int64_t kN = 2, kL = 3, kD = 2, kC = 2, kH = 2, kW = 3;

struct Inputs {
  std::vector<float> cond = std::vector<float>(kN * kL * kD, 1.0f);     // first value 1: eps 0.11
  std::vector<float> uncond = std::vector<float>(kL * kD, 0.0f);        // batch 1, eps 0.01
  std::vector<float> noise = filled(kN * kC * kH * kW, 0.25f, 0.5f);
  std::vector<float> image = filled(kN * kC * kH * kW, -1.0f, 0.125f);
  TensorView cond_view() { return view(cond, {kN, kL, kD}); }
  TensorView uncond_view() { return view(uncond, {1, kL, kD}); }
  TensorView noise_view() { return view(noise, {kN, kC, kH, kW}); }
  TensorView image_view() { return view(image, {kN, kC, kH, kW}); }
};

TEST(Denoise, GenerationGuidanceRunsUncondThenCond) {
  Inputs in;
  RecordingUNet unet;
  const vle::Tensor out = vle::denoise(unet.fn(), in.cond_view(), in.uncond_view(), in.noise_view(), 4, 7.5);
  ASSERT_EQ(unet.timesteps.size(), 4u);
  EXPECT_EQ(unet.timesteps[0], (std::vector<int64_t>(2 * kN, 751)));
  EXPECT_EQ(unet.timesteps[3], (std::vector<int64_t>(2 * kN, 1)));
  EXPECT_EQ(unet.sample_shapes[0], (std::vector<int64_t>{2 * kN, kC, kH, kW}));
  // Context rows: [uncond (broadcast), uncond, cond, cond].
  const std::vector<float>& ctx = unet.contexts[0];
  for (int64_t r = 0; r < 2 * kN; ++r) EXPECT_EQ(ctx[r * kL * kD], r < kN ? 0.0f : 1.0f) << r;
  // The first step's sample is the noise, once per half.
  const int64_t plane = kC * kH * kW;
  for (int64_t r = 0; r < 2 * kN; ++r) {
    EXPECT_EQ(0, std::memcmp(unet.samples[0].data() + r * plane, in.noise.data() + (r % kN) * plane,
                             sizeof(float) * plane));
  }
  EXPECT_EQ(out.shape(), (std::vector<int64_t>{kN, kC, kH, kW}));
  const float eps = 0.01f + 7.5f * (0.11f - 0.01f);
  EXPECT_EQ(as_vector(out), constant_noise_loop(in.noise, eps, 4));
}

TEST(Denoise, NoGuidanceAtScaleOne) {
  Inputs in;
  RecordingUNet unet;
  const vle::Tensor out = vle::denoise(unet.fn(), in.cond_view(), in.uncond_view(), in.noise_view(), 3, 1.0);
  EXPECT_EQ(unet.sample_shapes[0], (std::vector<int64_t>{kN, kC, kH, kW}));
  EXPECT_EQ(unet.contexts[0], in.cond);
  EXPECT_EQ(as_vector(out), constant_noise_loop(in.noise, 0.11f, 3));
}

TEST(Denoise, EditingRunsThreeWayWithImageImageZeros) {
  Inputs in;
  RecordingUNet unet;
  const vle::Tensor out =
      vle::denoise(unet.fn(), in.cond_view(), in.uncond_view(), in.noise_view(), 2, 7.5, in.image_view(),
                   1.5);
  const int64_t plane = kC * kH * kW;
  EXPECT_EQ(unet.sample_shapes[0], (std::vector<int64_t>{3 * kN, 2 * kC, kH, kW}));
  for (size_t step = 0; step < 2; ++step) {
    const std::vector<float>& s = unet.samples[step];
    for (int64_t r = 0; r < 3 * kN; ++r) {
      const float* image_part = s.data() + (r * 2 + 1) * plane;
      if (r < 2 * kN) {
        EXPECT_EQ(0, std::memcmp(image_part, in.image.data() + (r % kN) * plane, sizeof(float) * plane)) << r;
      } else {
        EXPECT_EQ(std::vector<float>(image_part, image_part + plane), std::vector<float>(plane, 0.0f)) << r;
      }
    }
  }
  // Context rows: [cond, cond, uncond, uncond, uncond, uncond].
  for (int64_t r = 0; r < 3 * kN; ++r) EXPECT_EQ(unet.contexts[0][r * kL * kD], r < kN ? 1.0f : 0.0f) << r;
  // eps_ci = 0.11, eps_ui = eps_u0 = 0.01.
  const float eps = (0.01f + 7.5f * (0.11f - 0.01f)) + 1.5f * (0.01f - 0.01f);
  EXPECT_EQ(as_vector(out), constant_noise_loop(in.noise, eps, 2));
}

TEST(Denoise, EditingWithoutGuidanceStillSeesTheImage) {
  Inputs in;
  RecordingUNet unet;
  vle::denoise(unet.fn(), in.cond_view(), in.uncond_view(), in.noise_view(), 2, 7.5, in.image_view(), 0.5);
  const int64_t plane = kC * kH * kW;
  EXPECT_EQ(unet.sample_shapes[0], (std::vector<int64_t>{kN, 2 * kC, kH, kW}));
  for (int64_t r = 0; r < kN; ++r) {
    EXPECT_EQ(0, std::memcmp(unet.samples[1].data() + (r * 2 + 1) * plane, in.image.data() + r * plane,
                             sizeof(float) * plane));
  }
  EXPECT_EQ(vle::guidance_batch(kN, 7.5, true, 0.5), kN);
  EXPECT_EQ(vle::guidance_batch(kN, 1.0, true, 1.5), kN);
  EXPECT_EQ(vle::guidance_batch(kN, 1.5, true, 1.0), 3 * kN);
  EXPECT_EQ(vle::guidance_batch(kN, 1.0, false, 1.5), kN);
}

TEST(Denoise, RefusesBadInputsNamingThem) {
  Inputs in;
  RecordingUNet unet;
  std::vector<float> three_uncond(3 * kL * kD);
  expect_error<vle::InputError>(
      [&] {
        vle::denoise(unet.fn(), in.cond_view(), view(three_uncond, {3, kL, kD}), in.noise_view(), 2, 7.5);
      },
      "uncond must have shape [1 or 2, 3, 2], got [3, 3, 2]");
  expect_error<vle::InputError>(
      [&] {
        const TensorView one = view(in.noise, {1, 2 * kC, kH, kW});
        vle::denoise(unet.fn(), in.cond_view(), in.uncond_view(), one, 2, 7.5);
      },
      "noise must have shape [2, C, h, w] (n from cond), got [1, 4, 2, 3]");
  expect_error<vle::InputError>(
      [&] {
        vle::denoise(unet.fn(), in.cond_view(), in.uncond_view(), in.noise_view(), 2, 7.5,
                     view(in.image, {kN, kC, kW, kH}));
      },
      "image_latents must have the shape of noise [2, 2, 2, 3], got [2, 2, 3, 2]");
  TensorView half = in.cond_view();
  half.dtype = DType::kFloat16;
  expect_error<vle::InputError>(
      [&] { vle::denoise(unet.fn(), half, in.uncond_view(), in.noise_view(), 2, 7.5); },
      "cond must be float32, got float16");
  expect_error<vle::InputError>(
      [&] { vle::denoise(unet.fn(), in.cond_view(), in.uncond_view(), in.noise_view(), 0, 7.5); },
      "steps must be an int in [1, 1000], got 0");
  EXPECT_TRUE(unet.timesteps.empty());  // nothing ran
}

TEST(Denoise, AUNetFailurePassesThrough) {
  Inputs in;
  int calls = 0;
  auto failing = [&](const TensorView&, const TensorView&, const TensorView&, const TensorView&) {
    if (++calls == 2) throw vle::EngineError("gen_unet: out of memory");
  };
  expect_error<vle::EngineError>(
      [&] { vle::denoise(failing, in.cond_view(), in.uncond_view(), in.noise_view(), 5, 7.5); },
      "gen_unet: out of memory");
  EXPECT_EQ(calls, 2);
}

}  // namespace
