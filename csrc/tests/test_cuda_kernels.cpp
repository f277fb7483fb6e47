// The CUDA core against its CPU twins on fresh random inputs: the check macro, the device queries, device
// memory, half conversions (memory/half.h), the step's index inputs and the embedding assembly
// (loop/assemble.cpp). Every comparison is bit for bit. Without a GPU the tests that need one skip, naming
// the CUDA error; the check and the queries run everywhere.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/check.h"
#include "cuda/device.h"
#include "cuda/kernels.h"
#include "cuda/memory.h"
#include "cuda_skip.h"
#include "loop/assemble.h"
#include "memory/half.h"

namespace {

uint32_t fresh_seed() {
  const uint32_t seed = std::random_device{}();
  std::cout << "[ seed     ] " << seed << "\n";
  return seed;
}

uint32_t float_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

TEST(CudaCheck, FailureNamesTheCallTheLineAndTheCudaError) {
  try {
    VLE_CUDA_CHECK(static_cast<cudaError_t>(cudaErrorInvalidValue));
    FAIL() << "no exception";
  } catch (const vle::EngineError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("static_cast<cudaError_t>(cudaErrorInvalidValue)"), std::string::npos) << what;
    EXPECT_NE(what.find("test_cuda_kernels.cpp:"), std::string::npos) << what;
    EXPECT_NE(what.find("cudaErrorInvalidValue"), std::string::npos) << what;
    EXPECT_NE(what.find(cudaGetErrorString(cudaErrorInvalidValue)), std::string::npos) << what;
  }
  EXPECT_NO_THROW(VLE_CUDA_CHECK(cudaSuccess));
}

TEST(CudaDevice, QueriesAnswerWithoutThrowingAndAgree) {
  std::string why;
  const int count = vle::cuda::device_count(&why);
  std::string available_why;
  const bool available = vle::cuda::cuda_available(&available_why);
  if (count == 0) {
    EXPECT_FALSE(why.empty());
    EXPECT_FALSE(available);
    EXPECT_FALSE(available_why.empty());
    vle::cuda::DeviceInfo info;
    std::string info_why;
    EXPECT_FALSE(vle::cuda::device_info(0, info, &info_why));
    EXPECT_FALSE(info_why.empty());
    return;
  }
  EXPECT_FALSE(vle::cuda::cuda_available(&why, count));  // one past the last device
  EXPECT_NE(why.find("does not exist"), std::string::npos) << why;
  if (!available) GTEST_SKIP() << "a GPU is listed but no context can be made: " << available_why;
  vle::cuda::DeviceInfo info;
  ASSERT_TRUE(vle::cuda::device_info(0, info, &why)) << why;
  EXPECT_FALSE(info.name.empty());
  EXPECT_GE(info.sm, 50);
  EXPECT_GT(info.memory_bytes, 0u);
}

TEST(CudaMemory, DeviceTensorsAreZeroedAndRoundTrip) {
  VLE_REQUIRE_GPU();
  std::mt19937 rng(fresh_seed());
  vle::Tensor zeros(vle::DType::kFloat32, {7, 13}, vle::cuda::device_allocator());
  EXPECT_EQ(zeros.memory(), vle::MemoryKind::kDevice);
  const vle::Tensor back_zeros = vle::cuda::to_host(zeros);
  for (int64_t i = 0; i < back_zeros.numel(); ++i) ASSERT_EQ(float_bits(back_zeros.data_as<float>()[i]), 0u);

  vle::Tensor host(vle::DType::kInt64, {1001});
  for (int64_t i = 0; i < host.numel(); ++i) host.data_as<int64_t>()[i] = static_cast<int64_t>(rng()) - (1ll << 31);
  const vle::Tensor device = vle::cuda::to_device(host);
  EXPECT_EQ(device.memory(), vle::MemoryKind::kDevice);
  const vle::Tensor back = vle::cuda::to_host(device);
  EXPECT_EQ(back.memory(), vle::MemoryKind::kHost);
  ASSERT_EQ(back.shape(), host.shape());
  EXPECT_EQ(std::memcmp(back.data(), host.data(), host.bytes()), 0);
  EXPECT_THROW(vle::cuda::to_host(host), vle::InputError);
  EXPECT_THROW(vle::cuda::to_device(device), vle::InputError);
  EXPECT_THROW(vle::cuda::device_allocator(1 << 20), vle::EngineError);
}

