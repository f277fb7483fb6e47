// Bindings of engines/engine.h: conversion, GIL release and nothing else.
//
// numpy arrays go in by pointer (a non-contiguous input or a read-only output buffer is a ValueError, a wrong
// dtype a TypeError, both naming the tensor: never a silent copy or cast); fetched outputs come out as numpy
// arrays that own the engine's buffer (no copy). The GIL is released while a graph loads and while it runs.
// Errors of the core reach Python through the one translator in bind_errors.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "artifact/manifest.h"
#include "bindings/bind_registry.h"
#include "engines/engine.h"
#include "engines/ort_profile.h"
#include "engines/tensorrt_profiles.h"

namespace py = pybind11;

namespace {

// numpy's dtype for a DType and back; false for a numpy dtype the engines do not take.
py::dtype numpy_dtype(vle::DType dtype) {
  switch (dtype) {
    case vle::DType::kFloat32: return py::dtype::of<float>();
    case vle::DType::kFloat16: return py::dtype("float16");
    case vle::DType::kInt64: return py::dtype::of<int64_t>();
    case vle::DType::kInt32: return py::dtype::of<int32_t>();
    case vle::DType::kBool: return py::dtype::of<bool>();
  }
  return py::dtype::of<float>();
}

bool engine_dtype(const py::dtype& dt, vle::DType* out) {
  const char order = dt.byteorder();
  if (order == '>') return false;  // the engines read native (little-endian) numbers only
  const char kind = dt.kind();
  const py::ssize_t size = dt.itemsize();
  if (kind == 'f' && size == 4) *out = vle::DType::kFloat32;
  else if (kind == 'f' && size == 2) *out = vle::DType::kFloat16;
  else if (kind == 'i' && size == 8) *out = vle::DType::kInt64;
  else if (kind == 'i' && size == 4) *out = vle::DType::kInt32;
  else if (kind == 'b' && size == 1) *out = vle::DType::kBool;
  else return false;
  return true;
}

std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__name__")); }

py::array to_numpy(vle::Tensor tensor) {
  auto held = std::make_unique<vle::Tensor>(std::move(tensor));
  const std::vector<py::ssize_t> shape(held->shape().begin(), held->shape().end());
  void* data = held->data();
  const py::dtype dtype = numpy_dtype(held->dtype());
  py::capsule owner(held.get(), [](void* p) { delete static_cast<vle::Tensor*>(p); });
  held.release();  // the capsule owns it now
  return py::array(dtype, shape, data, owner);
}

// One engine, with the name -> dtype tables the conversions check against.
class PyEngine {
 public:
  explicit PyEngine(std::unique_ptr<vle::Engine> engine) : engine_(std::move(engine)) {
    for (const vle::TensorInfo& t : engine_->inputs()) {
      input_names_.push_back(t.name);
      input_dtypes_.emplace(t.name, t.dtype);
    }
    for (const vle::TensorInfo& t : engine_->outputs()) {
      output_names_.push_back(t.name);
      output_dtypes_.emplace(t.name, t.dtype);
    }
  }

  const std::string& name() const { return engine_->name(); }
  const std::vector<std::string>& input_names() const { return input_names_; }
  const std::vector<std::string>& output_names() const { return output_names_; }
  bool device_io() const { return engine_->device_io(); }
  std::string end_profiling() { return engine_->end_profiling(); }

  py::dict run(const py::dict& inputs, const std::optional<std::vector<std::string>>& outputs) {
    const std::vector<std::string>& fetch = outputs && !outputs->empty() ? *outputs : output_names_;
    return call(inputs, py::dict(), fetch);
  }

  py::dict run_bound(const py::dict& inputs, const py::dict& outputs, const std::vector<std::string>& fetch) {
    return call(inputs, outputs, fetch);
  }

 private:
  py::dict call(const py::dict& inputs, const py::dict& outputs, const std::vector<std::string>& fetch) {
    std::vector<py::array> keep;  // holds every array while the GIL is released
    keep.reserve(inputs.size() + outputs.size());
    std::vector<vle::NamedView> in, bound;
    in.reserve(inputs.size());
    bound.reserve(outputs.size());
    for (const auto& [key, value] : inputs) in.push_back(view(key, value, input_dtypes_, false, keep));
    for (const auto& [key, value] : outputs) bound.push_back(view(key, value, output_dtypes_, true, keep));
    std::vector<vle::Tensor> got;
    {
      py::gil_scoped_release release;
      got = engine_->run(in, bound, fetch);
    }
    py::dict result;
    for (size_t i = 0; i < got.size(); ++i) result[py::str(fetch[i])] = to_numpy(std::move(got[i]));
    return result;
  }

