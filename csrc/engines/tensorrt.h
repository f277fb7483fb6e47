// The "tensorrt" backend: ONNX Runtime's TensorRT execution provider (then CUDA, then CPU for what TensorRT
// does not take), with provider options we build from the manifest: one optimization profile per graph,
// the precision TensorRT's version allows, and engine and timing caches under a stamped folder
// (docs/architecture.md §5). What the machine has (the TensorRT version, the GPU) is read at run time by
// dlopen, so the core has no build-time dependency on TensorRT or CUDA; tests inject it.
#pragma once

#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engines/tensorrt_profiles.h"

namespace vle {

// What a TensorRT plan is built for.
struct TensorrtMachine {
  int major = 0, minor = 0, patch = 0;  // the loaded libnvinfer's version
  std::string gpu_name;                 // cuDeviceGetName
  int sm_major = 0, sm_minor = 0;       // compute capability
  std::string version() const;          // "10.3.0"
  std::string sm() const;               // "8.7"
};

// The machine as this process sees it: libnvinfer (getInferLibVersion) and libcuda (cuDeviceGetName,
// cuDeviceGetAttribute) opened by name, the first of each list that opens. A library that is missing, or a
// device the driver does not have, is a BackendUnavailableError naming what was tried.
TensorrtMachine probe_tensorrt_machine(int device_id,
                                       const std::vector<std::string>& nvinfer_libraries = {"libnvinfer.so.10",
                                                                                            "libnvinfer.so.11",
                                                                                            "libnvinfer.so"},
                                       const std::vector<std::string>& cuda_libraries = {"libcuda.so.1"});

// getInferLibVersion's number as major / minor / patch: TensorRT 10 and later write
// major * 10000 + minor * 100 + patch, earlier ones major * 1000 + minor * 100 + patch.
void decode_tensorrt_version(int64_t number, TensorrtMachine* machine);

// What the loader knows of one graph for the TensorRT backend.
struct TensorrtOptions {
  bool fp16 = false;                     // the user's --fp16
  std::string precision = "fp32";        // the graph's precision in the manifest
  std::string onnx_sha256;               // the graph's sha256 in the manifest
  ProfileTable profiles;                 // profile_shapes of the graph
  std::filesystem::path cache_dir;       // this graph's engine folder; empty: no caches
  // The machine's facts; empty: probe_tensorrt_machine. Tests inject a machine here.
  std::function<TensorrtMachine(int device_id)> machine;
};

// ONNX Runtime's explicit profile strings ("name:1x3x224x224,other:...") for the three keys
// trt_profile_min_shapes / _opt_ / _max_; all three empty when the graph has no dynamic input or a symbol
// is unresolved (ONNX Runtime then sizes profiles from the shapes it meets). ONNX Runtime's TensorRT
// provider builds several profiles but runs on profile 0 only (microsoft/onnxruntime#31624, open), so the
// profiles of a graph are merged into one: min and max cover them all, opt is the first one's (for the LLM,
// decode: every answer token is a decode step, the prefill runs once per request).
struct TensorrtProfileStrings {
  std::string min, opt, max;
};
TensorrtProfileStrings tensorrt_profile_strings(const ProfileTable& profiles);

// The provider options and the cache stamp for one graph on `machine`. Precision: TensorRT 10 builds in fp16
// by builder flag (trt_fp16_enable, with trt_layer_norm_fp32_fallback keeping normalisations in fp32) when
// --fp16 is asked or the graph is fp16; TensorRT 11 is strongly typed, so the precision is the graph's and
// no flag is set, and --fp16 on an fp32 graph is an InputError telling the user to export in fp16.
// TensorRT before 10 is a BackendUnavailableError.
struct TensorrtPlan {
  std::map<std::string, std::string> provider_options;
  nlohmann::json stamp;  // what the cache must have been built with (no "plans" yet)
};
TensorrtPlan plan_tensorrt(const std::string& graph, const TensorrtOptions& options, const TensorrtMachine& machine,
                           int device_id, const std::string& onnxruntime_version);

// A BackendUnavailableError, naming `what` and the providers the onnxruntime library has, when it lacks
// TensorrtExecutionProvider; nothing otherwise.
void require_tensorrt_provider(const std::string& onnxruntime_library, const std::string& what);

// The stamp file in a graph's engine folder.
constexpr const char* kEngineStampFile = "stamp.json";

// Before a session: whether the engine folder `dir` holds what `stamp` describes. It does when its stamp
// file has the same fields and every file in the folder is listed in the stamp's "plans" with its sha256;
// then the folder is kept and true returned. A listed file whose sha256 differs is an ArtifactError
// (a corrupt plan). Anything else (no stamp, an unreadable one, a field that differs, a missing or unlisted
// file) clears the folder for ONNX Runtime to build into, and returns false. The folder exists afterwards.
bool prepare_engine_cache(const std::filesystem::path& dir, const nlohmann::json& stamp);

// After a session: stamps `dir` with `stamp` plus the sha256 of every file in it, written to a temporary
// file renamed over the stamp, so a reader sees the old stamp or the new one, never a part.
void write_engine_stamp(const std::filesystem::path& dir, const nlohmann::json& stamp);

}  // namespace vle
