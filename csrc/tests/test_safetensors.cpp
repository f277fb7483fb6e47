// The safetensors reader: files written here byte by byte (the format is small enough to write by hand),
// read back as views and float32 copies; truncated files and headers that lie are ArtifactErrors naming the
// file and the tensor.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "artifact/safetensors.h"
#include "visionllm_edge/errors.h"

namespace fs = std::filesystem;

namespace {

std::string u64le(uint64_t v) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return out;
}

template <typename T>
std::string bytes_of(const std::vector<T>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    file_ = fs::temp_directory_path() /
            ("vle-st-" + std::to_string(::getpid()) + "-" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name() + ".safetensors");
  }
  void TearDown() override { fs::remove(file_); }

  // Header padded with spaces to a multiple of 8, as the format's writers do.
  void write(std::string header, const std::string& data, std::optional<uint64_t> lie_length = {}) {
    while (header.size() % 8) header += ' ';
    std::ofstream out(file_, std::ios::binary);
    out << u64le(lie_length ? *lie_length : header.size()) << header << data;
  }

  std::string refusal() {
    try {
      vle::SafetensorsFile f(file_);
    } catch (const vle::ArtifactError& e) {
      return e.what();
    }
    return "";
  }

  fs::path file_;
};

// 0x3c00 = 1.0, 0xc000 = -2.0, 0x3555 ~ 0.33325, 0x0001 = the smallest subnormal.
const std::vector<uint16_t> kHalves = {0x3c00, 0xc000, 0x3555, 0x0001};