TEST(CudaHalf, EveryHalfToFloatMatchesTheCpu) {
  VLE_REQUIRE_GPU();
  std::vector<uint16_t> halves(65536);
  for (uint32_t h = 0; h < 65536; ++h) halves[h] = static_cast<uint16_t>(h);
  vle::Allocator& gpu = vle::cuda::device_allocator();
  vle::Tensor src(vle::DType::kFloat16, {65536}, gpu), dst(vle::DType::kFloat32, {65536}, gpu);
  vle::cuda::copy_to_device(src.data(), halves.data(), src.bytes());
  vle::cuda::half_to_float(src.data_as<uint16_t>(), dst.data_as<float>(), 65536, nullptr);
  const vle::Tensor got = vle::cuda::to_host(dst);
  for (uint32_t h = 0; h < 65536; ++h) {
    ASSERT_EQ(float_bits(got.data_as<float>()[h]), float_bits(vle::half_to_float(static_cast<uint16_t>(h)))) << h;
  }
}

TEST(CudaHalf, RandomFloatsToHalfMatchTheCpu) {
  VLE_REQUIRE_GPU();
  std::mt19937 rng(fresh_seed());
  std::vector<float> values;
  // Random bit patterns (every class: NaNs, infinities, subnormals), values around the half range's edges
  // and exact ties between two halves.
  for (int i = 0; i < 1 << 20; ++i) {
    const uint32_t b = rng();
    float f;
    std::memcpy(&f, &b, sizeof f);
    values.push_back(f);
  }
  std::uniform_real_distribution<float> wide(-70000.f, 70000.f), narrow(-1e-4f, 1e-4f);
  for (int i = 0; i < 1 << 18; ++i) {
    values.push_back(wide(rng));
    values.push_back(narrow(rng));
    const uint16_t h = static_cast<uint16_t>(rng() & 0x7bffu);
    const float lo = vle::half_to_float(h), hi = vle::half_to_float(static_cast<uint16_t>(h + 1));
    values.push_back(lo + (hi - lo) / 2);  // exact in float: a tie
  }
  const auto n = static_cast<int64_t>(values.size());
  vle::Allocator& gpu = vle::cuda::device_allocator();
  vle::Tensor src(vle::DType::kFloat32, {n}, gpu), dst(vle::DType::kFloat16, {n}, gpu);
  vle::cuda::copy_to_device(src.data(), values.data(), src.bytes());
  vle::cuda::float_to_half(src.data_as<float>(), dst.data_as<uint16_t>(), n, nullptr);
  const vle::Tensor got = vle::cuda::to_host(dst);
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(got.data_as<uint16_t>()[i], vle::float_to_half(values[static_cast<size_t>(i)]))
        << "float bits 0x" << std::hex << float_bits(values[static_cast<size_t>(i)]);
  }
}

TEST(CudaIndexInputs, IotaWritesPositions) {
  VLE_REQUIRE_GPU();
  std::mt19937 rng(fresh_seed());
  const int64_t start = static_cast<int64_t>(rng() % 100000), count = 1 + static_cast<int64_t>(rng() % 5000);
  vle::Tensor out(vle::DType::kInt64, {count}, vle::cuda::device_allocator());
  vle::cuda::fill_iota(out.data_as<int64_t>(), start, count, nullptr);
  const vle::Tensor got = vle::cuda::to_host(out);
  for (int64_t i = 0; i < count; ++i) ASSERT_EQ(got.data_as<int64_t>()[i], start + i);
}

// A random sequence with every kind of slot: image patches, regions, routing tokens with all their
// placeholders (query rows), routing tokens cut short (plain rows) and plain text.
struct RandomAssembly {
  int64_t vocab = 0, hidden = 0;
  std::vector<float> table, image, region, det_table, gen_table;
  std::vector<int64_t> ids;
  int64_t patch = 0, region_id = 1, det = 2, gen = 3, det_ph = 4, gen_ph = 5;
  int64_t num_image = 0, num_region = 0;

