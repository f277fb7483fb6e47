// A memory-mapped reader of safetensors files (the artifact's embeddings.safetensors: the token table and
// the super-link query tables; gen_uncond / edit_uncond: the constant unconditional embeddings).
//
// The format: an 8-byte little-endian unsigned header length N, then N bytes of UTF-8 JSON, then the data.
// The header is an object mapping each tensor name to {"dtype": "F32" | "F16" | "BF16" | "F64" | "I64" |
// "I32" | "I16" | "I8" | "U8" | "BOOL" | ..., "shape": [d0, d1, ...], "data_offsets": [begin, end]}, offsets
// counted from the first byte after the header; an optional "__metadata__" maps strings to strings. Every
// tensor's bytes must lie inside the file and be exactly its element count times its element size, and no
// two tensors may overlap. A file that breaks any of this is an ArtifactError naming the file and, where
// one is to blame, the tensor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "memory/tensor.h"

namespace vle {

struct SafetensorsEntry {
  std::string name;
  std::string dtype;  // as the header spells it, e.g. "F32"
  std::vector<int64_t> shape;
  size_t element_size = 0;              // bytes
  const unsigned char* data = nullptr;  // inside the mapping
  size_t bytes = 0;

  int64_t numel() const { return element_count(shape); }
};

class SafetensorsFile {
 public:
  // Maps `file` read-only and checks the header; an ArtifactError naming the file when it is not a valid
  // safetensors file.
  explicit SafetensorsFile(const std::filesystem::path& file);
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  // Tensor names in the header's order.
  const std::vector<std::string>& names() const { return names_; }
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // The tensor's header entry; an ArtifactError naming the file and the tensor when it has none.
  const SafetensorsEntry& entry(const std::string& name) const;
  // A zero-copy view into the mapping, valid while this object lives. Read-only memory: never write
  // through it. F32, F16, I64, I32 and BOOL only (the runtime's dtypes); an ArtifactError naming the tensor
  // for other dtypes or for data not aligned to its element size.
  TensorView view(const std::string& name) const;
  // A float32 copy of an F32, F16, BF16 or F64 tensor.
  Tensor to_float32(const std::string& name) const;
  // The tensor as float32 with an expected shape; an ArtifactError naming the tensor, expected vs got.
  Tensor to_float32(const std::string& name, const std::vector<int64_t>& expected_shape) const;

 private:
  [[noreturn]] void fail(const std::string& message) const;
  void parse_header();
  void unmap() noexcept;

  std::filesystem::path path_;
  void* mapping_ = nullptr;
  size_t size_ = 0;
  size_t data_start_ = 0;
  std::vector<std::string> names_;
  std::map<std::string, SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace vle
