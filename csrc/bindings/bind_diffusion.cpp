// Bindings of loop/diffusion.h: the scheduler constants, the schedule and the denoising loop with a Python
// callable as the UNet. Conversion and GIL handling only: arrays come in without copies (float32,
// C-contiguous, or a TypeError naming the argument), the latents go out as a view of the C++ buffer, and
// the GIL is released for the loop and taken back around each UNet call.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bindings/bind_registry.h"
#include "loop/diffusion.h"

namespace py = pybind11;

namespace {

std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__name__")); }

std::string shape_of(const py::array& a) {
  return vle::shape_text(std::vector<int64_t>(a.shape(), a.shape() + a.ndim()));
}

// `obj` as a C-contiguous float32 ndarray (no copy), or a TypeError naming `name`.
py::array float32_array(py::handle obj, const std::string& name) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(name + " must be a numpy float32 array, got " + type_name(obj));
  }
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!arr.dtype().equal(py::dtype::of<float>())) {
    throw py::type_error(name + " must be float32, got " + std::string(py::str(arr.dtype())));
  }
  if (!(arr.flags() & py::array::c_style)) {
    throw py::type_error(name + " must be C-contiguous (np.ascontiguousarray)");
  }
  return arr;
}

vle::TensorView view_of(const py::array& arr) {
  return {vle::DType::kFloat32, std::vector<int64_t>(arr.shape(), arr.shape() + arr.ndim()),
          const_cast<void*>(arr.data())};
}

template <typename T>
py::array copy_out(const vle::TensorView& v) {
  const std::vector<py::ssize_t> shape(v.shape.begin(), v.shape.end());
  return py::array_t<T>(shape, static_cast<const T*>(v.data));
}

py::array to_numpy(vle::Tensor tensor) {
  auto held = std::make_unique<vle::Tensor>(std::move(tensor));
  const std::vector<py::ssize_t> shape(held->shape().begin(), held->shape().end());
  void* data = held->data();
  py::capsule owner(held.get(), [](void* p) { delete static_cast<vle::Tensor*>(p); });
  held.release();  // the capsule owns it now
  return py::array(py::dtype::of<float>(), shape, data, owner);
}

// A Python UNet as the loop's callback. It gets fresh arrays (sample, timestep [B] int64, context) each call,
// so keeping them is safe, and must return float32 of the loop's noise_pred shape.
vle::UNetFn python_unet(py::object unet_fn) {
  return [unet_fn = std::move(unet_fn)](const vle::TensorView& sample, const vle::TensorView& timestep,
                                        const vle::TensorView& context, const vle::TensorView& noise_pred) {
    py::gil_scoped_acquire gil;
    py::object got = unet_fn(copy_out<float>(sample), copy_out<int64_t>(timestep), copy_out<float>(context));
    if (!py::isinstance<py::array>(got)) {
      throw py::type_error("unet_fn must return a numpy float32 array, got " + type_name(got));
    }
    auto arr = py::reinterpret_borrow<py::array>(got);
    if (std::vector<int64_t>(arr.shape(), arr.shape() + arr.ndim()) != noise_pred.shape) {
      throw py::value_error("unet_fn returned shape " + shape_of(arr) + ", expected " +
                            vle::shape_text(noise_pred.shape));
    }
    if (!arr.dtype().equal(py::dtype::of<float>())) {
      throw py::type_error("unet_fn must return float32, got " + std::string(py::str(arr.dtype())));
    }
    auto dense = py::array_t<float, py::array::c_style>::ensure(arr);  // a copy only if strided
    std::memcpy(noise_pred.data, dense.data(), noise_pred.bytes());
  };
}