  explicit RandomAssembly(std::mt19937& rng) {
    vocab = 40 + static_cast<int64_t>(rng() % 60);
    hidden = 1 + static_cast<int64_t>(rng() % 300);
    std::normal_distribution<float> normal;
    auto fill = [&](std::vector<float>& v, int64_t rows) {
      v.resize(static_cast<size_t>(rows * hidden));
      for (float& x : v) x = normal(rng) * 3.f;
    };
    fill(table, vocab);
    fill(det_table, 4);
    fill(gen_table, 6);
    const int64_t length = 1 + static_cast<int64_t>(rng() % 400);
    while (static_cast<int64_t>(ids.size()) < length) {
      switch (rng() % 6) {
        case 0: ids.push_back(patch); ++num_image; break;
        case 1: ids.push_back(region_id); ++num_region; break;
        case 2: case 3: {
          const bool is_det = rng() % 2;
          ids.push_back(is_det ? det : gen);
          const int64_t n = (is_det ? 4 : 6) - (rng() % 4 == 0 ? 1 : 0);  // now and then one short
          for (int64_t i = 0; i < n; ++i) ids.push_back(is_det ? det_ph : gen_ph);
          break;
        }
        default: ids.push_back(6 + static_cast<int64_t>(rng() % static_cast<uint32_t>(vocab - 6)));
      }
    }
    fill(image, num_image);
    fill(region, num_region);
  }

  vle::AssemblyInputs inputs(const float* t, const float* im, const float* re, const float* dq, const float* gq) const {
    vle::AssemblyInputs in;
    in.token_table = {t, {vocab, hidden}};
    in.ids = ids.data();
    in.num_ids = static_cast<int64_t>(ids.size());
    in.image_token_id = patch;
    in.region_token_id = region_id;
    if (num_image) in.image_rows = vle::FloatArrayRef{im, {num_image, hidden}};
    if (num_region) in.region_rows = vle::FloatArrayRef{re, {num_region, hidden}};
    in.query_tables["det"] = {dq, {4, hidden}};
    in.query_tables["gen"] = {gq, {6, hidden}};
    in.routing_kinds = {{det, "det"}, {gen, "gen"}};
    in.placeholder_ids = {det_ph, gen_ph};
    return in;
  }
};

vle::Tensor upload(const std::vector<float>& v) {
  vle::Tensor t(vle::DType::kFloat32, {static_cast<int64_t>(v.size())}, vle::cuda::device_allocator());
  vle::cuda::copy_to_device(t.data(), v.data(), t.bytes());
  return t;
}

TEST(CudaAssembly, DeviceRowsMatchTheCpuAssemblyInFloat32AndFloat16) {
  VLE_REQUIRE_GPU();
  std::mt19937 rng(fresh_seed());
  vle::cuda::Stream stream;
  vle::cuda::GatherScratch scratch;  // reused across cases, as the loop reuses it across steps
  for (int round = 0; round < 30; ++round) {
    const RandomAssembly r(rng);
    SCOPED_TRACE("round " + std::to_string(round) + ": " + std::to_string(r.ids.size()) + " ids, hidden " +
                 std::to_string(r.hidden));
    std::vector<float> want(r.ids.size() * static_cast<size_t>(r.hidden));
    vle::assemble_embeddings(r.inputs(r.table.data(), r.image.data(), r.region.data(), r.det_table.data(),
                                      r.gen_table.data()),
                             want.data());
    const vle::Tensor t = upload(r.table), im = upload(r.image), re = upload(r.region), dq = upload(r.det_table),
                      gq = upload(r.gen_table);
    const std::vector<const float*> sources = vle::assembly_sources(
        r.inputs(t.data_as<float>(), im.data_as<float>(), re.data_as<float>(), dq.data_as<float>(), gq.data_as<float>()));
    const int64_t rows = static_cast<int64_t>(r.ids.size());
    vle::Tensor out32(vle::DType::kFloat32, {rows, r.hidden}, vle::cuda::device_allocator());
    vle::Tensor out16(vle::DType::kFloat16, {rows, r.hidden}, vle::cuda::device_allocator());
    vle::cuda::gather_rows(sources, r.hidden, out32.data(), vle::DType::kFloat32, scratch, stream.get());
    vle::cuda::gather_rows(sources, r.hidden, out16.data(), vle::DType::kFloat16, scratch, stream.get());
    stream.synchronize();
    const vle::Tensor got32 = vle::cuda::to_host(out32), got16 = vle::cuda::to_host(out16);
    ASSERT_EQ(std::memcmp(got32.data(), want.data(), want.size() * sizeof(float)), 0);
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_EQ(got16.data_as<uint16_t>()[i], vle::float_to_half(want[i])) << "element " << i;
    }
  }
}

TEST(CudaAssembly, RowsWrittenAsAnotherDtypeAreRefused) {
  vle::cuda::GatherScratch scratch;
  EXPECT_THROW(vle::cuda::gather_rows({nullptr}, 4, nullptr, vle::DType::kInt64, scratch, nullptr), vle::InputError);
}

}  // namespace
