// The loop's small CUDA kernels, each the twin of a CPU function the tests compare it with: half
// conversions (memory/half.h), row gathers for the embedding assembly (loop/assemble.cpp) and the step's
// index inputs. Every launch is asynchronous on `stream`; launch errors are EngineErrors (cuda/check.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "memory/tensor.h"

namespace vle {
namespace cuda {

// `n` elements, device to device: float32 -> IEEE half bits (round to nearest even) and back, bit for bit
// as float_to_half / half_to_float (NaNs included).
void float_to_half(const float* src, uint16_t* dst, int64_t n, cudaStream_t stream);
void half_to_float(const uint16_t* src, float* dst, int64_t n, cudaStream_t stream);

// dst[i] = start + i for i < count (positions, contiguous output-row indices).
void fill_iota(int64_t* dst, int64_t start, int64_t count, cudaStream_t stream);

// The upload buffers of `gather_rows`, grown as needed and reused from call to call; one per stream of use
// (a gather waits for its previous upload to be consumed before overwriting it).
class GatherScratch {
 public:
  GatherScratch() = default;
  ~GatherScratch();
  GatherScratch(const GatherScratch&) = delete;
  GatherScratch& operator=(const GatherScratch&) = delete;

 private:
  friend void gather_rows(const std::vector<const float*>&, int64_t, void*, DType, GatherScratch&, cudaStream_t);
  const float** device_ = nullptr;  // device array of row addresses
  const float** pinned_ = nullptr;  // its pinned host staging copy
  size_t capacity_ = 0;
  cudaEvent_t consumed_ = nullptr;  // recorded after the kernel that read the device array
};

// out[s, :] = sources[s][0:hidden] for every row s, written as float32 or float16 (`out_dtype`) into the
// device buffer `out` ([S, hidden] row-major). `sources` are device addresses (assembly_sources over device
// tables gives them); only the S addresses are uploaded.
void gather_rows(const std::vector<const float*>& sources, int64_t hidden, void* out, DType out_dtype,
                 GatherScratch& scratch, cudaStream_t stream);

}  // namespace cuda
}  // namespace vle
