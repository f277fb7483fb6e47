#include "memory/kv_arena.h"

#include "memory/checked.h"

#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

namespace vle {

namespace {

std::string tuple_text(const std::vector<int64_t>& shape) {  // numpy's spelling, as the bindings report it
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + (shape.size() == 1 ? ",)" : ")");
}

}  // namespace

KVDType parse_kv_dtype(const std::string& name) {
  if (name == "float32") return KVDType::kFloat32;
  if (name == "float16") return KVDType::kFloat16;
  throw std::invalid_argument("KVArena: dtype must be 'float32' or 'float16', got '" + name + "'");
}

const char* kv_dtype_name(KVDType dtype) { return dtype == KVDType::kFloat32 ? "float32" : "float16"; }

size_t kv_dtype_size(KVDType dtype) { return dtype == KVDType::kFloat32 ? 4 : 2; }

KVArena::KVArena(int64_t num_layers, int64_t capacity, int64_t kv_heads, int64_t head_dim, KVDType dtype,
                 Allocator& allocator)
    : num_layers_(num_layers), capacity_(capacity), kv_heads_(kv_heads), head_dim_(head_dim), dtype_(dtype),
      allocator_(&allocator) {
  if (num_layers <= 0 || capacity <= 0 || kv_heads <= 0 || head_dim <= 0) {
    throw std::invalid_argument("KVArena: num_layers, capacity, kv_heads and head_dim must be positive, "
                                "got " + std::to_string(num_layers) + ", " + std::to_string(capacity) + ", " +
                                std::to_string(kv_heads) + ", " + std::to_string(head_dim));
  }
  // Checked before anything is allocated: a capacity or width whose product wraps would otherwise allocate a
  // small block that rows are then written past.
  row_bytes_ = static_cast<size_t>(
      checked_product({kv_heads, head_dim, static_cast<int64_t>(kv_dtype_size(dtype))}, "KVArena row bytes"));
  const int64_t layer_bytes = checked_mul(capacity, static_cast<int64_t>(row_bytes_), "KVArena bytes per layer");
  total_bytes_ = checked_product({2, num_layers, layer_bytes}, "KVArena total bytes");
  const auto bytes = static_cast<size_t>(layer_bytes);
  keys_.reserve(static_cast<size_t>(num_layers));
  values_.reserve(static_cast<size_t>(num_layers));
  // The host allocator hands large blocks out as lazily mapped zero pages, so a generous capacity costs
  // address space, not resident memory, until it is used.
  for (int64_t l = 0; l < num_layers; ++l) {
    for (auto* arena : {&keys_, &values_}) {
      void* block = nullptr;
      try {
        block = allocator.allocate(bytes);
      } catch (const std::bad_alloc&) {
        throw std::length_error("KVArena: cannot allocate " + std::to_string(total_bytes_) + " bytes (" +
                                std::to_string(num_layers) + " layers x K and V x " + std::to_string(capacity) +
                                " rows x " + std::to_string(row_bytes_) + " bytes a row)");
      }
      arena->emplace_back(static_cast<std::byte*>(block), AllocatorDeleter{&allocator});
    }
  }
}

void KVArena::check_layer(int64_t layer) const {
  if (layer < 0 || layer >= num_layers_) {
    throw std::out_of_range("KVArena: layer " + std::to_string(layer) + " is out of range for " +
                            std::to_string(num_layers_) + " layers");
  }
}

void KVArena::check_row(int64_t row) const {
  if (row < 0 || row > capacity_) {
    throw std::out_of_range("KVArena: row " + std::to_string(row) + " is out of range for capacity " +
                            std::to_string(capacity_));
  }
}

void* KVArena::key_row(int64_t layer, int64_t row) {
  return const_cast<void*>(static_cast<const KVArena*>(this)->key_row(layer, row));
}

void* KVArena::value_row(int64_t layer, int64_t row) {
  return const_cast<void*>(static_cast<const KVArena*>(this)->value_row(layer, row));
}

const void* KVArena::key_row(int64_t layer, int64_t row) const {
  check_layer(layer);
  check_row(row);
  return keys_[static_cast<size_t>(layer)].get() + static_cast<size_t>(row) * row_bytes();
}

const void* KVArena::value_row(int64_t layer, int64_t row) const {
  check_layer(layer);
  check_row(row);
  return values_[static_cast<size_t>(layer)].get() + static_cast<size_t>(row) * row_bytes();
}

void KVArena::check_room(int64_t n) const {
  if (n < 0) {
    throw std::invalid_argument("KVArena: row count must be non-negative, got " + std::to_string(n));
  }
  if (n > capacity_ - length_) {
    throw std::length_error("KVArena overflow: capacity " + std::to_string(capacity_) + ", length " +
                            std::to_string(length_) + ", cannot add " + std::to_string(n) + " rows");
  }
}

void KVArena::commit(int64_t n) {
  check_room(n);
  length_ += n;
}

void KVArena::append(const std::vector<KVRows>& keys, const std::vector<KVRows>& values) {
  if (memory() != MemoryKind::kHost) {
    throw std::logic_error("KVArena.append: the arena is in device memory; engines write its rows in place "
                           "(bound outputs), host rows are not copied into it");
  }
  const auto layers = static_cast<size_t>(num_layers_);
  if (keys.size() != layers || values.size() != layers) {
    throw std::invalid_argument("KVArena.append: expected " + std::to_string(num_layers_) +
                                " key and value blocks (one per layer), got " + std::to_string(keys.size()) +
                                " keys and " + std::to_string(values.size()) + " values");
  }
  int64_t n = -1;
  for (const auto* side : {&keys, &values}) {
    const char* name = side == &keys ? "keys" : "values";
    for (size_t l = 0; l < layers; ++l) {
      const std::vector<int64_t>& shape = (*side)[l].shape;
      const bool ok = shape.size() == 3 && shape[1] == kv_heads_ && shape[2] == head_dim_ && shape[0] >= 0;
      if (!ok || (n >= 0 && shape[0] != n)) {
        const std::string want = "[" + (n >= 0 ? std::to_string(n) : std::string("n")) + ", " +
                                 std::to_string(kv_heads_) + ", " + std::to_string(head_dim_) + "]";
        throw std::invalid_argument("KVArena.append: " + std::string(name) + "[" + std::to_string(l) +
                                    "] must be " + want + ", got shape " + tuple_text(shape));
      }
      n = shape[0];
    }
  }
  check_room(n);
  const size_t bytes = static_cast<size_t>(n) * row_bytes();
  if (bytes > 0) {
    for (size_t l = 0; l < layers; ++l) {
      std::memcpy(key_row(static_cast<int64_t>(l), length_), keys[l].data, bytes);
      std::memcpy(value_row(static_cast<int64_t>(l), length_), values[l].data, bytes);
    }
  }
  length_ += n;
}

void KVArena::rollback(int64_t to_length) {
  if (to_length < 0 || to_length > length_) {
    throw std::invalid_argument("KVArena.rollback: to_length must be in [0, " + std::to_string(length_) +
                                "] (the current length), got " + std::to_string(to_length));
  }
  length_ = to_length;
}

}  // namespace vle
