// Device memory behind the core's Allocator interface, and the host <-> device copies the loop needs.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "memory/tensor.h"

namespace vle {
namespace cuda {

// CUDA memory on one GPU (cudaMalloc, zero-filled). One allocator per device for the life of the process;
// the first call for a device checks that it exists (an EngineError naming the CUDA error otherwise).
Allocator& device_allocator(int device_id = 0);

// Copies of `bytes` bytes. The synchronous ones return when the copy is done; the async ones are ordered on
// `stream` (from or to pageable host memory they may still wait for the copy, as cudaMemcpyAsync does).
void copy_to_device(void* device_dst, const void* host_src, size_t bytes);
void copy_to_host(void* host_dst, const void* device_src, size_t bytes);
void copy_to_device_async(void* device_dst, const void* host_src, size_t bytes, cudaStream_t stream);
void copy_to_host_async(void* host_dst, const void* device_src, size_t bytes, cudaStream_t stream);
void copy_on_device_async(void* device_dst, const void* device_src, size_t bytes, cudaStream_t stream);

// A tensor's copy in the other memory: a host tensor on device `device_id`, a device tensor on the host.
Tensor to_device(const Tensor& host, int device_id = 0);
Tensor to_host(const Tensor& device);

// An owned stream on the current device (non-blocking with respect to the legacy default stream).
class Stream {
 public:
  Stream();
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return stream_; }
  void synchronize() const;

 private:
  cudaStream_t stream_ = nullptr;
};

}  // namespace cuda
}  // namespace vle