void bind(py::module_& m) {
  const vle::DDIMConfig d;
  py::class_<vle::DDIMConfig>(m, "DDIMConfig", "The DDIM scheduler constants the C++ loop implements.")
      .def(py::init([](int64_t train_timesteps, double beta_start, double beta_end, std::string beta_schedule,
                       std::string timestep_spacing, int64_t steps_offset, bool set_alpha_to_one,
                       std::string prediction_type, bool clip_sample, double eta, double init_noise_sigma) {
             vle::DDIMConfig c{train_timesteps, beta_start,      beta_end,    std::move(beta_schedule),
                               std::move(timestep_spacing), steps_offset, set_alpha_to_one,
                               std::move(prediction_type),  clip_sample,  eta,         init_noise_sigma};
             c.check();
             return c;
           }),
           py::arg("train_timesteps") = d.train_timesteps, py::arg("beta_start") = d.beta_start,
           py::arg("beta_end") = d.beta_end, py::arg("beta_schedule") = d.beta_schedule,
           py::arg("timestep_spacing") = d.timestep_spacing, py::arg("steps_offset") = d.steps_offset,
           py::arg("set_alpha_to_one") = d.set_alpha_to_one, py::arg("prediction_type") = d.prediction_type,
           py::arg("clip_sample") = d.clip_sample, py::arg("eta") = d.eta,
           py::arg("init_noise_sigma") = d.init_noise_sigma)
      .def_static(
          "from_facts",
          [](const py::object& facts) {
            const std::string text = py::str(py::module_::import("json").attr("dumps")(facts));
            return vle::DDIMConfig::from_facts(nlohmann::json::parse(text));
          },
          py::arg("facts"), "Reads the manifest's `scheduler` facts strictly.")
      .def_readonly("train_timesteps", &vle::DDIMConfig::train_timesteps)
      .def_readonly("beta_start", &vle::DDIMConfig::beta_start)
      .def_readonly("beta_end", &vle::DDIMConfig::beta_end)
      .def_readonly("beta_schedule", &vle::DDIMConfig::beta_schedule)
      .def_readonly("timestep_spacing", &vle::DDIMConfig::timestep_spacing)
      .def_readonly("steps_offset", &vle::DDIMConfig::steps_offset)
      .def_readonly("set_alpha_to_one", &vle::DDIMConfig::set_alpha_to_one)
      .def_readonly("prediction_type", &vle::DDIMConfig::prediction_type)
      .def_readonly("clip_sample", &vle::DDIMConfig::clip_sample)
      .def_readonly("eta", &vle::DDIMConfig::eta)
      .def_readonly("init_noise_sigma", &vle::DDIMConfig::init_noise_sigma);

  m.def(
      "ddim_timesteps",
      [](int64_t steps, int64_t train_timesteps, int64_t steps_offset) {
        const std::vector<int64_t> t = vle::ddim_timesteps(steps, train_timesteps, steps_offset);
        return py::array_t<int64_t>(static_cast<py::ssize_t>(t.size()), t.data());
      },
      py::arg("steps"), py::arg("train_timesteps") = 1000, py::arg("steps_offset") = 1);

  py::class_<vle::DDIMSchedule>(m, "DDIMSchedule", "Deterministic DDIM (eta 0) for one number of steps.")
      .def(py::init<int64_t, const vle::DDIMConfig&>(), py::arg("steps"),
           py::arg("config") = vle::DDIMConfig{})
      .def_property_readonly("steps", &vle::DDIMSchedule::steps)
      .def_property_readonly("timesteps",
                             [](const vle::DDIMSchedule& s) {
                               const auto& t = s.timesteps();
                               return py::array_t<int64_t>(static_cast<py::ssize_t>(t.size()), t.data());
                             })
      .def_property_readonly("alphas_cumprod",
                             [](const vle::DDIMSchedule& s) {
                               const auto& a = s.alphas_cumprod();
                               return py::array_t<double>(static_cast<py::ssize_t>(a.size()), a.data());
                             })
      .def_property_readonly("final_alpha_cumprod", &vle::DDIMSchedule::final_alpha_cumprod)
      .def("alphas", &vle::DDIMSchedule::alphas, py::arg("timestep"));

  m.def(
      "denoise",
      [](py::object unet_fn, const py::object& cond, const py::object& uncond, const py::object& noise,
         int64_t steps, double guidance, const py::object& image_latents, double image_guidance,
         const std::optional<vle::DDIMConfig>& config) {
        if (!PyCallable_Check(unet_fn.ptr())) {
          throw py::type_error("unet_fn must be callable, got " + type_name(unet_fn));
        }
        const py::array cond_a = float32_array(cond, "cond");
        const py::array uncond_a = float32_array(uncond, "uncond");
        const py::array noise_a = float32_array(noise, "noise");
        std::optional<py::array> image_a;
        if (!image_latents.is_none()) image_a = float32_array(image_latents, "image_latents");
        std::optional<vle::TensorView> image_view;
        if (image_a) image_view = view_of(*image_a);
        const vle::UNetFn unet = python_unet(std::move(unet_fn));
        vle::Tensor latents;
        {
          py::gil_scoped_release released;
          latents = vle::denoise(unet, view_of(cond_a), view_of(uncond_a), view_of(noise_a), steps, guidance,
                                 image_view, image_guidance, config.value_or(vle::DDIMConfig{}));
        }
        return to_numpy(std::move(latents));
      },
      py::arg("unet_fn"), py::arg("cond"), py::arg("uncond"), py::arg("noise"), py::arg("steps"),
      py::arg("guidance"), py::arg("image_latents") = py::none(), py::arg("image_guidance") = 1.5,
      py::arg("config") = py::none(),
      "The DDIM loop with guidance; returns the final latents [n, C, h, w] float32. unet_fn(sample, "
      "timestep, context) -> noise_pred, called once per step with the guidance batch.");
}

const vle::BindRegistration registration(&bind);

}  // namespace