TEST_F(SafetensorsTest, ReadsViewsAndFloatCopies) {
  const std::vector<float> table = {0, 1, 2, 3, 4, 5};
  const std::vector<int64_t> ids = {7, -8};
  const std::string data = bytes_of(table) + bytes_of(ids) + bytes_of(kHalves);
  write(
      R"({"__metadata__": {"format": "np"}, "token_embeddings": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 24]},)"
      R"( "ids": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]},)"
      R"( "queries.det": {"dtype": "F16", "shape": [2, 2], "data_offsets": [40, 48]}})",
      data);
  vle::SafetensorsFile f(file_);
  EXPECT_EQ(f.names(), (std::vector<std::string>{"token_embeddings", "ids", "queries.det"}));
  EXPECT_EQ(f.metadata().at("format"), "np");
  const vle::TensorView v = f.view("token_embeddings");
  EXPECT_EQ(v.dtype, vle::DType::kFloat32);
  EXPECT_EQ(v.shape, (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(static_cast<const float*>(v.data)[5], 5.0f);
  EXPECT_EQ(static_cast<const int64_t*>(f.view("ids").data)[1], -8);
  EXPECT_EQ(f.view("queries.det").dtype, vle::DType::kFloat16);
  const vle::Tensor q = f.to_float32("queries.det", {2, 2});
  EXPECT_EQ(q.data_as<float>()[0], 1.0f);
  EXPECT_EQ(q.data_as<float>()[1], -2.0f);
  EXPECT_NEAR(q.data_as<float>()[2], 0.33325f, 1e-5);
  EXPECT_FLOAT_EQ(q.data_as<float>()[3], 5.9604645e-08f);
  EXPECT_EQ(f.to_float32("token_embeddings").data_as<float>()[4], 4.0f);
  // A moved reader keeps the mapping.
  vle::SafetensorsFile moved(std::move(f));
  EXPECT_EQ(static_cast<const float*>(moved.view("token_embeddings").data)[1], 1.0f);
}

TEST_F(SafetensorsTest, NamesTheTensorWhenAskedForWhatItIsNot) {
  write(
      R"({"ids": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}, "b": {"dtype": "BF16", "shape": [1], "data_offsets": [8, 10]}})",
      bytes_of(std::vector<int64_t>{3}) + bytes_of(std::vector<uint16_t>{0x3f80}));
  vle::SafetensorsFile f(file_);
  EXPECT_EQ(f.to_float32("b").data_as<float>()[0], 1.0f);
  auto message = [&](auto&& call) -> std::string {
    try {
      call();
    } catch (const vle::ArtifactError& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_EQ(message([&] { f.entry("nope"); }), file_.string() + ": no tensor 'nope' (it has: ids, b)");
  EXPECT_NE(
      message([&] { f.to_float32("ids"); }).find("tensor 'ids': dtype I64 is not a floating-point type"),
      std::string::npos);
  EXPECT_NE(message([&] { f.view("b"); }).find("tensor 'b': dtype BF16 has no runtime view"),
            std::string::npos);
  EXPECT_NE(message([&] { f.to_float32("b", {2}); }).find("tensor 'b': expected shape [2], got [1]"),
            std::string::npos);
}

TEST_F(SafetensorsTest, TruncatedAndLyingFilesAreRefused) {
  const std::string table = bytes_of(std::vector<float>{1, 2, 3, 4});
  const std::string good = R"({"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})";
  struct Case {
    std::string header, data;
    std::optional<uint64_t> length;
    std::string message;
  };
  const std::vector<Case> cases = {
      {good,
       table.substr(0, 12),
       {},
       "tensor 't': data_offsets [0, 16] lie outside the data (12 bytes after the header"},
      {good, table, uint64_t{1} << 40, "header length 1099511627776 is beyond the"},
      {good, table, 1000, "truncated: the header says it is 1000 bytes, the file has"},
      {R"({"t": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}})",
       table,
       {},
       "tensor 't': data_offsets [0, 16] hold 16 bytes, but F32 [2,3] needs 24"},
      {R"({"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 4]}})",
       table,
       {},
       "tensor 't': data_offsets [8, 4] lie outside"},
      {R"({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}})",
       table,
       {},
       "tensor 't': unknown dtype 'Q4'"},
      {R"({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})",
       table,
       {},
       "tensor 't': shape: expected sizes >= 0"},
      {R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0]}})",
       table,
       {},
       "tensor 't': data_offsets: expected [begin, end]"},
      {R"({"t": {"dtype": "F32", "shape": [2]}})", table, {}, "tensor 't': missing data_offsets"},
      {R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}})",
       table,
       {},
       "tensor 't': unknown key 'x'"},
      {R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
       table,
       {},
       "tensors 'a' and 'b' overlap in the data"},
      {R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})",
       table,
       {},
       "invalid JSON: key 't' appears twice in one object"},
      {R"({"t": {"dtype": "F32", "shape": [4294967296, 4294967296, 4294967296], "data_offsets": [0, 16]}})",
       table,
       {},
       "overflows"},
      {R"({"t": )", table, {}, ": header: invalid JSON at line 1"},
      {R"([1, 2])", table, {}, "header: expected a JSON object, got an array"},
      {R"({"__metadata__": {"k": 1}})", table, {}, "header: __metadata__.k: expected a string"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.header);
    write(c.header, c.data, c.length);
    const std::string message = refusal();
    EXPECT_EQ(message.rfind(file_.string() + ": ", 0), 0u) << message;
    EXPECT_NE(message.find(c.message), std::string::npos) << message;
  }
  {
    std::ofstream out(file_, std::ios::binary);
    out << "abc";
  }
  EXPECT_NE(refusal().find("truncated: 3 bytes, shorter than the 8-byte header length"), std::string::npos);
  fs::remove(file_);
  EXPECT_NE(refusal().find("cannot open (No such file or directory)"), std::string::npos);
}

TEST_F(SafetensorsTest, UnalignedDataHasNoViewButCopies) {
  // An F16 tensor of one element puts the F32 after it at an odd-by-two offset.
  write(
      R"({"h": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}, "f": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}})",
      bytes_of(std::vector<uint16_t>{0x3c00}) + bytes_of(std::vector<float>{2.5f}));
  vle::SafetensorsFile f(file_);
  EXPECT_THROW(f.view("f"), vle::ArtifactError);
  EXPECT_EQ(f.to_float32("f").data_as<float>()[0], 2.5f);
}

}  // namespace
