// The ONNX Runtime engine: one Ort::Session per graph, every input and the caller's output buffers bound by
// pointer through an Ort::IoBinding.
//
// The library is opened at run time (dlopen + OrtGetApiBase) rather than linked, so one build of the core
// works with the onnxruntime wheel's libonnxruntime or a system one. ORT_API_MANUAL_INIT keeps the C++
// wrappers from touching the API before we have it; Ort::InitApi gives it to them once the library is open.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "engines/engine.h"
#include "engines/onnxruntime.h"
#include "visionllm_edge/errors.h"

namespace vle {
namespace {

// --- the library and its one environment ------------------------------------------------------------------

// What the process holds of ONNX Runtime: the opened library, its API and the one Ort::Env every engine
// shares. The C++ wrappers keep the API in a single process-wide pointer (Ort::InitApi), so a process can use
// one ONNX Runtime library; asking for a second one is an error that names both. The runtime is created on
// first use and deliberately never destroyed: sessions and tensors handed out may outlive any static
// destructor (a Python interpreter frees its arrays late at exit), and unloading ONNX Runtime under them
// would crash.
struct OrtRuntime {
  std::string library;   // the path as opened
  std::string version;   // the library's own version string
  std::unique_ptr<Ort::Env> env;
  std::vector<std::string> providers;  // what GetAvailableProviders lists
};

std::string resolve_library(const std::string& requested) {
  if (!requested.empty()) return requested;
  if (const char* env = std::getenv("VLE_ONNXRUNTIME_LIBRARY"); env != nullptr && *env != '\0') return env;
  return VLE_DEFAULT_ONNXRUNTIME_LIBRARY;
}

// A path with a slash is compared by its canonical form; a bare soname ("libonnxruntime.so.1") as written.
std::string library_key(const std::string& library) {
  if (library.find('/') == std::string::npos) return library;
  std::error_code ec;
  const std::filesystem::path p = std::filesystem::weakly_canonical(library, ec);
  return ec ? library : p.string();
}

OrtRuntime& ort_runtime(const std::string& requested) {
  static std::mutex mutex;
  static OrtRuntime* runtime = nullptr;  // leaked on purpose, see OrtRuntime
  const std::string library = resolve_library(requested);
  std::lock_guard<std::mutex> lock(mutex);
  if (runtime != nullptr) {
    if (library_key(library) != library_key(runtime->library)) {
      throw BackendUnavailableError("this process already uses the ONNX Runtime library " + runtime->library +
                                    "; it cannot also open " + library + " (one ONNX Runtime per process)");
    }
    return *runtime;
  }
  // RTLD_LOCAL: the library's symbols stay private, so another ONNX Runtime in the process (the Python
  // package's own copy, say) cannot collide with this one.
  void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    throw BackendUnavailableError("cannot open the ONNX Runtime library " + library + ": " +
                                  (why ? why : "unknown error") +
                                  " (install the onnxruntime package, or set VLE_ONNXRUNTIME_LIBRARY to a "
                                  "libonnxruntime.so.1)");
  }
  using GetApiBase = const OrtApiBase* (*)();
  auto get_api_base = reinterpret_cast<GetApiBase>(dlsym(handle, "OrtGetApiBase"));
  if (get_api_base == nullptr) {
    dlclose(handle);
    throw BackendUnavailableError(library + " is not an ONNX Runtime library: it has no OrtGetApiBase");
  }
  const OrtApiBase* base = get_api_base();
  const char* version = base->GetVersionString();
  const OrtApi* api = base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    const std::string have = version ? version : "unknown";
    dlclose(handle);
    throw BackendUnavailableError("the ONNX Runtime library " + library + " is version " + have +
                                  ", which lacks API version " + std::to_string(ORT_API_VERSION) +
                                  " (ONNX Runtime 1." + std::to_string(ORT_API_VERSION) +
                                  " or newer is needed)");
  }
  Ort::InitApi(api);
  auto held = std::make_unique<OrtRuntime>();
  held->library = library;
  held->version = version ? version : "";
  try {
    held->env = std::make_unique<Ort::Env>(ORT_LOGGING_LEVEL_WARNING, "visionllm-edge");
    held->providers = Ort::GetAvailableProviders();
  } catch (const Ort::Exception& e) {
    throw BackendUnavailableError("ONNX Runtime (" + library + ") could not start: " + e.what());
  }
  runtime = held.release();
  return *runtime;
}

