#include "cuda/device.h"

#include <cuda_runtime.h>

#include "cuda/check.h"

namespace vle {
namespace cuda {

void throw_cuda_error(cudaError_t status, const char* call, const char* file, int line) {
  throw EngineError(std::string("CUDA call ") + call + " failed at " + file + ":" + std::to_string(line) + ": " +
                    cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
}

namespace {

bool fail(std::string* why, const std::string& text) {
  if (why) *why = text;
  return false;
}

std::string error_text(const char* call, cudaError_t status) {
  return std::string(call) + ": " + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")";
}

}  // namespace

int device_count(std::string* why) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();  // clears the (non-sticky) error, so the next call does not report it again
    fail(why, error_text("cudaGetDeviceCount", status));
    return 0;
  }
  if (count == 0) fail(why, "the CUDA runtime sees no GPU");
  return count;
}

bool cuda_available(std::string* why, int device_id) {
  const int count = device_count(why);
  if (count == 0) return false;
  if (device_id < 0 || device_id >= count) {
    return fail(why, "GPU " + std::to_string(device_id) + " does not exist (" + std::to_string(count) +
                         " device(s))");
  }
  // Making the context is what fails on a broken installation (driver older than the runtime, a GPU in a
  // bad state), so ask for it here rather than on the first allocation.
  int previous = 0;
  cudaGetDevice(&previous);
  cudaError_t status = cudaSetDevice(device_id);
  if (status == cudaSuccess) status = cudaFree(nullptr);
  cudaSetDevice(previous);
  if (status != cudaSuccess) {
    cudaGetLastError();
    return fail(why, "creating a context on GPU " + std::to_string(device_id) + ": " +
                         error_text("cudaSetDevice / cudaFree(nullptr)", status));
  }
  return true;
}

bool device_info(int device_id, DeviceInfo& info, std::string* why) {
  cudaDeviceProp prop{};
  const cudaError_t status = cudaGetDeviceProperties(&prop, device_id);
  if (status != cudaSuccess) {
    cudaGetLastError();
    return fail(why, error_text("cudaGetDeviceProperties", status));
  }
  info.id = device_id;
  info.name = prop.name;
  info.sm = prop.major * 10 + prop.minor;
  info.memory_bytes = prop.totalGlobalMem;
  return true;
}

}  // namespace cuda
}  // namespace vle
