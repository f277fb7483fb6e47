#include "cuda/sampling.h"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>

#include <stdexcept>
#include <string>

#include "cuda/check.h"
#include "cuda/half.cuh"

namespace vle {
namespace cuda {

namespace {

// The reductions and scans run in one block: a vocabulary is tens of thousands of values, a few passes of a
// 1024-thread block, and one block keeps every step's result deterministic without a second launch.
constexpr int kBlock = 1024;
constexpr int64_t kNone = INT64_MAX;
enum : int64_t { kOk = 0, kNoFiniteValue = 1 };

template <typename T> __device__ __forceinline__ float load_logit(const T* logits, int64_t i);
template <> __device__ __forceinline__ float load_logit<float>(const float* logits, int64_t i) { return logits[i]; }
template <> __device__ __forceinline__ float load_logit<uint16_t>(const uint16_t* logits, int64_t i) {
  return from_half_bits(logits[i]);
}

// apply_repetition_penalty's float arithmetic for one logit.
template <typename T>
__device__ __forceinline__ float penalized_logit(const T* logits, const uint8_t* penalized, int64_t i, bool penalize,
                                                 float penalty) {
  const float v = load_logit(logits, i);
  if (!penalize || !penalized[i]) return v;
  return v > 0.0f ? v / penalty : v * penalty;
}

struct Best {
  float value;
  int64_t index;
};

// The CPU's argmax moves to index i only when values[i] > values[best]: the first of equal values wins and
// a NaN never does (values[0] being NaN is handled by the caller).
struct BetterOf {
  __device__ Best operator()(const Best& a, const Best& b) const {
    const bool a_nan = a.value != a.value, b_nan = b.value != b.value;
    if (a_nan != b_nan) return a_nan ? b : a;
    if (a.value > b.value) return a;
    if (b.value > a.value) return b;
    return a.index < b.index ? a : b;
  }
};

struct MinIndex {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a < b ? a : b; }
};
struct MaxIndex {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a > b ? a : b; }
};
struct MaxIgnoringNan {
  __device__ double operator()(double a, double b) const { return fmax(a, b); }
};

template <typename T>
__global__ void argmax_kernel(const T* logits, const uint8_t* penalized, int64_t vocab, bool penalize, float penalty,
                              int64_t* result) {
  using Reduce = cub::BlockReduce<Best, kBlock>;
  __shared__ typename Reduce::TempStorage temp;
  Best best{__int_as_float(0x7fc00000), kNone};
  for (int64_t i = threadIdx.x; i < vocab; i += kBlock) {
    best = BetterOf()(best, Best{penalized_logit(logits, penalized, i, penalize, penalty), i});
  }
  best = Reduce(temp).Reduce(best, BetterOf());
  if (threadIdx.x == 0) {
    const float first = penalized_logit(logits, penalized, 0, penalize, penalty);
    result[0] = first != first ? 0 : best.index;
  }
}

template <typename T>
__global__ void scale_kernel(const T* logits, const uint8_t* penalized, int64_t vocab, bool penalize, float penalty,
                             double temperature, double* z) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < vocab; i += int64_t{gridDim.x} * blockDim.x) {
    z[i] = static_cast<double>(penalized_logit(logits, penalized, i, penalize, penalty)) / temperature;
  }
}