// --- element types ----------------------------------------------------------------------------------------

ONNXTensorElementDataType onnx_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    case DType::kFloat16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    case DType::kInt64: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    case DType::kInt32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    case DType::kBool: return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
  }
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

bool from_onnx_type(ONNXTensorElementDataType type, DType* out) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: *out = DType::kFloat32; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: *out = DType::kFloat16; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: *out = DType::kInt64; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: *out = DType::kInt32; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: *out = DType::kBool; return true;
    default: return false;
  }
}

// --- messages ---------------------------------------------------------------------------------------------

// ['a', 'b'], as the Python SDK prints a list of names.
template <typename Names, typename Get>
std::string name_list(const Names& names, Get get) {
  std::string s = "[";
  bool first = true;
  for (const auto& n : names) {
    s += (first ? "'" : ", '") + get(n) + "'";
    first = false;
  }
  return s + "]";
}

std::string name_list(const std::vector<std::string>& names) {
  return name_list(names, [](const std::string& n) { return n; });
}

std::string name_list(const std::vector<TensorInfo>& infos) {
  return name_list(infos, [](const TensorInfo& t) { return t.name; });
}

// A view's shape against the graph's (-1: any size); the message names the graph and the tensor.
void check_shape(const std::string& graph, const char* what, const TensorInfo& info, const TensorView& view) {
  bool ok = info.shape.size() == view.shape.size();
  for (size_t i = 0; ok && i < info.shape.size(); ++i) ok = info.shape[i] < 0 || info.shape[i] == view.shape[i];
  if (!ok) {
    throw InputError(graph + ": " + what + " '" + info.name + "' must have shape " + shape_text(info.shape) +
                     " (-1: any size), got " + shape_text(view.shape));
  }
}

void check_view(const std::string& graph, const char* what, const TensorInfo& info, const TensorView& view,
                bool device_io) {
  if (view.dtype != info.dtype) {
    throw InputError(graph + ": " + what + " '" + info.name + "' must be " + dtype_name(info.dtype) + ", got " +
                     dtype_name(view.dtype));
  }
  if (view.memory == MemoryKind::kDevice && !device_io) {
    throw InputError(graph + ": " + what + " '" + info.name +
                     "' is device memory; this engine binds host memory only (its session has neither the CUDA "
                     "nor the TensorRT execution provider)");
  }
  check_shape(graph, what, info, view);
  if (view.data == nullptr && view.numel() != 0) {
    throw InputError(graph + ": " + what + " '" + info.name + "' has no data (a null pointer)");
  }
}

// --- providers --------------------------------------------------------------------------------------------

// The providers that run on a CUDA device: their sessions take device views, and their "device_id" option is
// EngineOptions::device_id.
bool is_cuda_provider(const std::string& provider) {
  return provider == "CUDAExecutionProvider" || provider == "TensorrtExecutionProvider";
}

// A CUDA provider's options with "device_id" set from EngineOptions::device_id; one given in the provider's
// options must agree, since device views are read as memory on EngineOptions::device_id.
std::map<std::string, std::string> with_device_id(const std::string& graph, const std::string& provider,
                                                  std::map<std::string, std::string> options, int device_id) {
  const std::string want = std::to_string(device_id);
  auto [it, inserted] = options.emplace("device_id", want);
  if (!inserted && it->second != want) {
    throw InputError(graph + ": " + provider + " option device_id is '" + it->second +
                     "' but the engine's device_id is " + want + "; set the device once, in device_id");
  }
  return options;
}

