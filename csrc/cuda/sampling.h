// Next-token choice on the GPU, the twin of loop/sampling.* (Sampler::sample): the repetition penalty,
// greedy argmax with torch's first-index tie rule, and temperature -> top-k (ties with the k-th kept) ->
// softmax -> top-p -> the inverse-CDF draw in index order for a uniform `u` the host Sampler drew. Only
// the token id (and u going in) crosses between host and device.
//
// The penalty and argmax are exact (the same float operations). The sampling path computes in double as
// the CPU does; its sums run in another order and CUDA's exp may differ from the C library's by an ulp, so
// a probability can differ in its last bits and the token can differ only when u lies that close to the
// boundary between two tokens' cumulative mass.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "loop/sampling.h"
#include "memory/tensor.h"

namespace vle {
namespace cuda {

class DeviceSampler {
 public:
  // Buffers for a vocabulary of `vocab` logits on the current device, made once.
  explicit DeviceSampler(int64_t vocab);
  ~DeviceSampler();
  DeviceSampler(const DeviceSampler&) = delete;
  DeviceSampler& operator=(const DeviceSampler&) = delete;

  int64_t vocab() const { return vocab_; }

  // The ids the repetition penalty applies to: replaces the set (an upload of V flags, once per request)
  // or adds one id (one byte, after each sampled token). Ids outside the vocabulary are an error naming
  // the id, as on the CPU.
  void set_penalized(const std::vector<int64_t>& ids, cudaStream_t stream);
  void add_penalized(int64_t id, cudaStream_t stream);

  // The next token for the device logits `logits[vocab]` (float32 or float16), ordered on `stream`; waits
  // for the token. `u` is the host Sampler's draw (unused when not sampling). Parameter errors and logits
  // without a finite value are the CPU's errors.
  int64_t next_token(const void* logits, DType dtype, const SamplingParams& params, double u, cudaStream_t stream);

 private:
  void release() noexcept;

  int64_t vocab_;
  uint8_t* penalized_ = nullptr;  // [V] flags
  double* z_ = nullptr;           // [V] scaled logits
  double* sorted_z_ = nullptr;    // [V] descending, for the k-th value
  double* probs_ = nullptr;       // [V]
  double* sorted_probs_ = nullptr;
  int32_t* index_ = nullptr;      // [V] 0..V-1
  int32_t* sorted_index_ = nullptr;
  int64_t* result_ = nullptr;     // device [2]: token, status
  int64_t* host_result_ = nullptr;  // pinned [2]
  void* sort_temp_ = nullptr;
  size_t sort_temp_bytes_ = 0;
};

}  // namespace cuda
}  // namespace vle
