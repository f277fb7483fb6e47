// Engines: one object per exported graph that runs it. The loop talks to this interface only; the ONNX
// Runtime implementation (engines/onnxruntime.cpp) is the one we have, with its execution providers (CPU by
// default; CUDA and TensorRT where the loaded onnxruntime has them).
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engines/tensorrt.h"
#include "memory/tensor.h"

namespace vle {

// One graph input or output as the engine sees it; -1 for a dynamic axis.
struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
};

struct EngineOptions {
  // Execution providers in preference order, e.g. {"CUDAExecutionProvider", "CPUExecutionProvider"};
  // empty means CPU. One the loaded onnxruntime lacks is a BackendUnavailableError naming what it has.
  std::vector<std::string> providers;
  // Options per provider ("CUDAExecutionProvider" -> {"device_id": "0"}), passed through as given.
  std::map<std::string, std::map<std::string, std::string>> provider_options;
  int threads = 0;      // intra-op threads; 0: ONNX Runtime's default
  bool spin = false;    // let idle intra-op workers spin
  // libonnxruntime to open; empty: $VLE_ONNXRUNTIME_LIBRARY, else the default CMake compiled in. The library
  // is opened once and kept for the life of the process, with one ONNX Runtime environment that every engine
  // shares; a process uses one library, so asking for another one later is a BackendUnavailableError.
  std::string onnxruntime_library;
  // The GPU the CUDA and TensorRT execution providers run on, and where device views live (MemoryKind::kDevice
  // means CUDA memory on this device). Given to those providers as their "device_id" unless their options
  // name one, which must then agree.
  int device_id = 0;
  // Non-empty: ONNX Runtime profiles the session into "<prefix>_<date>.json" (a Chrome trace, read by
  // engines/ort_profile.h), completed by Engine::end_profiling().
  std::string profile_prefix;
  // The "tensorrt" backend's graph facts and choices (engines/tensorrt.h); the "onnxruntime" backend ignores
  // them.
  TensorrtOptions tensorrt;
};

using NamedView = std::pair<std::string, TensorView>;

class Engine {
 public:
  virtual ~Engine() = default;
  virtual const std::string& name() const = 0;
  virtual const std::vector<TensorInfo>& inputs() const = 0;
  virtual const std::vector<TensorInfo>& outputs() const = 0;

  // Whether run() binds device views (MemoryKind::kDevice inputs and bound outputs) and fetches into device
  // memory: true when the session runs on the CUDA or TensorRT execution provider.
  virtual bool device_io() const = 0;

  // With EngineOptions::profile_prefix: ends the session's profile and returns its file; "" without.
  virtual std::string end_profiling() = 0;

  // Runs the graph once. Every input is bound by pointer (no copy); `bound` outputs are written straight
  // into the caller's buffers (e.g. the KV arena's next rows); the outputs named in `fetch` come back as new
  // tensors, in that order, allocated where `fetch_memory` says (kDevice: by ONNX Runtime's allocator on
  // the engine's GPU; the tensors own that buffer). The call returns when every output is written (ONNX
  // Runtime synchronises its stream at the end of a run), so the caller may use them on any stream.
  // Missing or unexpected inputs, wrong dtypes, device memory on an engine without device_io() and unknown
  // output names are errors naming the graph and the tensor, raised before anything runs.
  virtual std::vector<Tensor> run(const std::vector<NamedView>& inputs, const std::vector<NamedView>& bound,
                                  const std::vector<std::string>& fetch,
                                  MemoryKind fetch_memory = MemoryKind::kHost) = 0;
};

// The engine of one graph on a backend: "onnxruntime" (the providers EngineOptions names), or "tensorrt"
// (ONNX Runtime's TensorRT provider with the options engines/tensorrt.h plans from EngineOptions::tensorrt;
// a BackendUnavailableError naming what the loaded onnxruntime has when it lacks that provider). `name` is
// the graph's name in the manifest, used in every message.
std::unique_ptr<Engine> make_engine(const std::string& backend, const std::filesystem::path& onnx_file,
                                    const std::string& name, const EngineOptions& options);

// Execution providers the onnxruntime library (opened as `make_engine` would) offers.
std::vector<std::string> available_providers(const std::string& onnxruntime_library = "");

// "PATH (ONNX Runtime VERSION)": the onnxruntime library the engines use, opened if need be.
std::string onnxruntime_library_in_use(const std::string& onnxruntime_library = "");

}  // namespace vle
