#include "artifact/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <utility>

#include "artifact/json_text.h"
#include "text/utf8.h"
#include "memory/half.h"
#include "visionllm_edge/errors.h"

namespace vle {

namespace {

// A header larger than this is not an embeddings file but a corrupt length (the format's own readers use
// the same bound).
constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;

size_t element_size_of(const std::string& dtype) {
  static const std::map<std::string, size_t> sizes = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},  {"I32", 4},     {"I16", 2},    {"I8", 1},
      {"U64", 8}, {"U32", 4}, {"U16", 2}, {"U8", 1},   {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}};
  const auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

float bfloat16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::filesystem::path& file) : path_(file) {
  const int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(std::string("cannot open (") + std::strerror(errno) + ")");
  struct stat st{};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ < 8) {
    ::close(fd);
    fail("truncated: " + std::to_string(size_) + " bytes, shorter than the 8-byte header length");
  }
  mapping_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);
  if (mapping_ == MAP_FAILED) {
    mapping_ = nullptr;
    fail(std::string("cannot map into memory (") + std::strerror(map_errno) + ")");
  }
  try {
    parse_header();
  } catch (...) {
    unmap();
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() { unmap(); }

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept
    : path_(std::move(other.path_)),
      mapping_(std::exchange(other.mapping_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      data_start_(other.data_start_),
      names_(std::move(other.names_)),
      entries_(std::move(other.entries_)),
      metadata_(std::move(other.metadata_)) {}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    unmap();
    path_ = std::move(other.path_);
    mapping_ = std::exchange(other.mapping_, nullptr);
    size_ = std::exchange(other.size_, 0);
    data_start_ = other.data_start_;
    names_ = std::move(other.names_);
    entries_ = std::move(other.entries_);
    metadata_ = std::move(other.metadata_);
  }
  return *this;
}

void SafetensorsFile::unmap() noexcept {
  if (mapping_) ::munmap(mapping_, size_);
  mapping_ = nullptr;
}

void SafetensorsFile::fail(const std::string& message) const {
  throw ArtifactError(path_.string() + ": " + message);
}

void SafetensorsFile::parse_header() {
  const auto* bytes = static_cast<const unsigned char*>(mapping_);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = header_len << 8 | bytes[i];
  if (header_len > kMaxHeaderBytes) {
    fail("header length " + std::to_string(header_len) + " is beyond the " + std::to_string(kMaxHeaderBytes) +
         "-byte limit (not a safetensors file, or a corrupt one)");
  }
  if (header_len > size_ - 8) {
    fail("truncated: the header says it is " + std::to_string(header_len) + " bytes, the file has " +
         std::to_string(size_ - 8) + " after the length");
  }
  data_start_ = 8 + static_cast<size_t>(header_len);
  const size_t data_size = size_ - data_start_;
  const std::string text(reinterpret_cast<const char*>(bytes + 8), static_cast<size_t>(header_len));
  const OrderedJson header = parse_json_strictly(text, path_.string() + ": header");
  if (!header.is_object()) fail("header: expected a JSON object, got " + describe(header));

  std::vector<std::pair<size_t, size_t>> ranges;  // to find overlaps
  std::vector<std::string> range_owner;
  for (const auto& item : header.items()) {
    const std::string& name = item.key();
    const OrderedJson& value = item.value();
    if (name == "__metadata__") {
      if (!value.is_object()) fail("header: __metadata__: expected an object, got " + describe(value));
      for (const auto& m : value.items()) {
        if (!m.value().is_string()) {
          fail("header: __metadata__." + m.key() + ": expected a string, got " + describe(m.value()));
        }
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = "tensor " + utf8::python_repr(name) + ": ";
    if (!value.is_object()) fail(where + "expected an object, got " + describe(value));
    for (const char* key : {"dtype", "shape", "data_offsets"}) {
      if (!value.contains(key)) fail(where + "missing " + key);
    }
    for (const auto& field : value.items()) {
      if (field.key() != "dtype" && field.key() != "shape" && field.key() != "data_offsets") {
        fail(where + "unknown key " + utf8::python_repr(field.key()));
      }
    }
    SafetensorsEntry e;
    e.name = name;
    if (!value["dtype"].is_string())
      fail(where + "dtype: expected a string, got " + describe(value["dtype"]));
    e.dtype = value["dtype"].get<std::string>();
    e.element_size = element_size_of(e.dtype);
    if (e.element_size == 0) fail(where + "unknown dtype " + utf8::python_repr(e.dtype));
    const OrderedJson& shape = value["shape"];
    if (!shape.is_array()) fail(where + "shape: expected an array, got " + describe(shape));
    uint64_t numel = 1;
    for (const OrderedJson& dim : shape) {
      if (!dim.is_number_unsigned()) fail(where + "shape: expected sizes >= 0, got " + describe(dim));
      const uint64_t d = dim.get<uint64_t>();
      if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          (d != 0 && numel > std::numeric_limits<uint64_t>::max() / d)) {
        fail(where + "shape " + shape.dump() + " overflows");
      }
      numel *= d;
      e.shape.push_back(static_cast<int64_t>(d));
    }
    if (numel > std::numeric_limits<uint64_t>::max() / e.element_size)
      fail(where + "shape " + shape.dump() + " overflows");
    const OrderedJson& offsets = value["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned()) {
      fail(where + "data_offsets: expected [begin, end], got " + offsets.dump());
    }
    const uint64_t begin = offsets[0].get<uint64_t>(), end = offsets[1].get<uint64_t>();
    if (begin > end || end > data_size) {
      fail(where + "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
           "] lie outside the data (" + std::to_string(data_size) +
           " bytes after the header; truncated file?)");
    }
    const uint64_t expected = numel * e.element_size;
    if (end - begin != expected) {
      fail(where + "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) + "] hold " +
           std::to_string(end - begin) + " bytes, but " + e.dtype + " " + shape.dump() + " needs " +
           std::to_string(expected));
    }
    e.data = static_cast<const unsigned char*>(mapping_) + data_start_ + begin;
    e.bytes = static_cast<size_t>(expected);
    if (expected) {
      ranges.emplace_back(static_cast<size_t>(begin), static_cast<size_t>(end));
      range_owner.push_back(name);
    }
    names_.push_back(name);
    entries_.emplace(name, std::move(e));
  }
  std::vector<size_t> order(ranges.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ranges[a] < ranges[b]; });
  for (size_t i = 1; i < order.size(); ++i) {
    if (ranges[order[i]].first < ranges[order[i - 1]].second) {
      fail("tensors " + utf8::python_repr(range_owner[order[i - 1]]) + " and " + utf8::python_repr(range_owner[order[i]]) +
           " overlap in the data");
    }
  }
}

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  const auto it = entries_.find(name);
  if (it == entries_.end()) {
    fail("no tensor " + utf8::python_repr(name) + " (it has: " + (names_.empty() ? "none" : joined(names_)) + ")");
  }
  return it->second;
}