// Provider options as the C API's parallel key / value arrays.
struct KeyValues {
  std::vector<const char*> keys, values;
  explicit KeyValues(const std::map<std::string, std::string>& options) {
    for (const auto& [k, v] : options) {
      keys.push_back(k.c_str());
      values.push_back(v.c_str());
    }
  }
};

void append_provider(Ort::SessionOptions& so, const std::string& provider,
                     const std::map<std::string, std::string>& options) {
  const OrtApi& api = Ort::GetApi();
  KeyValues kv(options);
  if (provider == "CPUExecutionProvider") {
    // ONNX Runtime always places what no other provider takes on the CPU; it takes no options here.
    return;
  }
  if (provider == "CUDAExecutionProvider") {
    OrtCUDAProviderOptionsV2* cuda = nullptr;
    Ort::ThrowOnError(api.CreateCUDAProviderOptions(&cuda));
    std::unique_ptr<OrtCUDAProviderOptionsV2, void (*)(OrtCUDAProviderOptionsV2*)> held(
        cuda, Ort::GetApi().ReleaseCUDAProviderOptions);
    Ort::ThrowOnError(api.UpdateCUDAProviderOptions(cuda, kv.keys.data(), kv.values.data(), kv.keys.size()));
    so.AppendExecutionProvider_CUDA_V2(*cuda);
    return;
  }
  if (provider == "TensorrtExecutionProvider") {
    OrtTensorRTProviderOptionsV2* trt = nullptr;
    Ort::ThrowOnError(api.CreateTensorRTProviderOptions(&trt));
    std::unique_ptr<OrtTensorRTProviderOptionsV2, void (*)(OrtTensorRTProviderOptionsV2*)> held(
        trt, Ort::GetApi().ReleaseTensorRTProviderOptions);
    Ort::ThrowOnError(api.UpdateTensorRTProviderOptions(trt, kv.keys.data(), kv.values.data(), kv.keys.size()));
    so.AppendExecutionProvider_TensorRT_V2(*trt);
    return;
  }
  // The rest go through the generic entry point, which knows them by their short names ("XNNPACK", "QNN",
  // "OpenVINO", ...): the listed name without its "ExecutionProvider" suffix.
  std::string short_name = provider;
  const std::string suffix = "ExecutionProvider";
  if (short_name.size() > suffix.size() && short_name.compare(short_name.size() - suffix.size(), suffix.size(), suffix) == 0) {
    short_name.resize(short_name.size() - suffix.size());
  }
  std::unordered_map<std::string, std::string> generic(options.begin(), options.end());
  so.AppendExecutionProvider(short_name, generic);
}

// --- the engine -------------------------------------------------------------------------------------------

