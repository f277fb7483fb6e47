// make_engine: the backend name to its engine.
#include "engines/engine.h"

#include "engines/onnxruntime.h"
#include "visionllm_edge/errors.h"

namespace vle {

std::unique_ptr<Engine> make_engine(const std::string& backend, const std::filesystem::path& onnx_file,
                                    const std::string& name, const EngineOptions& options) {
  if (backend == "onnxruntime") return make_onnxruntime_engine(onnx_file, name, options);
  if (backend == "tensorrt") return make_tensorrt_engine(onnx_file, name, options);
  throw InputError("unknown backend '" + backend + "'; known: 'onnxruntime', 'tensorrt'");
}

std::vector<std::string> available_providers(const std::string& onnxruntime_library) {
  return onnxruntime_providers(onnxruntime_library);
}

}  // namespace vle
