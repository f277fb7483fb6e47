// The ONNX Runtime engine behind make_engine (engines/onnxruntime.cpp). Private to the core: the loop asks
// make_engine for an Engine and never names this one.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "engines/engine.h"

namespace vle {

std::unique_ptr<Engine> make_onnxruntime_engine(const std::filesystem::path& onnx_file, const std::string& name,
                                                const EngineOptions& options);

// GetAvailableProviders of the library (opened as the engines open it).
std::vector<std::string> onnxruntime_providers(const std::string& onnxruntime_library);

// The library's own version string ("1.32.0").
std::string onnxruntime_version(const std::string& onnxruntime_library);

// The "tensorrt" backend (engines/tensorrt.cpp): an ONNX Runtime engine on the TensorRT provider.
std::unique_ptr<Engine> make_tensorrt_engine(const std::filesystem::path& onnx_file, const std::string& name,
                                             const EngineOptions& options);

}  // namespace vle
