// The TensorRT backend's planning: the machine's facts, provider options, profiles and the stamped engine
// cache (tensorrt.h). The session itself is the ONNX Runtime engine's (make_engine).
#include "engines/tensorrt.h"

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <set>
#include <sstream>
#include <system_error>

#include "artifact/files.h"
#include "engines/engine.h"
#include "engines/onnxruntime.h"
#include "visionllm_edge/errors.h"

namespace vle {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

std::string joined(const std::vector<std::string>& names) {
  std::string s;
  for (const std::string& n : names) s += (s.empty() ? "" : ", ") + n;
  return s;
}

// The first library of `names` that opens (kept open for the process: the probe runs once per engine and
// the libraries are the ones ONNX Runtime's provider loads anyway); a BackendUnavailableError naming them
// all when none does.
void* open_first(const std::vector<std::string>& names, const std::string& what) {
  std::string why;
  for (const std::string& name : names) {
    if (void* handle = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL)) return handle;
    const char* e = dlerror();
    why = e ? e : "unknown error";
  }
  throw BackendUnavailableError("the TensorRT backend needs " + what + ", and none of " + joined(names) +
                                " opens (last: " + why + ")");
}

template <typename F>
F symbol(void* handle, const char* name, const std::string& library) {
  void* p = dlsym(handle, name);
  if (p == nullptr) throw BackendUnavailableError(library + " has no " + name);
  return reinterpret_cast<F>(p);
}

std::string shape_string(const std::vector<std::pair<std::string, std::vector<int64_t>>>& shapes) {
  std::string s;
  for (const auto& [name, dims] : shapes) {
    if (!s.empty()) s += ",";
    s += name + ":";
    for (size_t i = 0; i < dims.size(); ++i) s += (i ? "x" : "") + std::to_string(dims[i]);
  }
  return s;
}

// The files of an engine folder other than its stamp (and a stamp being written), by name.
std::vector<std::string> cache_files(const fs::path& dir, bool* only_files) {
  std::vector<std::string> names;
  *only_files = true;
  for (const fs::directory_entry& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(kEngineStampFile, 0) == 0) continue;
    if (!e.is_regular_file()) *only_files = false;
    names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  return names;
}

void clear_folder(const fs::path& dir) {
  for (const fs::directory_entry& e : fs::directory_iterator(dir)) fs::remove_all(e.path());
}

}  // namespace

std::string TensorrtMachine::version() const {
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}

std::string TensorrtMachine::sm() const { return std::to_string(sm_major) + "." + std::to_string(sm_minor); }

void decode_tensorrt_version(int64_t number, TensorrtMachine* machine) {
  const int64_t scale = number >= 100000 ? 10000 : 1000;
  machine->major = static_cast<int>(number / scale);
  machine->minor = static_cast<int>(number % scale / 100);
  machine->patch = static_cast<int>(number % 100);
}

TensorrtMachine probe_tensorrt_machine(int device_id, const std::vector<std::string>& nvinfer_libraries,
                                       const std::vector<std::string>& cuda_libraries) {
  TensorrtMachine m;
  void* nvinfer = open_first(nvinfer_libraries, "TensorRT's libnvinfer");
  auto version = symbol<int32_t (*)()>(nvinfer, "getInferLibVersion", "libnvinfer");
  decode_tensorrt_version(version(), &m);

  // The driver API's C entry points, by their documented signatures (CUresult is an int, CUdevice an int).
  void* cuda = open_first(cuda_libraries, "the CUDA driver's libcuda");
  auto cu_init = symbol<int (*)(unsigned)>(cuda, "cuInit", "libcuda");
  auto cu_device_get = symbol<int (*)(int*, int)>(cuda, "cuDeviceGet", "libcuda");
  auto cu_device_get_name = symbol<int (*)(char*, int, int)>(cuda, "cuDeviceGetName", "libcuda");
  auto cu_device_get_attribute = symbol<int (*)(int*, int, int)>(cuda, "cuDeviceGetAttribute", "libcuda");
  constexpr int kComputeCapabilityMajor = 75, kComputeCapabilityMinor = 76;  // CU_DEVICE_ATTRIBUTE_...
  int device = 0;
  char name[256] = {};
  if (int rc = cu_init(0); rc != 0) {
    throw BackendUnavailableError("the CUDA driver does not start (cuInit returned " + std::to_string(rc) +
                                  "): the TensorRT backend needs an NVIDIA GPU");
  }
  if (int rc = cu_device_get(&device, device_id); rc != 0) {
    throw BackendUnavailableError("there is no CUDA device " + std::to_string(device_id) +
                                  " (cuDeviceGet returned " + std::to_string(rc) + ")");
  }
  if (cu_device_get_name(name, sizeof(name) - 1, device) != 0 ||
      cu_device_get_attribute(&m.sm_major, kComputeCapabilityMajor, device) != 0 ||
      cu_device_get_attribute(&m.sm_minor, kComputeCapabilityMinor, device) != 0) {
    throw BackendUnavailableError("CUDA device " + std::to_string(device_id) +
                                  ": the driver did not give its name and compute capability");
  }
  m.gpu_name = name;
  return m;
}

