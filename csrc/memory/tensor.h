// Tensors the loop hands to engines: element types, borrowed views and owned buffers, and the one allocator
// interface every buffer of the runtime comes from (host memory here; device memory implements the same
// interface).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace vle {

enum class DType { kFloat32, kFloat16, kInt64, kInt32, kBool };

// "float32" / "float16" / "int64" / "int32" / "bool" (the manifest's spellings) <-> DType; an unknown name
// is an error naming it.
DType parse_dtype(const std::string& name);
const char* dtype_name(DType dtype);
size_t dtype_size(DType dtype);

int64_t element_count(const std::vector<int64_t>& shape);
std::string shape_text(const std::vector<int64_t>& shape);  // "[1, 3, 224, 224]"

enum class MemoryKind { kHost, kDevice };

// Where buffers come from. Implementations are thread-safe.
class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(size_t bytes) = 0;  // zero-filled; throws std::bad_alloc
  virtual void deallocate(void* p) noexcept = 0;
  virtual MemoryKind kind() const = 0;
};

// The process-wide host allocator (64-byte aligned, zeroed).
Allocator& host_allocator();

// A borrowed, C-contiguous tensor: the caller keeps `data` alive for the call.
struct TensorView {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  void* data = nullptr;
  MemoryKind memory = MemoryKind::kHost;

  int64_t numel() const { return element_count(shape); }
  size_t bytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
};

// An owned, C-contiguous tensor; copies share the buffer.
class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, std::vector<int64_t> shape, Allocator& allocator = host_allocator());
  // A tensor over a buffer allocated elsewhere (an engine's output): `data`'s deleter frees it when the last
  // copy goes, so a result can be handed on without copying it.
  static Tensor adopt(DType dtype, std::vector<int64_t> shape, std::shared_ptr<void> data,
                      MemoryKind memory = MemoryKind::kHost);

  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  MemoryKind memory() const { return memory_; }
  int64_t numel() const { return element_count(shape_); }
  size_t bytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  void* data() { return data_.get(); }
  const void* data() const { return data_.get(); }
  template <typename T> T* data_as() { return static_cast<T*>(data()); }
  template <typename T> const T* data_as() const { return static_cast<const T*>(data()); }
  TensorView view() const { return {dtype_, shape_, data_.get(), memory_}; }
  bool empty() const { return !data_; }

 private:
  DType dtype_ = DType::kFloat32;
  std::vector<int64_t> shape_;
  MemoryKind memory_ = MemoryKind::kHost;
  std::shared_ptr<void> data_;
};

}  // namespace vle