  // The array under `key` as a view. Names the graph does not have are passed on for the engine to report
  // (with the full lists of missing and unexpected inputs, or the graph's outputs); their dtype is not looked
  // at.
  vle::NamedView view(py::handle key, py::handle value, const std::unordered_map<std::string, vle::DType>& dtypes,
                      bool output, std::vector<py::array>& keep) const {
    std::string name = py::cast<std::string>(key);
    const char* what = output ? "output buffer" : "input";
    if (!py::isinstance<py::array>(value)) {
      throw py::type_error(engine_->name() + ": " + what + " '" + name + "' must be a numpy array, got " +
                           type_name(value));
    }
    auto arr = py::reinterpret_borrow<py::array>(value);
    auto want = dtypes.find(name);
    vle::DType dtype = vle::DType::kFloat32;
    const bool known = engine_dtype(arr.dtype(), &dtype);
    if (want != dtypes.end() && (!known || dtype != want->second)) {
      throw py::type_error(engine_->name() + ": " + what + " '" + name + "' must be " +
                           vle::dtype_name(want->second) + ", got " + std::string(py::str(arr.dtype())));
    }
    if (!(arr.flags() & py::array::c_style)) {
      throw py::value_error(engine_->name() + ": " + what + " '" + name +
                            "' must be C-contiguous to bind without a copy (np.ascontiguousarray makes it so)");
    }
    if (output && !arr.writeable()) {
      throw py::value_error(engine_->name() + ": output buffer '" + name + "' must be writable");
    }
    vle::TensorView v;
    v.dtype = dtype;
    v.shape.assign(arr.shape(), arr.shape() + arr.ndim());
    v.data = const_cast<void*>(arr.data());
    keep.push_back(std::move(arr));
    return {std::move(name), std::move(v)};
  }