TensorrtProfileStrings tensorrt_profile_strings(const ProfileTable& profiles) {
  if (profiles.profiles.empty() || !profiles.unresolved.empty()) return {};
  std::vector<std::pair<std::string, std::vector<int64_t>>> min, opt, max;
  const Profile& first = profiles.profiles.front();
  for (const auto& [name, shapes] : first.inputs) {
    std::vector<int64_t> lo = shapes.min, hi = shapes.max;
    for (const Profile& p : profiles.profiles) {
      for (const auto& [other, s] : p.inputs) {
        if (other != name) continue;
        for (size_t i = 0; i < lo.size() && i < s.min.size(); ++i) {
          lo[i] = std::min(lo[i], s.min[i]);
          hi[i] = std::max(hi[i], s.max[i]);
        }
      }
    }
    min.emplace_back(name, lo);
    opt.emplace_back(name, shapes.opt);
    max.emplace_back(name, hi);
  }
  return {shape_string(min), shape_string(opt), shape_string(max)};
}

TensorrtPlan plan_tensorrt(const std::string& graph, const TensorrtOptions& options, const TensorrtMachine& machine,
                           int device_id, const std::string& onnxruntime_version) {
  if (machine.major < 10) {
    throw BackendUnavailableError(graph + ": the loaded TensorRT is " + machine.version() +
                                  "; the TensorRT backend needs TensorRT 10 or 11");
  }
  TensorrtPlan plan;
  auto& po = plan.provider_options;
  po["device_id"] = std::to_string(device_id);
  std::string precision = options.precision;
  if (machine.major >= 11) {
    // Strongly typed: the builder takes the types the ONNX has, and there is no fp16 flag to set.
    if (options.fp16 && options.precision != "fp16") {
      throw InputError(graph + ": fp16 was asked for, but TensorRT " + machine.version() +
                       " is strongly typed (no fp16 builder flag) and this graph is " + options.precision +
                       "; export the artifact with --precision fp16 instead");
    }
  } else if (options.fp16 || options.precision == "fp16") {
    po["trt_fp16_enable"] = "1";
    po["trt_layer_norm_fp32_fallback"] = "1";
    precision = "fp16";
  }
  const TensorrtProfileStrings profiles = tensorrt_profile_strings(options.profiles);
  if (!profiles.min.empty()) {
    po["trt_profile_min_shapes"] = profiles.min;
    po["trt_profile_opt_shapes"] = profiles.opt;
    po["trt_profile_max_shapes"] = profiles.max;
  }
  if (!options.cache_dir.empty()) {
    const std::string dir = options.cache_dir.string();
    po["trt_engine_cache_enable"] = "1";
    po["trt_engine_cache_path"] = dir;
    po["trt_timing_cache_enable"] = "1";
    po["trt_timing_cache_path"] = dir;
  }
  plan.stamp = {{"tensorrt_version", machine.version()},
                {"gpu", machine.gpu_name},
                {"sm", machine.sm()},
                {"precision", precision},
                {"profiles", {{"min", profiles.min}, {"opt", profiles.opt}, {"max", profiles.max}}},
                {"source_onnx_sha256", options.onnx_sha256},
                {"onnxruntime_version", onnxruntime_version}};
  return plan;
}