class OnnxRuntimeEngine final : public Engine {
 public:
  OnnxRuntimeEngine(const std::filesystem::path& onnx_file, const std::string& name, const EngineOptions& options)
      : name_(name.empty() ? onnx_file.stem().string() : name),
        runtime_(ort_runtime(options.onnxruntime_library)),
        cpu_(Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault)) {
    if (options.threads < 0) {
      throw InputError(name_ + ": threads must be 0 (ONNX Runtime's default) or positive, got " +
                       std::to_string(options.threads));
    }
    if (options.device_id < 0) {
      throw InputError(name_ + ": device_id must be a CUDA device index (0 or more), got " +
                       std::to_string(options.device_id));
    }
    std::vector<std::string> providers = options.providers;
    if (providers.empty()) providers.push_back("CPUExecutionProvider");
    std::vector<std::string> missing;
    for (const std::string& p : providers) {
      if (std::find(runtime_.providers.begin(), runtime_.providers.end(), p) == runtime_.providers.end()) {
        missing.push_back(p);
      }
    }
    if (!missing.empty()) {
      throw BackendUnavailableError(name_ + ": execution provider(s) " + name_list(missing) +
                                    " are not in this onnxruntime build (" + runtime_.library + " has " +
                                    name_list(runtime_.providers) + ")");
    }
    for (const auto& [provider, unused] : options.provider_options) {
      if (std::find(providers.begin(), providers.end(), provider) == providers.end()) {
        throw InputError(name_ + ": options given for execution provider '" + provider +
                         "', which is not among the providers asked for " + name_list(providers));
      }
    }
    std::error_code ec;
    if (!std::filesystem::is_regular_file(onnx_file, ec)) {
      throw ArtifactError(name_ + ": the graph file " + onnx_file.string() + " does not exist");
    }

    Ort::SessionOptions so;
    try {
      so.SetLogSeverityLevel(ORT_LOGGING_LEVEL_WARNING);
      // A pipeline holds one session per graph and runs them one after another: a finished session's
      // spinning workers compete with the next one for the cores (measured on 2 cores: decoders 4x slower
      // with spinning on). Spinning only pays with a core to spare, so it is off unless asked for.
      so.AddConfigEntry("session.intra_op.allow_spinning", options.spin ? "1" : "0");
      if (options.threads > 0) {
        so.SetIntraOpNumThreads(options.threads);
        so.SetInterOpNumThreads(1);
      }
      if (!options.profile_prefix.empty()) {
        so.EnableProfiling(options.profile_prefix.c_str());
        profiling_ = true;
      }
      for (const std::string& p : providers) {
        auto it = options.provider_options.find(p);
        std::map<std::string, std::string> given =
            it == options.provider_options.end() ? std::map<std::string, std::string>{} : it->second;
        if (is_cuda_provider(p)) {
          given = with_device_id(name_, p, std::move(given), options.device_id);
          device_io_ = true;
        }
        append_provider(so, p, given);
      }
    } catch (const Ort::Exception& e) {
      throw BackendUnavailableError(name_ + ": ONNX Runtime refused the session options for providers " +
                                    name_list(providers) + ": " + e.what());
    }
    try {
      session_ = std::make_unique<Ort::Session>(*runtime_.env, onnx_file.c_str(), so);
    } catch (const Ort::Exception& e) {
      const OrtErrorCode code = e.GetOrtErrorCode();
      const std::string what = name_ + ": ONNX Runtime cannot load " + onnx_file.string() + ": " + e.what();
      if (code == ORT_INVALID_PROTOBUF || code == ORT_INVALID_GRAPH || code == ORT_NO_SUCHFILE ||
          code == ORT_NO_MODEL) {
        throw ArtifactError(what);
      }
      throw EngineError(what);
    }
    read_signature(onnx_file);
    if (device_io_) {
      // ONNX Runtime's CUDA allocator on our device: device views are wrapped with it, and fetched outputs
      // bound to it are allocated there.
      cuda_ = std::make_unique<Ort::MemoryInfo>("Cuda", OrtArenaAllocator, options.device_id, OrtMemTypeDefault);
    }
  }

  const std::string& name() const override { return name_; }
  bool device_io() const override { return device_io_; }

  std::string end_profiling() override {
    if (!profiling_) return "";
    profiling_ = false;
    Ort::AllocatorWithDefaultOptions allocator;
    try {
      return session_->EndProfilingAllocated(allocator).get();
    } catch (const Ort::Exception& e) {
      throw EngineError(name_ + ": ONNX Runtime could not end its profile: " + e.what());
    }
  }
  const std::vector<TensorInfo>& inputs() const override { return inputs_; }
  const std::vector<TensorInfo>& outputs() const override { return outputs_; }

  std::vector<Tensor> run(const std::vector<NamedView>& inputs, const std::vector<NamedView>& bound,
                          const std::vector<std::string>& fetch, MemoryKind fetch_memory) override {
    // --- checks, all before anything runs ---
    std::vector<const TensorView*> by_input(inputs_.size(), nullptr);
    std::vector<std::string> unexpected;
    for (const auto& [name, view] : inputs) {
      auto it = input_index_.find(name);
      if (it == input_index_.end()) {
        unexpected.push_back(name);
      } else if (by_input[it->second] != nullptr) {
        throw InputError(name_ + ": input '" + name + "' is given twice");
      } else {
        by_input[it->second] = &view;
      }
    }
    if (!unexpected.empty() || inputs.size() - unexpected.size() != inputs_.size()) {
      std::vector<std::string> missing;
      for (size_t i = 0; i < inputs_.size(); ++i) {
        if (by_input[i] == nullptr) missing.push_back(inputs_[i].name);
      }
      throw InputError(name_ + ": inputs missing " + name_list(missing) + ", unexpected " + name_list(unexpected) +
                       " (graph takes " + name_list(inputs_) + ")");
    }
    for (size_t i = 0; i < inputs_.size(); ++i) check_view(name_, "input", inputs_[i], *by_input[i], device_io_);
    std::vector<bool> taken(outputs_.size(), false);
    std::vector<size_t> bound_index, fetch_index;
    bound_index.reserve(bound.size());
    fetch_index.reserve(fetch.size());
    for (const auto& [name, view] : bound) {
      const size_t o = output_slot(name, taken);
      check_view(name_, "output buffer", outputs_[o], view, device_io_);
      bound_index.push_back(o);
    }
    for (const std::string& name : fetch) fetch_index.push_back(output_slot(name, taken));
    if (fetch_memory == MemoryKind::kDevice && !device_io_ && !fetch.empty()) {
      throw InputError(name_ + ": outputs " + name_list(fetch) +
                       " were asked for in device memory; this engine fetches into host memory only (its session "
                       "has neither the CUDA nor the TensorRT execution provider)");
    }
    const Ort::MemoryInfo& fetch_info = fetch_memory == MemoryKind::kDevice && cuda_ ? *cuda_ : cpu_;

    // --- bind and run ---
    try {
      Ort::IoBinding binding(*session_);
      for (size_t i = 0; i < inputs_.size(); ++i) {
        binding.BindInput(inputs_[i].name.c_str(), wrap(*by_input[i]));
      }
      for (size_t k = 0; k < bound.size(); ++k) {
        binding.BindOutput(outputs_[bound_index[k]].name.c_str(), wrap(bound[k].second));
      }
      for (size_t o : fetch_index) binding.BindOutput(outputs_[o].name.c_str(), fetch_info);
      session_->Run(Ort::RunOptions{nullptr}, binding);
      if (fetch.empty()) return {};
      // Output values come back in binding order: the caller's buffers first, then the fetched ones.
      std::vector<Ort::Value> values = binding.GetOutputValues();
      std::vector<Tensor> out;
      out.reserve(fetch.size());
      for (size_t k = 0; k < fetch.size(); ++k) {
        out.push_back(to_tensor(std::move(values[bound.size() + k]), outputs_[fetch_index[k]].name, fetch_memory));
      }
      return out;
    } catch (const Ort::Exception& e) {
      throw EngineError(name_ + ": ONNX Runtime failed running the graph: " + e.what());
    }
  }

 private:
  void read_signature(const std::filesystem::path& onnx_file) {
    Ort::AllocatorWithDefaultOptions allocator;
    auto read = [&](size_t count, bool input, std::vector<TensorInfo>& into) {
      for (size_t i = 0; i < count; ++i) {
        Ort::AllocatedStringPtr name =
            input ? session_->GetInputNameAllocated(i, allocator) : session_->GetOutputNameAllocated(i, allocator);
        Ort::TypeInfo type = input ? session_->GetInputTypeInfo(i) : session_->GetOutputTypeInfo(i);
        TensorInfo info;
        info.name = name.get();
        if (type.GetONNXType() != ONNX_TYPE_TENSOR) {
          throw ArtifactError(name_ + ": " + onnx_file.string() + ": " + (input ? "input" : "output") + " '" +
                              info.name + "' is not a tensor; the engine binds tensors only");
        }
        auto tensor = type.GetTensorTypeAndShapeInfo();
        if (!from_onnx_type(tensor.GetElementType(), &info.dtype)) {
          throw ArtifactError(name_ + ": " + onnx_file.string() + ": " + (input ? "input" : "output") + " '" +
                              info.name + "' has ONNX element type " + std::to_string(tensor.GetElementType()) +
                              "; the engine supports float32, float16, int64, int32 and bool");
        }
        info.shape = tensor.GetShape();
        into.push_back(std::move(info));
      }
    };
    read(session_->GetInputCount(), true, inputs_);
    read(session_->GetOutputCount(), false, outputs_);
    for (size_t i = 0; i < inputs_.size(); ++i) input_index_.emplace(inputs_[i].name, i);
    for (size_t i = 0; i < outputs_.size(); ++i) output_index_.emplace(outputs_[i].name, i);
  }

  // The index of output `name`, marked taken; unknown or repeated names are errors naming them.
  size_t output_slot(const std::string& name, std::vector<bool>& taken) const {
    auto it = output_index_.find(name);
    if (it == output_index_.end()) {
      throw InputError(name_ + ": no output named '" + name + "'; outputs are " + name_list(outputs_));
    }
    if (taken[it->second]) throw InputError(name_ + ": output '" + name + "' is asked for twice");
    taken[it->second] = true;
    return it->second;
  }

  // An OrtValue over the caller's memory, host or device (check_view let a device view through only with a
  // CUDA memory info to describe it): no copy, the caller keeps it alive for the call.
  Ort::Value wrap(const TensorView& view) const {
    static char empty_buffer[1];  // ONNX Runtime wants a pointer even for a tensor with no elements
    void* data = view.data != nullptr ? view.data : empty_buffer;
    const Ort::MemoryInfo& info = view.memory == MemoryKind::kDevice ? *cuda_ : cpu_;
    return Ort::Value::CreateTensor(info, data, view.bytes(), view.shape.data(), view.shape.size(),
                                    onnx_type(view.dtype));
  }

  // A fetched OrtValue as a Tensor that owns it: the buffer ONNX Runtime allocated is handed on, not copied.
  Tensor to_tensor(Ort::Value value, const std::string& output, MemoryKind memory) const {
    auto info = value.GetTensorTypeAndShapeInfo();
    DType dtype;
    if (!from_onnx_type(info.GetElementType(), &dtype)) {
      throw EngineError(name_ + ": output '" + output + "' came back with ONNX element type " +
                        std::to_string(info.GetElementType()));
    }
    std::vector<int64_t> shape = info.GetShape();
    if (element_count(shape) == 0 && memory == MemoryKind::kHost) return Tensor(dtype, std::move(shape));
    void* data = value.GetTensorMutableData<void>();
    auto* owner = new Ort::Value(std::move(value));
    return Tensor::adopt(dtype, std::move(shape), std::shared_ptr<void>(data, [owner](void*) { delete owner; }),
                         memory);
  }

  std::string name_;
  OrtRuntime& runtime_;
  Ort::MemoryInfo cpu_;
  bool device_io_ = false;                 // the session has the CUDA or TensorRT provider
  bool profiling_ = false;                 // the session profiles, and end_profiling has not run
  std::unique_ptr<Ort::MemoryInfo> cuda_;  // with device_io_: CUDA memory on the engine's device
  std::unique_ptr<Ort::Session> session_;
  std::vector<TensorInfo> inputs_, outputs_;
  std::unordered_map<std::string, size_t> input_index_, output_index_;
};

}  // namespace

std::unique_ptr<Engine> make_onnxruntime_engine(const std::filesystem::path& onnx_file, const std::string& name,
                                                const EngineOptions& options) {
  return std::make_unique<OnnxRuntimeEngine>(onnx_file, name, options);
}

std::vector<std::string> onnxruntime_providers(const std::string& onnxruntime_library) {
  return ort_runtime(onnxruntime_library).providers;
}

std::string onnxruntime_version(const std::string& onnxruntime_library) {
  return ort_runtime(onnxruntime_library).version;
}

std::string onnxruntime_library_in_use(const std::string& onnxruntime_library) {
  const OrtRuntime& r = ort_runtime(onnxruntime_library);
  return r.library + " (ONNX Runtime " + r.version + ")";
}

}  // namespace vle