// Softmax over the live tokens (all, or those not below the k-th value `kth`): probs[i] = exp(z - max) / sum.
__global__ void softmax_kernel(const double* z, int64_t vocab, const double* kth, double* probs, int64_t* result) {
  using Reduce = cub::BlockReduce<double, kBlock>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ double shared_max, shared_total;
  const double threshold = kth != nullptr ? *kth : -INFINITY;
  double local_max = -INFINITY;
  for (int64_t i = threadIdx.x; i < vocab; i += kBlock) {
    if (!(z[i] < threshold)) local_max = fmax(local_max, z[i]);
  }
  const double max_z = Reduce(temp).Reduce(local_max, MaxIgnoringNan());
  if (threadIdx.x == 0) shared_max = max_z;
  __syncthreads();
  if (!isfinite(shared_max)) {
    if (threadIdx.x == 0) result[1] = kNoFiniteValue;
    return;
  }
  double local_total = 0.0;
  for (int64_t i = threadIdx.x; i < vocab; i += kBlock) {
    const double p = z[i] < threshold ? 0.0 : exp(z[i] - shared_max);
    probs[i] = p;
    local_total += p;
  }
  const double total = Reduce(temp).Sum(local_total);
  if (threadIdx.x == 0) shared_total = total;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < vocab; i += kBlock) {
    if (!(z[i] < threshold)) probs[i] /= shared_total;
  }
}

// Top-p over the probabilities sorted most probable first (ties by index): the first token whose preceding
// mass exceeds top_p, and every one after it, get 0; the kept ones are divided by their mass.
__global__ void nucleus_kernel(const double* sorted_probs, const int32_t* sorted_index, int64_t vocab, double top_p,
                               double* probs) {
  using Scan = cub::BlockScan<double, kBlock>;
  using Reduce = cub::BlockReduce<int64_t, kBlock>;
  __shared__ typename Scan::TempStorage scan_temp;
  __shared__ typename Reduce::TempStorage reduce_temp;
  __shared__ double carry, kept;
  __shared__ int64_t keep;
  if (threadIdx.x == 0) {
    carry = 0.0;
    keep = kNone;
  }
  __syncthreads();
  for (int64_t base = 0; base < vocab; base += kBlock) {
    const int64_t j = base + threadIdx.x;
    const double p = j < vocab ? sorted_probs[j] : 0.0;
    double before, chunk;
    Scan(scan_temp).ExclusiveSum(p, before, chunk);
    before += carry;
    const int64_t first = Reduce(reduce_temp).Reduce(j < vocab && before > top_p ? j : kNone, MinIndex());
    if (threadIdx.x == 0 && first != kNone) keep = first;
    __syncthreads();
    if (keep != kNone) {
      if (j == keep) kept = before;
      break;
    }
    if (threadIdx.x == 0) carry += chunk;
    __syncthreads();
  }
  __syncthreads();
  if (threadIdx.x == 0 && keep == kNone) {
    keep = vocab;
    kept = carry;
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < vocab; j += kBlock) {
    probs[sorted_index[j]] = j < keep ? sorted_probs[j] / kept : 0.0;
  }
}

// Inverse CDF in index order: the first token with mass whose cumulative probability exceeds u, else the
// last token with mass (rounding at the top).
__global__ void draw_kernel(const double* probs, int64_t vocab, double u, int64_t* result) {
  using Scan = cub::BlockScan<double, kBlock>;
  using Reduce = cub::BlockReduce<int64_t, kBlock>;
  __shared__ typename Scan::TempStorage scan_temp;
  __shared__ typename Reduce::TempStorage reduce_temp;
  __shared__ double carry;
  __shared__ int64_t token, last;
  if (threadIdx.x == 0) {
    carry = 0.0;
    token = kNone;
    last = -1;
  }
  __syncthreads();
  for (int64_t base = 0; base < vocab; base += kBlock) {
    const int64_t j = base + threadIdx.x;
    const double p = j < vocab ? probs[j] : 0.0;
    double cumulative, chunk;
    Scan(scan_temp).InclusiveSum(p, cumulative, chunk);
    cumulative += carry;
    const int64_t first = Reduce(reduce_temp).Reduce(p > 0.0 && u < cumulative ? j : kNone, MinIndex());
    __syncthreads();
    const int64_t with_mass = Reduce(reduce_temp).Reduce(p > 0.0 ? j : int64_t{-1}, MaxIndex());
    if (threadIdx.x == 0) {
      if (first != kNone) token = first;
      if (with_mass > last) last = with_mass;
      carry += chunk;
    }
    __syncthreads();
    if (token != kNone) break;
  }
  if (threadIdx.x == 0) result[0] = token != kNone ? token : last;
}