bool prepare_engine_cache(const fs::path& dir, const json& stamp) {
  std::error_code made;
  fs::create_directories(dir, made);
  if (made) {
    throw ArtifactError(dir.string() + ": cannot create the TensorRT engine folder (" + made.message() +
                        "); give a writable one with engine_cache / --engine-cache");
  }
  const fs::path stamp_file = dir / kEngineStampFile;
  json old;
  bool readable = false;
  if (std::ifstream in(stamp_file); in) {
    old = json::parse(in, nullptr, /*allow_exceptions=*/false);
    readable = old.is_object() && old.contains("plans") && old["plans"].is_object();
  }
  bool same = readable;
  for (auto it = stamp.begin(); same && it != stamp.end(); ++it) {
    same = old.contains(it.key()) && old[it.key()] == it.value();
  }
  if (same) {
    bool only_files = false;
    const std::vector<std::string> files = cache_files(dir, &only_files);
    std::set<std::string> listed;
    for (auto it = old["plans"].begin(); it != old["plans"].end(); ++it) listed.insert(it.key());
    same = only_files && !files.empty() && std::set<std::string>(files.begin(), files.end()) == listed;
    for (size_t i = 0; same && i < files.size(); ++i) {
      const json& want = old["plans"][files[i]];
      const std::string got = file_sha256(dir / files[i]);
      if (!want.is_string() || want.get<std::string>() != got) {
        const std::string listed_sha = want.is_string() ? want.get<std::string>() : want.dump();
        throw ArtifactError((dir / files[i]).string() + ": corrupt TensorRT plan: its sha256 is " + got +
                            ", the stamp " + stamp_file.string() + " says " + listed_sha +
                            "; delete the folder to rebuild it");
      }
    }
  }
  if (!same) {
    try {
      clear_folder(dir);
    } catch (const fs::filesystem_error& e) {
      throw ArtifactError(dir.string() + ": cannot clear the stale TensorRT engines: " + e.what());
    }
  }
  return same;
}

void write_engine_stamp(const fs::path& dir, const json& stamp) {
  json full = stamp;
  full["plans"] = json::object();
  bool only_files = false;
  for (const std::string& name : cache_files(dir, &only_files)) {
    if (fs::is_regular_file(dir / name)) full["plans"][name] = file_sha256(dir / name);
  }
  const fs::path final_path = dir / kEngineStampFile;
  const fs::path temp = dir / (std::string(kEngineStampFile) + ".tmp-" + std::to_string(getpid()));
  {
    std::ofstream out(temp, std::ios::binary | std::ios::trunc);
    out << full.dump(1) << "\n";
    out.close();
    if (!out) throw ArtifactError(temp.string() + ": cannot write the TensorRT engine stamp");
  }
  std::error_code ec;
  fs::rename(temp, final_path, ec);
  if (ec) {
    fs::remove(temp, ec);
    throw ArtifactError(final_path.string() + ": cannot replace the TensorRT engine stamp: " + ec.message());
  }
}

void require_tensorrt_provider(const std::string& onnxruntime_library, const std::string& what) {
  const std::string trt = "TensorrtExecutionProvider";
  const std::vector<std::string> have = onnxruntime_providers(onnxruntime_library);
  if (std::find(have.begin(), have.end(), trt) != have.end()) return;
  std::string listed;
  for (const std::string& p : have) listed += (listed.empty() ? "'" : ", '") + p + "'";
  throw BackendUnavailableError(what + ": the TensorRT backend needs ONNX Runtime's " + trt + ", and " +
                                onnxruntime_library_in_use(onnxruntime_library) + " has [" + listed +
                                "]; install an onnxruntime built with TensorRT, or use the onnxruntime backend");
}

std::unique_ptr<Engine> make_tensorrt_engine(const fs::path& onnx_file, const std::string& name,
                                             const EngineOptions& options) {
  const std::string trt = "TensorrtExecutionProvider";
  require_tensorrt_provider(options.onnxruntime_library, name);
  if (!options.providers.empty()) {
    throw InputError(name + ": the TensorRT backend runs on [" + trt +
                     ", 'CUDAExecutionProvider', 'CPUExecutionProvider']; leave providers empty");
  }
  const TensorrtMachine machine = options.tensorrt.machine ? options.tensorrt.machine(options.device_id)
                                                           : probe_tensorrt_machine(options.device_id);
  const TensorrtPlan plan = plan_tensorrt(name, options.tensorrt, machine, options.device_id,
                                          onnxruntime_version(options.onnxruntime_library));
  EngineOptions session = options;
  session.providers = {trt, "CUDAExecutionProvider", "CPUExecutionProvider"};
  // The caller's own TensorRT options go through beside ours; one that sets a key we plan is refused, so
  // the stamp always describes what was built.
  std::map<std::string, std::string> trt_options = plan.provider_options;
  auto given = options.provider_options.find(trt);
  if (given != options.provider_options.end()) {
    for (const auto& [key, value] : given->second) {
      if (key != "device_id" && trt_options.count(key) != 0) {
        throw InputError(name + ": the TensorRT option '" + key + "' is set by the backend (" + trt_options[key] +
                         "); it cannot also be given");
      }
      trt_options.emplace(key, value);
    }
  }
  session.provider_options[trt] = trt_options;
  const fs::path& cache = options.tensorrt.cache_dir;
  if (!cache.empty()) prepare_engine_cache(cache, plan.stamp);
  std::unique_ptr<Engine> engine = make_onnxruntime_engine(onnx_file, name, session);
  if (!cache.empty()) write_engine_stamp(cache, plan.stamp);
  return engine;
}

}  // namespace vle
