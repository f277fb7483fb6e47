// The one check every CUDA runtime call of the library goes through: a failure is a vle::EngineError naming
// the call as written, where it was made and CUDA's name and text for the error.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "visionllm_edge/errors.h"

namespace vle {
namespace cuda {

[[noreturn]] void throw_cuda_error(cudaError_t status, const char* call, const char* file, int line);

}  // namespace cuda
}  // namespace vle

#define VLE_CUDA_CHECK(call)                                                       \
  do {                                                                             \
    const cudaError_t vle_cuda_status_ = (call);                                   \
    if (vle_cuda_status_ != cudaSuccess) {                                         \
      ::vle::cuda::throw_cuda_error(vle_cuda_status_, #call, __FILE__, __LINE__);  \
    }                                                                              \
  } while (0)