  std::unique_ptr<vle::Engine> engine_;
  std::vector<std::string> input_names_, output_names_;
  std::unordered_map<std::string, vle::DType> input_dtypes_, output_dtypes_;
};

// `[{"name", "shape": [int | str | None, ...]}]` (JSON text) as the planner's inputs: a string is a symbol,
// None or a size <= 0 an unnamed dynamic axis.
std::vector<vle::ProfileInput> profile_inputs_from_json(const std::string& text) {
  const nlohmann::json inputs = nlohmann::json::parse(text);
  std::vector<vle::ProfileInput> out;
  for (const auto& value : inputs) {
    vle::ProfileInput in;
    in.name = value.at("name").get<std::string>();
    for (const auto& dim : value.at("shape")) {
      in.dims.push_back(dim.is_number_integer() ? dim.get<int64_t>() : -1);
      in.symbols.push_back(dim.is_string() ? dim.get<std::string>() : "");
    }
    out.push_back(std::move(in));
  }
  return out;
}

void bind(py::module_& m) {
  py::class_<PyEngine>(m, "Engine", "One exported graph, run by the core's engine (see engines/engine.h).")
      .def_property_readonly("name", &PyEngine::name)
      .def_property_readonly("input_names", &PyEngine::input_names)
      .def_property_readonly("output_names", &PyEngine::output_names)
      .def_property_readonly("device_io", &PyEngine::device_io,
                             "Whether the session (CUDA or TensorRT provider) binds device memory.")
      .def("end_profiling", &PyEngine::end_profiling,
           "Ends the session's profile (make_engine's profile_prefix) and returns its file; '' without one.")
      .def("run", &PyEngine::run, py::arg("inputs"), py::arg("outputs") = py::none(),
           "Runs the graph on numpy inputs (bound by pointer); returns the asked outputs (all by default).")
      .def("run_bound", &PyEngine::run_bound, py::arg("inputs"), py::arg("outputs"),
           py::arg("fetch") = std::vector<std::string>{},
           "Runs with every input and the `outputs` buffers bound by pointer; returns the `fetch` outputs.");

  m.def(
      "make_engine",
      [](const std::string& backend, const std::string& path, const std::string& name,
         const std::vector<std::string>& providers,
         const std::map<std::string, std::map<std::string, std::string>>& provider_options, int threads, bool spin,
         const std::string& onnxruntime_library, int device_id, const std::string& profile_prefix) {
        vle::EngineOptions options;
        options.device_id = device_id;
        options.profile_prefix = profile_prefix;
        options.providers = providers;
        options.provider_options = provider_options;
        options.threads = threads;
        options.spin = spin;
        options.onnxruntime_library = onnxruntime_library;
        std::unique_ptr<vle::Engine> engine;
        {
          py::gil_scoped_release release;
          engine = vle::make_engine(backend, path, name, options);
        }
        return std::make_unique<PyEngine>(std::move(engine));
      },
      py::arg("backend"), py::arg("path"), py::arg("name"), py::arg("providers"), py::arg("provider_options"),
      py::arg("threads"), py::arg("spin"), py::arg("onnxruntime_library"), py::arg("device_id") = 0,
      py::arg("profile_prefix") = "");
  m.def(
      "trt_profile_shapes",
      [](const std::string& graph, const std::string& inputs_json, const std::string& facts_json) {
        const vle::ProfileTable table =
            vle::profile_shapes(graph, profile_inputs_from_json(inputs_json), nlohmann::json::parse(facts_json));
        return vle::profile_table_json(table).dump();
      },
      py::arg("graph"), py::arg("inputs_json"), py::arg("facts_json"),
      "The TensorRT optimization profiles of a graph (engines/tensorrt_profiles.h), as JSON text.");
  m.def(
      "trt_artifact_profile_facts",
      [](const std::string& artifact_dir) {
        return vle::artifact_profile_facts(vle::load_manifest(artifact_dir, /*verify_hashes=*/false)).dump();
      },
      py::arg("artifact_dir"), "The artifact-level numbers of a manifest the profile planner reads, as JSON text.");
  m.attr("TRT_DEFAULT_MAX_REGIONS") = vle::kDefaultMaxRegions;
  m.attr("TRT_DEFAULT_MAX_LINK_GROUPS") = vle::kDefaultMaxLinkGroups;
  m.attr("TRT_DEFAULT_PREFILL_OPT") = vle::kDefaultPrefillOpt;
  m.def(
      "profile_copies",
      [](const std::string& path) {
        py::list out;
        for (const vle::RunCopies& r : vle::profile_copies(path)) {
          py::list nodes;
          for (const vle::CopyNode& n : r.nodes) {
            py::dict node;
            node["op"] = n.op;
            node["node"] = n.node;
            node["bytes"] = n.bytes;
            nodes.append(node);
          }
          py::dict run;
          run["to_host"] = r.to_host;
          run["from_host"] = r.from_host;
          run["nodes"] = nodes;
          out.append(run);
        }
        return out;
      },
      py::arg("path"),
      "Each run of an ONNX Runtime profile (engines/ort_profile.h): {'to_host', 'from_host': counts, 'nodes': "
      "[{'op', 'node', 'bytes'}]}.");
  m.def(
      "profile_flops",
      [](const std::string& path) {
        py::list out;
        for (const vle::RunFlops& r : vle::profile_flops(path)) {
          py::dict run;
          run["ts_us"] = r.ts_us;
          run["dur_us"] = r.dur_us;
          run["float"] = r.float_flops;
          run["int8"] = r.int8_flops;
          run["nbits"] = r.nbits_flops;
          run["uncounted"] = r.uncounted;
          out.append(run);
        }
        return out;
      },
      py::arg("path"),
      "Each run of an ONNX Runtime profile (engines/ort_profile.h): {'ts_us', 'dur_us', 'float', 'int8', "
      "'nbits': FLOPs by rate class, 'uncounted': {op: kernels of compute ops without a rule}}.");
  m.def("available_providers", &vle::available_providers, py::arg("onnxruntime_library"));
  m.def("onnxruntime_library_in_use", &vle::onnxruntime_library_in_use, py::arg("onnxruntime_library"));
}

const vle::BindRegistration registration(&bind);

}  // namespace