__global__ void iota32_kernel(int32_t* dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = static_cast<int32_t>(i);
  }
}

void check_launch(const char* kernel) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) throw_cuda_error(status, kernel, __FILE__, __LINE__);
}

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + 255) / 256;
  return static_cast<unsigned>(blocks < 4096 ? blocks : 4096);
}

template <typename T>
void launch_argmax(const void* logits, const uint8_t* penalized, int64_t vocab, bool penalize, float penalty,
                   int64_t* result, cudaStream_t stream) {
  argmax_kernel<T><<<1, kBlock, 0, stream>>>(static_cast<const T*>(logits), penalized, vocab, penalize, penalty,
                                             result);
}

template <typename T>
void launch_scale(const void* logits, const uint8_t* penalized, int64_t vocab, bool penalize, float penalty,
                  double temperature, double* z, cudaStream_t stream) {
  scale_kernel<T><<<grid_for(vocab), 256, 0, stream>>>(static_cast<const T*>(logits), penalized, vocab, penalize,
                                                       penalty, temperature, z);
}

}  // namespace

DeviceSampler::DeviceSampler(int64_t vocab) : vocab_(vocab) {
  if (vocab <= 0 || vocab > INT32_MAX) {
    throw std::invalid_argument("DeviceSampler: the vocabulary must have 1 to 2^31-1 tokens, got " +
                                std::to_string(vocab));
  }
  const auto n = static_cast<size_t>(vocab);
  try {
    VLE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&penalized_), n));
    VLE_CUDA_CHECK(cudaMemset(penalized_, 0, n));
    for (double** buffer : {&z_, &sorted_z_, &probs_, &sorted_probs_}) {
      VLE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(buffer), n * sizeof(double)));
    }
    for (int32_t** buffer : {&index_, &sorted_index_}) {
      VLE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(buffer), n * sizeof(int32_t)));
    }
    VLE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&result_), 2 * sizeof(int64_t)));
    VLE_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&host_result_), 2 * sizeof(int64_t)));
    size_t keys_bytes = 0, pairs_bytes = 0;
    const int items = static_cast<int>(vocab);
    VLE_CUDA_CHECK(cub::DeviceRadixSort::SortKeysDescending(nullptr, keys_bytes, z_, sorted_z_, items));
    VLE_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(nullptr, pairs_bytes, probs_, sorted_probs_, index_,
                                                             sorted_index_, items));
    sort_temp_bytes_ = keys_bytes > pairs_bytes ? keys_bytes : pairs_bytes;
    VLE_CUDA_CHECK(cudaMalloc(&sort_temp_, sort_temp_bytes_));
    iota32_kernel<<<grid_for(vocab), 256>>>(index_, vocab);
    check_launch("iota32_kernel<<<...>>>");
    VLE_CUDA_CHECK(cudaDeviceSynchronize());
  } catch (...) {
    release();
    throw;
  }
}

DeviceSampler::~DeviceSampler() { release(); }

void DeviceSampler::release() noexcept {
  for (void* p : {static_cast<void*>(penalized_), static_cast<void*>(z_), static_cast<void*>(sorted_z_),
                  static_cast<void*>(probs_), static_cast<void*>(sorted_probs_), static_cast<void*>(index_),
                  static_cast<void*>(sorted_index_), static_cast<void*>(result_), sort_temp_}) {
    if (p != nullptr) cudaFree(p);
  }
  if (host_result_ != nullptr) cudaFreeHost(host_result_);
  penalized_ = nullptr;
  z_ = sorted_z_ = probs_ = sorted_probs_ = nullptr;
  index_ = sorted_index_ = nullptr;
  result_ = host_result_ = nullptr;
  sort_temp_ = nullptr;
}

