#include "loop/diffusion.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>

#include <nlohmann/json.hpp>

#include "visionllm_edge/errors.h"

namespace vle {

namespace {

// A number as Python's repr writes it (shortest text that reads back the same; "1.0", not "1"), so the
// messages read like the Python SDK's.
std::string python_float(double v) {
  char buf[32];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*g", precision, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string s(buf);
  if (std::isfinite(v) && s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

std::string python_bool(bool v) { return v ? "True" : "False"; }
std::string python_str(const std::string& v) { return "'" + v + "'"; }

// The name Python gives the type of a JSON value once read (`json.loads`).
const char* python_type_name(const nlohmann::json& v) {
  switch (v.type()) {
    case nlohmann::json::value_t::null:
      return "NoneType";
    case nlohmann::json::value_t::boolean:
      return "bool";
    case nlohmann::json::value_t::number_integer:
    case nlohmann::json::value_t::number_unsigned:
      return "int";
    case nlohmann::json::value_t::number_float:
      return "float";
    case nlohmann::json::value_t::string:
      return "str";
    case nlohmann::json::value_t::array:
      return "list";
    case nlohmann::json::value_t::object:
      return "dict";
    default:
      return "bytes";
  }
}

// "['a', 'b']", as Python prints a sorted list of keys.
std::string python_list(const std::set<std::string>& keys) {
  std::string out = "[";
  for (const std::string& k : keys) out += (out.size() > 1 ? ", " : "") + python_str(k);
  return out + "]";
}

void require_float32_host(const TensorView& v, const std::string& name) {
  if (v.dtype != DType::kFloat32) {
    throw InputError(name + " must be float32, got " + dtype_name(v.dtype));
  }
  if (v.memory != MemoryKind::kHost) throw InputError(name + " must be in host memory");
  if (v.data == nullptr && v.numel() > 0) throw InputError(name + " has no data");
}

}  // namespace

// --- the scheduler constants -------------------------------------------------------------------------------

void DDIMConfig::check() const {
  auto fixed = [](const char* key, const std::string& want, const std::string& got) {
    if (want != got) {
      throw ArtifactError(std::string("DDIM ") + key + " must be " + want +
                          " (the only one implemented), got " + got);
    }
  };
  fixed("beta_schedule", python_str("scaled_linear"), python_str(beta_schedule));
  fixed("timestep_spacing", python_str("leading"), python_str(timestep_spacing));
  fixed("prediction_type", python_str("epsilon"), python_str(prediction_type));
  fixed("clip_sample", python_bool(false), python_bool(clip_sample));
  fixed("eta", python_float(0.0), python_float(eta));
  fixed("init_noise_sigma", python_float(1.0), python_float(init_noise_sigma));
  if (train_timesteps < 1) {
    throw ArtifactError("DDIM train_timesteps must be >= 1, got " + std::to_string(train_timesteps));
  }
  if (!(0.0 < beta_start && beta_start <= beta_end && beta_end < 1.0)) {
    throw ArtifactError("DDIM betas must satisfy 0 < beta_start <= beta_end < 1, got " +
                        python_float(beta_start) + ", " + python_float(beta_end));
  }
}

DDIMConfig DDIMConfig::from_facts(const nlohmann::json& facts) {
  if (!facts.is_object()) {
    throw ArtifactError(std::string("scheduler facts must be an object, got ") + python_type_name(facts));
  }
  enum class Kind { kInt, kFloat, kStr, kBool };
  DDIMConfig c;
  // Field order, as the messages check them.
  const std::vector<std::pair<const char*, Kind>> keys = {
      {"train_timesteps", Kind::kInt},   {"beta_start", Kind::kFloat},    {"beta_end", Kind::kFloat},
      {"beta_schedule", Kind::kStr},     {"timestep_spacing", Kind::kStr}, {"steps_offset", Kind::kInt},
      {"set_alpha_to_one", Kind::kBool}, {"prediction_type", Kind::kStr}, {"clip_sample", Kind::kBool},
      {"eta", Kind::kFloat},             {"init_noise_sigma", Kind::kFloat}};
  std::set<std::string> known, unknown, missing;
  for (const auto& [key, kind] : keys) known.insert(key);
  for (const auto& item : facts.items()) {
    if (!known.count(item.key())) unknown.insert(item.key());
  }
  if (!unknown.empty()) throw ArtifactError("scheduler facts: unknown key(s) " + python_list(unknown));
  for (const std::string& key : known) {
    if (!facts.contains(key)) missing.insert(key);
  }
  if (!missing.empty()) throw ArtifactError("scheduler facts: missing key(s) " + python_list(missing));

  static const char* const kind_names[] = {"int", "float", "str", "bool"};
  for (const auto& [key, kind] : keys) {
    const nlohmann::json& v = facts.at(key);
    const bool ok = kind == Kind::kInt     ? v.is_number_integer()
                    : kind == Kind::kFloat ? v.is_number()
                    : kind == Kind::kStr   ? v.is_string()
                                           : v.is_boolean();
    if (!ok) {
      throw ArtifactError(std::string("scheduler facts: '") + key + "' must be " +
                          kind_names[static_cast<int>(kind)] + ", got " + python_type_name(v));
    }
  }
  c.train_timesteps = facts.at("train_timesteps").get<int64_t>();
  c.beta_start = facts.at("beta_start").get<double>();
  c.beta_end = facts.at("beta_end").get<double>();
  c.beta_schedule = facts.at("beta_schedule").get<std::string>();
  c.timestep_spacing = facts.at("timestep_spacing").get<std::string>();
  c.steps_offset = facts.at("steps_offset").get<int64_t>();
  c.set_alpha_to_one = facts.at("set_alpha_to_one").get<bool>();
  c.prediction_type = facts.at("prediction_type").get<std::string>();
  c.clip_sample = facts.at("clip_sample").get<bool>();
  c.eta = facts.at("eta").get<double>();
  c.init_noise_sigma = facts.at("init_noise_sigma").get<double>();
  c.check();
  return c;
}

// --- the schedule ------------------------------------------------------------------------------------------

std::vector<int64_t> ddim_timesteps(int64_t steps, int64_t train_timesteps, int64_t steps_offset) {
  if (steps < 1 || steps > train_timesteps) {
    throw InputError("steps must be an int in [1, " + std::to_string(train_timesteps) + "], got " +
                     std::to_string(steps));
  }
  const int64_t ratio = train_timesteps / steps;
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(steps));
  for (int64_t i = steps - 1; i >= 0; --i) out.push_back(i * ratio + steps_offset);
  return out;
}

std::vector<double> alphas_cumprod(const DDIMConfig& config) {
  // sqrt(beta) evenly spaced from sqrt(beta_start) to sqrt(beta_end) as numpy.linspace spaces it (i * step +
  // start, the last one exactly the end), squared; pow(x, 0.5) is what Python's `x ** 0.5` calls.
  const int64_t n = config.train_timesteps;
  const double first = std::pow(config.beta_start, 0.5);
  const double last = std::pow(config.beta_end, 0.5);
  const double step = n > 1 ? (last - first) / static_cast<double>(n - 1) : 0.0;
  std::vector<double> out(static_cast<size_t>(n));
  double product = 1.0;
  for (int64_t i = 0; i < n; ++i) {
    const double root = (n > 1 && i == n - 1) ? last : static_cast<double>(i) * step + first;
    const double beta = root * root;
    product = i == 0 ? 1.0 - beta : product * (1.0 - beta);
    out[static_cast<size_t>(i)] = product;
  }
  return out;
}

DDIMSchedule::DDIMSchedule(int64_t steps, const DDIMConfig& config) : steps_(steps), config_(config) {
  config_.check();
  timesteps_ = ddim_timesteps(steps, config_.train_timesteps, config_.steps_offset);
  if (timesteps_.front() >= config_.train_timesteps) {
    throw InputError(std::to_string(steps) + " steps with steps_offset " +
                     std::to_string(config_.steps_offset) + " start at timestep " +
                     std::to_string(timesteps_.front()) + ", outside [0, " +
                     std::to_string(config_.train_timesteps) + ")");
  }
  alphas_cumprod_ = vle::alphas_cumprod(config_);
  final_alpha_cumprod_ = config_.set_alpha_to_one ? 1.0 : alphas_cumprod_.front();
}

std::pair<double, double> DDIMSchedule::alphas(int64_t timestep) const {
  if (timestep < 0 || timestep >= config_.train_timesteps) {
    throw InputError("timestep must be in [0, " + std::to_string(config_.train_timesteps) + "), got " +
                     std::to_string(timestep));
  }
  const int64_t prev = timestep - config_.train_timesteps / steps_;
  const double alpha_prev = prev >= 0 ? alphas_cumprod_[static_cast<size_t>(prev)] : final_alpha_cumprod_;
  return {alphas_cumprod_[static_cast<size_t>(timestep)], alpha_prev};
}

void DDIMSchedule::step(const float* eps, int64_t timestep, float* sample, int64_t count) const {
  const auto [alpha, alpha_prev] = alphas(timestep);
  // The coefficients are rounded to float32 first, as the Python loop does, then one float32 rounding per
  // operation (this file is built without fused multiply-add).
  const auto noise_part = static_cast<float>(std::sqrt(1.0 - alpha));
  const auto signal_part = static_cast<float>(std::sqrt(alpha));
  const auto prev_signal = static_cast<float>(std::sqrt(alpha_prev));
  const auto prev_noise = static_cast<float>(std::sqrt(1.0 - alpha_prev));
  for (int64_t k = 0; k < count; ++k) {
    const float x0 = (sample[k] - noise_part * eps[k]) / signal_part;
    sample[k] = prev_signal * x0 + prev_noise * eps[k];
  }
}

// --- the loop ----------------------------------------------------------------------------------------------

int64_t guidance_batch(int64_t n, double guidance, bool editing, double image_guidance) {
  if (editing) return guidance > 1.0 && image_guidance >= 1.0 ? 3 * n : n;
  return guidance > 1.0 ? 2 * n : n;
}

Tensor denoise(const UNetFn& unet, const TensorView& cond, const TensorView& uncond, const TensorView& noise,
               int64_t steps, double guidance, const std::optional<TensorView>& image_latents,
               double image_guidance, const DDIMConfig& config, std::vector<double>* step_ms) {
  if (!unet) throw InputError("denoise: no UNet given");
  require_float32_host(cond, "cond");
  require_float32_host(uncond, "uncond");
  require_float32_host(noise, "noise");
  if (image_latents) require_float32_host(*image_latents, "image_latents");
  if (cond.shape.size() != 3 || cond.shape[0] < 1) {
    throw InputError("cond must have shape [n, L, D] with n >= 1, got " + shape_text(cond.shape));
  }
  const int64_t n = cond.shape[0], length = cond.shape[1], width = cond.shape[2];
  if (uncond.shape.size() != 3 || uncond.shape[1] != length || uncond.shape[2] != width ||
      (uncond.shape[0] != 1 && uncond.shape[0] != n)) {
    throw InputError("uncond must have shape [1 or " + std::to_string(n) + ", " + std::to_string(length) +
                     ", " + std::to_string(width) + "], got " + shape_text(uncond.shape));
  }
  if (noise.shape.size() != 4 || noise.shape[0] != n) {
    throw InputError("noise must have shape [" + std::to_string(n) + ", C, h, w] (n from cond), got " +
                     shape_text(noise.shape));
  }
  if (image_latents && image_latents->shape != noise.shape) {
    throw InputError("image_latents must have the shape of noise " + shape_text(noise.shape) + ", got " +
                     shape_text(image_latents->shape));
  }
  const DDIMSchedule schedule(steps, config);

  const bool editing = image_latents.has_value();
  const int64_t batch = guidance_batch(n, guidance, editing, image_guidance);
  const int64_t copies = batch / n;
  const bool guided = copies > 1;
  const int64_t channels = noise.shape[1], height = noise.shape[2], width_px = noise.shape[3];
  const int64_t plane = channels * height * width_px;      // one request's latents
  const int64_t in_plane = (editing ? 2 : 1) * plane;      // one UNet sample row: latents, then the image
  const int64_t context_row = length * width;
  const auto* cond_data = static_cast<const float*>(cond.data);
  const auto* uncond_data = static_cast<const float*>(uncond.data);

  // The context, fixed for the whole loop: [uncond, cond] (generation), [cond, uncond, uncond] (editing) or
  // [cond]; uncond of batch 1 serves every request.
  std::vector<float> context(static_cast<size_t>(batch * context_row));
  auto put_context = [&](int64_t block, bool conditional) {
    for (int64_t i = 0; i < n; ++i) {
      const float* src = conditional ? cond_data + i * context_row
                                     : uncond_data + (uncond.shape[0] == 1 ? 0 : i) * context_row;
      std::memcpy(context.data() + (block * n + i) * context_row, src, sizeof(float) * context_row);
    }
  };
  if (!guided) {
    put_context(0, true);
  } else if (!editing) {
    put_context(0, false);
    put_context(1, true);
  } else {
    put_context(0, true);
    put_context(1, false);
    put_context(2, false);
  }

  // The UNet sample: each row's latents (rewritten every step), then for editing the image latents, fixed:
  // [image, image, zeros] when guided, [image] when not. The buffer starts zeroed.
  std::vector<float> sample(static_cast<size_t>(batch * in_plane));
  if (editing) {
    const auto* image = static_cast<const float*>(image_latents->data);
    const int64_t image_blocks = guided ? 2 : 1;
    for (int64_t row = 0; row < image_blocks * n; ++row) {
      std::memcpy(sample.data() + row * in_plane + plane, image + (row % n) * plane, sizeof(float) * plane);
    }
  }
  std::vector<int64_t> timestep(static_cast<size_t>(batch));
  std::vector<float> noise_pred(static_cast<size_t>(batch * plane));
  std::vector<float> eps(guided ? static_cast<size_t>(n * plane) : 0);

  Tensor latents_tensor(DType::kFloat32, noise.shape);
  float* latents = latents_tensor.data_as<float>();
  const auto* noise_data = static_cast<const float*>(noise.data);
  const auto sigma = static_cast<float>(schedule.config().init_noise_sigma);
  for (int64_t k = 0; k < n * plane; ++k) latents[k] = noise_data[k] * sigma;

  const TensorView sample_view{DType::kFloat32, {batch, (editing ? 2 : 1) * channels, height, width_px},
                               sample.data()};
  const TensorView timestep_view{DType::kInt64, {batch}, timestep.data()};
  const TensorView context_view{DType::kFloat32, {batch, length, width}, context.data()};
  const TensorView noise_pred_view{DType::kFloat32, {batch, channels, height, width_px}, noise_pred.data()};
  const auto g = static_cast<float>(guidance);
  const auto g_image = static_cast<float>(image_guidance);
  const int64_t count = n * plane;

  for (int64_t t : schedule.timesteps()) {
    const auto step_start = std::chrono::steady_clock::now();
    // DDIM's scale_model_input is the identity: the latents go to the UNet as they are.
    for (int64_t row = 0; row < batch; ++row) {
      std::memcpy(sample.data() + row * in_plane, latents + (row % n) * plane, sizeof(float) * plane);
    }
    std::fill(timestep.begin(), timestep.end(), t);
    unet(sample_view, timestep_view, context_view, noise_pred_view);

    const float* guided_eps = noise_pred.data();
    if (guided && !editing) {
      const float* u = noise_pred.data();
      const float* c = u + count;
      for (int64_t k = 0; k < count; ++k) eps[k] = u[k] + g * (c[k] - u[k]);
      guided_eps = eps.data();
    } else if (guided) {
      const float* ci = noise_pred.data();
      const float* ui = ci + count;
      const float* u0 = ui + count;
      for (int64_t k = 0; k < count; ++k) eps[k] = (u0[k] + g * (ci[k] - ui[k])) + g_image * (ui[k] - u0[k]);
      guided_eps = eps.data();
    }
    schedule.step(guided_eps, t, latents, count);
    if (step_ms) {
      const auto elapsed = std::chrono::steady_clock::now() - step_start;
      step_ms->push_back(std::chrono::duration<double, std::milli>(elapsed).count());
    }
  }
  return latents_tensor;
}

}  // namespace vle
