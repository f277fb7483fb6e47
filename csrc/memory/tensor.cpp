#include "memory/tensor.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>

#include "visionllm_edge/errors.h"

namespace vle {

DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::kFloat32;
  if (name == "float16") return DType::kFloat16;
  if (name == "int64") return DType::kInt64;
  if (name == "int32") return DType::kInt32;
  if (name == "bool") return DType::kBool;
  throw InputError("unknown dtype '" + name + "' (known: float32, float16, int64, int32, bool)");
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kInt64: return "int64";
    case DType::kInt32: return "int32";
    case DType::kBool: return "bool";
  }
  return "?";
}

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: case DType::kInt32: return 4;
    case DType::kFloat16: return 2;
    case DType::kInt64: return 8;
    case DType::kBool: return 1;
  }
  return 0;
}

int64_t element_count(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) throw InputError("negative dimension in shape " + shape_text(shape));
    if (d != 0 && n > INT64_MAX / d) throw InputError("shape " + shape_text(shape) + " overflows int64");
    n *= d;
  }
  return n;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

namespace {

class HostAllocator final : public Allocator {
 public:
  // calloc, aligned by hand: large buffers (the KV arena) come as fresh zero pages the OS maps lazily, so a
  // generous capacity costs address space, not resident memory, until it is used. The block's own address
  // is kept in the 64 bytes before the aligned one.
  void* allocate(size_t bytes) override {
    constexpr size_t kAlign = 64;
    if (bytes > SIZE_MAX - 2 * kAlign) throw std::bad_alloc();
    auto* block = static_cast<unsigned char*>(std::calloc(bytes + kAlign, 1));
    if (block == nullptr) throw std::bad_alloc();
    auto* aligned = block + kAlign - reinterpret_cast<uintptr_t>(block) % kAlign;
    std::memcpy(aligned - sizeof(void*), &block, sizeof(void*));
    return aligned;
  }
  void deallocate(void* p) noexcept override {
    if (p == nullptr) return;
    void* block;
    std::memcpy(&block, static_cast<unsigned char*>(p) - sizeof(void*), sizeof(void*));
    std::free(block);
  }
  MemoryKind kind() const override { return MemoryKind::kHost; }
};

}  // namespace

Allocator& host_allocator() {
  static HostAllocator allocator;
  return allocator;
}

Tensor::Tensor(DType dtype, std::vector<int64_t> shape, Allocator& allocator)
    : dtype_(dtype), shape_(std::move(shape)), memory_(allocator.kind()) {
  const size_t n = static_cast<size_t>(element_count(shape_)) * dtype_size(dtype_);
  Allocator* a = &allocator;
  data_ = std::shared_ptr<void>(a->allocate(n), [a](void* p) { a->deallocate(p); });
}

Tensor Tensor::adopt(DType dtype, std::vector<int64_t> shape, std::shared_ptr<void> data, MemoryKind memory) {
  Tensor t;
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  element_count(t.shape_);  // refuses a negative or overflowing shape
  t.memory_ = memory;
  t.data_ = std::move(data);
  return t;
}

}  // namespace vle