void DeviceSampler::set_penalized(const std::vector<int64_t>& ids, cudaStream_t stream) {
  std::vector<uint8_t> flags(static_cast<size_t>(vocab_), 0);
  for (int64_t id : ids) {
    if (id < 0 || id >= vocab_) {
      throw std::invalid_argument("penalized_ids: id " + std::to_string(id) + " is outside the vocabulary of " +
                                  std::to_string(vocab_));
    }
    flags[static_cast<size_t>(id)] = 1;
  }
  // From pageable memory: cudaMemcpyAsync has staged the bytes when it returns, so `flags` may go.
  VLE_CUDA_CHECK(cudaMemcpyAsync(penalized_, flags.data(), flags.size(), cudaMemcpyHostToDevice, stream));
}

void DeviceSampler::add_penalized(int64_t id, cudaStream_t stream) {
  if (id < 0 || id >= vocab_) {
    throw std::invalid_argument("penalized_ids: id " + std::to_string(id) + " is outside the vocabulary of " +
                                std::to_string(vocab_));
  }
  VLE_CUDA_CHECK(cudaMemsetAsync(penalized_ + id, 1, 1, stream));
}

int64_t DeviceSampler::next_token(const void* logits, DType dtype, const SamplingParams& params, double u,
                                  cudaStream_t stream) {
  check_sampling_params(params);
  if (dtype != DType::kFloat32 && dtype != DType::kFloat16) {
    throw InputError(std::string("DeviceSampler: logits must be float32 or float16, got ") + dtype_name(dtype));
  }
  const bool half = dtype == DType::kFloat16;
  const bool penalize = params.repetition_penalty != 1.0;
  const auto penalty = static_cast<float>(params.repetition_penalty);
  VLE_CUDA_CHECK(cudaMemsetAsync(result_ + 1, 0, sizeof(int64_t), stream));  // the status: kOk
  if (!params.do_sample) {
    (half ? launch_argmax<uint16_t> : launch_argmax<float>)(logits, penalized_, vocab_, penalize, penalty, result_,
                                                             stream);
    check_launch("argmax_kernel<<<...>>>");
  } else {
    (half ? launch_scale<uint16_t> : launch_scale<float>)(logits, penalized_, vocab_, penalize, penalty,
                                                           params.temperature, z_, stream);
    check_launch("scale_kernel<<<...>>>");
    const int items = static_cast<int>(vocab_);
    const double* kth = nullptr;
    if (params.top_k > 0 && params.top_k < vocab_) {
      size_t bytes = sort_temp_bytes_;
      VLE_CUDA_CHECK(cub::DeviceRadixSort::SortKeysDescending(sort_temp_, bytes, z_, sorted_z_, items, 0, 64, stream));
      kth = sorted_z_ + (params.top_k - 1);
    }
    softmax_kernel<<<1, kBlock, 0, stream>>>(z_, vocab_, kth, probs_, result_);
    check_launch("softmax_kernel<<<...>>>");
    // A failed softmax leaves its status in result_[1]; the kernels after it then work on stale values
    // whose token is never used.
    if (params.top_p < 1.0) {
      size_t bytes = sort_temp_bytes_;
      VLE_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(sort_temp_, bytes, probs_, sorted_probs_, index_,
                                                               sorted_index_, items, 0, 64, stream));
      nucleus_kernel<<<1, kBlock, 0, stream>>>(sorted_probs_, sorted_index_, vocab_, params.top_p, probs_);
      check_launch("nucleus_kernel<<<...>>>");
    }
    draw_kernel<<<1, kBlock, 0, stream>>>(probs_, vocab_, u, result_);
    check_launch("draw_kernel<<<...>>>");
  }
  VLE_CUDA_CHECK(cudaMemcpyAsync(host_result_, result_, 2 * sizeof(int64_t), cudaMemcpyDeviceToHost, stream));
  VLE_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (host_result_[1] == kNoFiniteValue) throw std::invalid_argument("logits: no finite value to sample from");
  return host_result_[0];
}

}  // namespace cuda
}  // namespace vle