TensorView SafetensorsFile::view(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  TensorView v;
  if (e.dtype == "F32") {
    v.dtype = DType::kFloat32;
  } else if (e.dtype == "F16") {
    v.dtype = DType::kFloat16;
  } else if (e.dtype == "I64") {
    v.dtype = DType::kInt64;
  } else if (e.dtype == "I32") {
    v.dtype = DType::kInt32;
  } else if (e.dtype == "BOOL") {
    v.dtype = DType::kBool;
  } else {
    fail("tensor " + utf8::python_repr(name) + ": dtype " + e.dtype +
         " has no runtime view (F32, F16, I64, I32, BOOL)");
  }
  if (reinterpret_cast<uintptr_t>(e.data) % e.element_size) {
    fail("tensor " + utf8::python_repr(name) + ": data not aligned to its " + std::to_string(e.element_size) +
         "-byte elements; read it with to_float32");
  }
  v.shape = e.shape;
  v.data = const_cast<unsigned char*>(e.data);  // read-only mapping, see the header
  v.memory = MemoryKind::kHost;
  return v;
}

Tensor SafetensorsFile::to_float32(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  Tensor out(DType::kFloat32, e.shape);
  float* dst = out.data_as<float>();
  const size_t n = static_cast<size_t>(e.numel());
  if (e.dtype == "F32") {
    if (n) std::memcpy(dst, e.data, n * sizeof(float));
  } else if (e.dtype == "F16" || e.dtype == "BF16") {
    const bool half = e.dtype == "F16";
    for (size_t i = 0; i < n; ++i) {
      uint16_t bits;
      std::memcpy(&bits, e.data + 2 * i, 2);
      dst[i] = half ? half_to_float(bits) : bfloat16_to_float(bits);
    }
  } else if (e.dtype == "F64") {
    for (size_t i = 0; i < n; ++i) {
      double d;
      std::memcpy(&d, e.data + 8 * i, 8);
      dst[i] = static_cast<float>(d);
    }
  } else {
    fail("tensor " + utf8::python_repr(name) + ": dtype " + e.dtype +
         " is not a floating-point type (F32, F16, BF16, F64)");
  }
  return out;
}

Tensor SafetensorsFile::to_float32(const std::string& name,
                                   const std::vector<int64_t>& expected_shape) const {
  const SafetensorsEntry& e = entry(name);
  if (e.shape != expected_shape) {
    fail("tensor " + utf8::python_repr(name) + ": expected shape " + shape_text(expected_shape) + ", got " +
         shape_text(e.shape));
  }
  return to_float32(name);
}

}  // namespace vle
