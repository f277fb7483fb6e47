// The denoising loop of the [GEN] and [EDIT] decoders: the DDIM schedule, classifier-free guidance and the
// loop that calls the UNet once per step on the whole guidance batch.
//
// * DDIM with eta 0 over SD-1.5's training schedule: scaled-linear betas, "leading" timestep spacing with an
//   offset, the step after the last timestep landing on alphas_cumprod[0] (unless set_alpha_to_one),
//   epsilon prediction, x0 not clipped.
// * Generation: UNet batch [uncond, cond], eps = eps_u + g * (eps_c - eps_u); skipped when g <= 1.
// * Editing (InstructPix2Pix): UNet batch [cond, uncond, uncond], the image latents [image, image, zeros]
//   concatenated on channels, eps = eps_u0 + g * (eps_ci - eps_ui) + g_img * (eps_ui - eps_u0); skipped
//   unless g > 1 and g_img >= 1.
//
// The schedule is computed in float64 and every tensor operation in float32, one rounding per operation in
// the order the PyTorch reference (export/models/diffusion.py) uses, so the two agree to
// float32 rounding.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "memory/tensor.h"

namespace vle {

// The scheduler constants (diffusers' DDIMScheduler settings as SD-1.5 and InstructPix2Pix ship them); the
// manifest carries them as the decoder's `scheduler` facts. Only what the loop implements is accepted:
// `check()` refuses another beta schedule, spacing, prediction type, clipping, eta or noise sigma rather
// than run a silently different loop.
struct DDIMConfig {
  int64_t train_timesteps = 1000;
  double beta_start = 0.00085;
  double beta_end = 0.012;
  std::string beta_schedule = "scaled_linear";
  std::string timestep_spacing = "leading";
  int64_t steps_offset = 1;
  bool set_alpha_to_one = false;
  std::string prediction_type = "epsilon";
  bool clip_sample = false;
  double eta = 0.0;
  double init_noise_sigma = 1.0;

  // ArtifactError naming the setting when the loop cannot run these constants.
  void check() const;
  // Reads the `scheduler` facts strictly: every key above exactly once, integers as integers (never 1000.0
  // or true), numbers for the floats, booleans for the flags; then check(). ArtifactError naming the key.
  static DDIMConfig from_facts(const nlohmann::json& facts);
};

// The timesteps of `steps` inference steps, highest first: i * (train_timesteps / steps) + steps_offset for
// i = steps - 1 .. 0 (for 50 steps: 981, 961, ..., 1). InputError unless 1 <= steps <= train_timesteps.
std::vector<int64_t> ddim_timesteps(int64_t steps, int64_t train_timesteps = 1000, int64_t steps_offset = 1);

// Cumulative products of 1 - beta over the training schedule, float64 [train_timesteps]; scaled-linear betas
// are linear in sqrt(beta).
std::vector<double> alphas_cumprod(const DDIMConfig& config);

// Deterministic DDIM (eta 0) for one number of steps.
class DDIMSchedule {
 public:
  // InputError when `steps` is out of range or its first timestep falls outside the schedule (1000 steps
  // with offset 1 would start at 1000); the config is checked first.
  explicit DDIMSchedule(int64_t steps, const DDIMConfig& config = {});

  int64_t steps() const { return steps_; }
  const DDIMConfig& config() const { return config_; }
  const std::vector<int64_t>& timesteps() const { return timesteps_; }
  const std::vector<double>& alphas_cumprod() const { return alphas_cumprod_; }
  // What the step after the last timestep uses: alphas_cumprod[0], or 1 with set_alpha_to_one.
  double final_alpha_cumprod() const { return final_alpha_cumprod_; }

  // (alpha_cumprod[t], alpha_cumprod[t_prev]) of a step from `timestep`; InputError outside the schedule.
  std::pair<double, double> alphas(int64_t timestep) const;
  // One update of `count` values in place, from `timestep` to the previous one:
  // x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t), x = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps.
  void step(const float* eps, int64_t timestep, float* sample, int64_t count) const;

 private:
  int64_t steps_;
  DDIMConfig config_;
  std::vector<int64_t> timesteps_;
  std::vector<double> alphas_cumprod_;
  double final_alpha_cumprod_;
};

// The UNet, called once per step on the guidance batch B:
//   sample [B, C_in, h, w] float32, timestep [B] int64, context [B, L, D] float32 -> noise_pred [B, C, h, w]
//   float32, written by the callee into the buffer it is given (an engine binds it as its output).
// The views are valid for the call only.
using UNetFn = std::function<void(const TensorView& sample, const TensorView& timestep,
                                  const TensorView& context, const TensorView& noise_pred)>;

// The size of the UNet batch for `n` requests: 2n for guided generation, 3n for guided editing, else n.
int64_t guidance_batch(int64_t n, double guidance, bool editing, double image_guidance);

// Runs the DDIM loop with guidance and returns the final latents [n, C, h, w] float32 (VAE-decode them next).
// Generation without `image_latents`, editing with them (the source image's latent mode, shaped like noise).
//   cond    [n, L, D]       the mapper's output
//   uncond  [1 or n, L, D]  the unconditional context
//   noise   [n, C, h, w]    the initial noise
// All float32 in host memory. InputError naming the argument on anything else; exceptions thrown by `unet`
// pass through. With `step_ms`, each step's wall time in milliseconds is appended to it, one per timestep:
// the UNet call on the guidance batch with its input copies, the guidance and the scheduler update.
Tensor denoise(const UNetFn& unet, const TensorView& cond, const TensorView& uncond, const TensorView& noise,
               int64_t steps, double guidance, const std::optional<TensorView>& image_latents = std::nullopt,
               double image_guidance = 1.5, const DDIMConfig& config = {}, std::vector<double>* step_ms = nullptr);

}  // namespace vle
