#include "cuda/memory.h"

#include <map>
#include <memory>
#include <mutex>
#include <new>

#include "cuda/check.h"

namespace vle {
namespace cuda {

namespace {

// Sets the allocator's device for the duration of a call and restores the caller's.
class DeviceScope {
 public:
  explicit DeviceScope(int device_id) {
    VLE_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device_id) VLE_CUDA_CHECK(cudaSetDevice(device_id));
  }
  ~DeviceScope() { cudaSetDevice(previous_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

class DeviceAllocator final : public Allocator {
 public:
  explicit DeviceAllocator(int device_id) : device_id_(device_id) {}

  void* allocate(size_t bytes) override {
    DeviceScope scope(device_id_);
    void* p = nullptr;
    // cudaMalloc(0) hands back no pointer; one byte keeps "allocate returns a buffer" true for empty tensors.
    const cudaError_t status = cudaMalloc(&p, bytes == 0 ? 1 : bytes);
    if (status == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      throw std::bad_alloc();
    }
    VLE_CUDA_CHECK(status);
    const cudaError_t zeroed = cudaMemset(p, 0, bytes);
    if (zeroed != cudaSuccess) {
      cudaFree(p);
      VLE_CUDA_CHECK(zeroed);
    }
    return p;
  }
  void deallocate(void* p) noexcept override {
    // cudaFree synchronises the device, so no kernel still reads the buffer; an error here (a context being
    // torn down at exit) cannot be reported from a deleter.
    if (p != nullptr) cudaFree(p);
  }
  MemoryKind kind() const override { return MemoryKind::kDevice; }

 private:
  int device_id_;
};

}  // namespace

Allocator& device_allocator(int device_id) {
  static std::mutex mutex;
  static std::map<int, std::unique_ptr<DeviceAllocator>> allocators;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = allocators.find(device_id);
  if (it == allocators.end()) {
    int count = 0;
    VLE_CUDA_CHECK(cudaGetDeviceCount(&count));
    if (device_id < 0 || device_id >= count) {
      throw EngineError("GPU " + std::to_string(device_id) + " does not exist (the CUDA runtime sees " +
                        std::to_string(count) + " device(s))");
    }
    it = allocators.emplace(device_id, std::make_unique<DeviceAllocator>(device_id)).first;
  }
  return *it->second;
}

void copy_to_device(void* device_dst, const void* host_src, size_t bytes) {
  if (bytes) VLE_CUDA_CHECK(cudaMemcpy(device_dst, host_src, bytes, cudaMemcpyHostToDevice));
}

void copy_to_host(void* host_dst, const void* device_src, size_t bytes) {
  if (bytes) VLE_CUDA_CHECK(cudaMemcpy(host_dst, device_src, bytes, cudaMemcpyDeviceToHost));
}

void copy_to_device_async(void* device_dst, const void* host_src, size_t bytes, cudaStream_t stream) {
  if (bytes) VLE_CUDA_CHECK(cudaMemcpyAsync(device_dst, host_src, bytes, cudaMemcpyHostToDevice, stream));
}

void copy_to_host_async(void* host_dst, const void* device_src, size_t bytes, cudaStream_t stream) {
  if (bytes) VLE_CUDA_CHECK(cudaMemcpyAsync(host_dst, device_src, bytes, cudaMemcpyDeviceToHost, stream));
}

void copy_on_device_async(void* device_dst, const void* device_src, size_t bytes, cudaStream_t stream) {
  if (bytes) VLE_CUDA_CHECK(cudaMemcpyAsync(device_dst, device_src, bytes, cudaMemcpyDeviceToDevice, stream));
}

Tensor to_device(const Tensor& host, int device_id) {
  if (host.memory() != MemoryKind::kHost) throw InputError("to_device: the tensor is already in device memory");
  Tensor out(host.dtype(), host.shape(), device_allocator(device_id));
  copy_to_device(out.data(), host.data(), host.bytes());
  return out;
}

Tensor to_host(const Tensor& device) {
  if (device.memory() != MemoryKind::kDevice) throw InputError("to_host: the tensor is already in host memory");
  Tensor out(device.dtype(), device.shape());
  copy_to_host(out.data(), device.data(), device.bytes());
  return out;
}

Stream::Stream() { VLE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }

Stream::~Stream() {
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

void Stream::synchronize() const { VLE_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

}  // namespace cuda
}  // namespace vle
