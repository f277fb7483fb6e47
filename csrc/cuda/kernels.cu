#include "cuda/kernels.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "cuda/check.h"
#include "cuda/half.cuh"
#include "visionllm_edge/errors.h"

namespace vle {
namespace cuda {

namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 65535 * 32 ? b : 65535 * 32);  // grid-stride loops cover the rest
}

__global__ void float_to_half_kernel(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = to_half_bits(src[i]);
  }
}

__global__ void half_to_float_kernel(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = from_half_bits(src[i]);
  }
}

__global__ void iota_kernel(int64_t* dst, int64_t start, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count; i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = start + i;
  }
}

// One block per output row (grid-strided over rows), threads across the row.
template <typename Out>
__global__ void gather_kernel(const float* const* sources, int64_t rows, int64_t hidden, Out* out) {
  for (int64_t s = blockIdx.x; s < rows; s += gridDim.x) {
    const float* src = sources[s];
    Out* dst = out + s * hidden;
    for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) {
      if constexpr (sizeof(Out) == 2) {
        dst[h] = to_half_bits(src[h]);
      } else {
        dst[h] = src[h];
      }
    }
  }
}

void check_launch(const char* kernel) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) throw_cuda_error(status, kernel, __FILE__, __LINE__);
}

}  // namespace

void float_to_half(const float* src, uint16_t* dst, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  float_to_half_kernel<<<blocks_for(n), kThreads, 0, stream>>>(src, dst, n);
  check_launch("float_to_half_kernel<<<...>>>");
}

void half_to_float(const uint16_t* src, float* dst, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  half_to_float_kernel<<<blocks_for(n), kThreads, 0, stream>>>(src, dst, n);
  check_launch("half_to_float_kernel<<<...>>>");
}

void fill_iota(int64_t* dst, int64_t start, int64_t count, cudaStream_t stream) {
  if (count <= 0) return;
  iota_kernel<<<blocks_for(count), kThreads, 0, stream>>>(dst, start, count);
  check_launch("iota_kernel<<<...>>>");
}

GatherScratch::~GatherScratch() {
  if (consumed_ != nullptr) {
    cudaEventSynchronize(consumed_);
    cudaEventDestroy(consumed_);
  }
  if (device_ != nullptr) cudaFree(device_);
  if (pinned_ != nullptr) cudaFreeHost(pinned_);
}

void gather_rows(const std::vector<const float*>& sources, int64_t hidden, void* out, DType out_dtype,
                 GatherScratch& scratch, cudaStream_t stream) {
  if (out_dtype != DType::kFloat32 && out_dtype != DType::kFloat16) {
    throw InputError(std::string("gather_rows: the rows are written as float32 or float16, not ") +
                     dtype_name(out_dtype));
  }
  const auto rows = static_cast<int64_t>(sources.size());
  if (rows == 0 || hidden <= 0) return;
  if (scratch.consumed_ == nullptr) {
    VLE_CUDA_CHECK(cudaEventCreateWithFlags(&scratch.consumed_, cudaEventDisableTiming));
  } else {
    // The previous gather's kernel may still read the pinned and device arrays.
    VLE_CUDA_CHECK(cudaEventSynchronize(scratch.consumed_));
  }
  if (sources.size() > scratch.capacity_) {
    const size_t capacity = std::max(sources.size(), 2 * scratch.capacity_);
    if (scratch.device_ != nullptr) VLE_CUDA_CHECK(cudaFree(scratch.device_));
    if (scratch.pinned_ != nullptr) VLE_CUDA_CHECK(cudaFreeHost(scratch.pinned_));
    scratch.device_ = nullptr;
    scratch.pinned_ = nullptr;
    scratch.capacity_ = 0;
    VLE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&scratch.device_), capacity * sizeof(const float*)));
    VLE_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&scratch.pinned_), capacity * sizeof(const float*)));
    scratch.capacity_ = capacity;
  }
  std::memcpy(scratch.pinned_, sources.data(), sources.size() * sizeof(const float*));
  VLE_CUDA_CHECK(cudaMemcpyAsync(scratch.device_, scratch.pinned_, sources.size() * sizeof(const float*),
                                 cudaMemcpyHostToDevice, stream));
  const unsigned blocks = static_cast<unsigned>(rows < 65535 ? rows : 65535);
  if (out_dtype == DType::kFloat16) {
    gather_kernel<<<blocks, kThreads, 0, stream>>>(scratch.device_, rows, hidden, static_cast<uint16_t*>(out));
  } else {
    gather_kernel<<<blocks, kThreads, 0, stream>>>(scratch.device_, rows, hidden, static_cast<float*>(out));
  }
  check_launch("gather_kernel<<<...>>>");
  VLE_CUDA_CHECK(cudaEventRecord(scratch.consumed_, stream));
}

}  // namespace cuda
}  // namespace vle
