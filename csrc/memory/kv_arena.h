// The LLM's KV cache (docs/architecture.md §4): one sequence-major arena per layer for K and one for V, each
// `[capacity, kv_heads, head_dim]`, allocated once. The past of a step is the contiguous prefix
// `[0:length]`, handed to an engine without a copy; the step's new rows are written at
// `[length:length+n]` (in place by the engine, or copied in by `append`) and then committed. The memory
// comes from an Allocator: host memory by default, CUDA memory for the loop's device path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "memory/tensor.h"

namespace vle {

// Element type of the arena. float16 is stored as raw IEEE half bits (uint16); the arena never does
// arithmetic on it, so no half type is needed.
enum class KVDType { kFloat32, kFloat16 };

// "float32" / "float16" -> KVDType; anything else is an error naming the value.
KVDType parse_kv_dtype(const std::string& name);
const char* kv_dtype_name(KVDType dtype);
size_t kv_dtype_size(KVDType dtype);

// One layer's new rows handed to `append`: a borrowed, C-contiguous buffer of the arena's dtype.
struct KVRows {
  const void* data = nullptr;
  std::vector<int64_t> shape;  // must be [n, kv_heads, head_dim]
};

class KVArena {
 public:
  // Every row starts zeroed (the allocator's contract), so rows past the length read as zeros. Sizes whose
  // byte count overflows int64, and an allocation that fails, are std::length_error naming the sizes.
  KVArena(int64_t num_layers, int64_t capacity, int64_t kv_heads, int64_t head_dim, KVDType dtype,
          Allocator& allocator = host_allocator());
  KVArena(const KVArena&) = delete;
  KVArena& operator=(const KVArena&) = delete;

  int64_t num_layers() const { return num_layers_; }
  int64_t capacity() const { return capacity_; }
  int64_t kv_heads() const { return kv_heads_; }
  int64_t head_dim() const { return head_dim_; }
  KVDType dtype() const { return dtype_; }
  MemoryKind memory() const { return allocator_->kind(); }
  int64_t length() const { return length_; }
  size_t element_size() const { return kv_dtype_size(dtype_); }
  size_t row_bytes() const { return row_bytes_; }
  // K and V of every layer: 2 x num_layers x capacity x row_bytes (checked against overflow at construction).
  int64_t total_bytes() const { return total_bytes_; }

  // Address of row `row` (0 <= row <= capacity) of a layer's K or V arena: the base for engine binding.
  void* key_row(int64_t layer, int64_t row);
  void* value_row(int64_t layer, int64_t row);
  const void* key_row(int64_t layer, int64_t row) const;
  const void* value_row(int64_t layer, int64_t row) const;

  // Throws unless `n` more rows fit; the message names capacity, length and n.
  void check_room(int64_t n) const;
  // Makes the `n` rows after the current length part of the past (they were written in place).
  void commit(int64_t n);
  // Copies one `[n, kv_heads, head_dim]` block per layer (host memory) into `[length:length+n]` and
  // commits. Every shape is checked before anything is written, so a bad call leaves the arena unchanged.
  // A device arena refuses it: the engines write its rows in place, nothing copies rows in from the host.
  void append(const std::vector<KVRows>& keys, const std::vector<KVRows>& values);
  // Drops the rows after `to_length` (0 <= to_length <= length); their memory is reused by later steps.
  void rollback(int64_t to_length);
  void reset() { length_ = 0; }

 private:
  struct AllocatorDeleter {
    Allocator* allocator;
    void operator()(std::byte* p) const { allocator->deallocate(p); }
  };
  using Buffer = std::unique_ptr<std::byte, AllocatorDeleter>;

  void check_layer(int64_t layer) const;
  void check_row(int64_t row) const;

  int64_t num_layers_;
  int64_t capacity_;
  int64_t kv_heads_;
  int64_t head_dim_;
  KVDType dtype_;
  int64_t length_ = 0;
  size_t row_bytes_ = 0;
  int64_t total_bytes_ = 0;
  Allocator* allocator_;
  std::vector<Buffer> keys_;
  std::vector<Buffer> values_;
};

}  // namespace vle
