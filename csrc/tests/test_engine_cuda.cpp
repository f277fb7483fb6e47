// The ONNX Runtime engine on the CUDA execution provider with device memory (the contract of
// engines/engine.h): device inputs and bound device outputs are read and written in place, device fetches
// come back as device tensors that own ONNX Runtime's buffer, and a run makes no host<->device copy (the
// session's profile). It needs a build with VLE_WITH_CUDA, a GPU and an onnxruntime with the CUDA provider
// (onnxruntime-gpu, VLE_ONNXRUNTIME_LIBRARY); without one of them each test skips naming it. Never run in
// this repository's CI (no GPU).
#include <gtest/gtest.h>

#include <unistd.h>

#include <string>

#ifdef VLE_WITH_CUDA

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <vector>

#include "cuda/device.h"
#include "cuda/memory.h"
#include "engines/engine.h"
#include "engines/ort_profile.h"

namespace {

const std::filesystem::path kData = std::filesystem::path(VLE_SOURCE_DIR) / "csrc/tests/data";

// Skips unless a GPU and the CUDA provider are both there.
#define VLE_REQUIRE_CUDA_PROVIDER()                                                                    \
  do {                                                                                                 \
    std::string why_;                                                                                  \
    if (!::vle::cuda::cuda_available(&why_)) GTEST_SKIP() << "needs a CUDA GPU: " << why_;             \
    const auto have_ = ::vle::available_providers();                                                   \
    if (std::find(have_.begin(), have_.end(), "CUDAExecutionProvider") == have_.end()) {               \
      GTEST_SKIP() << "needs an onnxruntime with CUDAExecutionProvider (onnxruntime-gpu, or "          \
                      "VLE_ONNXRUNTIME_LIBRARY set to its libonnxruntime.so.1)";                      \
    }                                                                                                  \
  } while (0)

template <typename T>
vle::Tensor host_tensor(vle::DType dtype, std::vector<int64_t> shape, const std::vector<T>& values) {
  vle::Tensor t(dtype, std::move(shape));
  std::memcpy(t.data(), values.data(), t.bytes());
  return t;
}

std::unique_ptr<vle::Engine> cuda_elementwise(const std::string& profile_prefix = "") {
  vle::EngineOptions options;
  options.providers = {"CUDAExecutionProvider", "CPUExecutionProvider"};
  options.profile_prefix = profile_prefix;
  return vle::make_engine("onnxruntime", kData / "elementwise.onnx", "elementwise", options);
}

TEST(OnnxRuntimeEngineCuda, DeviceInputsOutputsAndFetchesStayOnTheDevice) {
  VLE_REQUIRE_CUDA_PROVIDER();
  auto engine = cuda_elementwise();
  ASSERT_TRUE(engine->device_io());
  const vle::Tensor a = vle::cuda::to_device(host_tensor<float>(vle::DType::kFloat32, {2, 3}, {1, 2, 3, 4, 5, 6}));
  const vle::Tensor b =
      vle::cuda::to_device(host_tensor<float>(vle::DType::kFloat32, {2, 3}, {10, 0, 10, 0, 10, 0}));
  const vle::Tensor ids = vle::cuda::to_device(host_tensor<int64_t>(vle::DType::kInt64, {2}, {7, 41}));
  ASSERT_EQ(a.memory(), vle::MemoryKind::kDevice);
  // The bound output is a slice in the middle of a device block, as the arena's next rows are.
  vle::Tensor block =
      vle::cuda::to_device(host_tensor<float>(vle::DType::kFloat32, {12}, std::vector<float>(12, -1)));
  vle::TensorView rows{vle::DType::kFloat32, {2, 3}, block.data_as<float>() + 3, vle::MemoryKind::kDevice};

  std::vector<vle::Tensor> got =
      engine->run({{"a", a.view()}, {"b", b.view()}, {"ids", ids.view()}}, {{"sum", rows}},
                  {"ids_plus_one", "half"}, vle::MemoryKind::kDevice);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0].memory(), vle::MemoryKind::kDevice);
  EXPECT_EQ(got[1].memory(), vle::MemoryKind::kDevice);
  const vle::Tensor sum = vle::cuda::to_host(block);
  const std::vector<float> want_sum{-1, -1, -1, 11, 2, 13, 4, 15, 6, -1, -1, -1};
  EXPECT_EQ(std::vector<float>(sum.data_as<float>(), sum.data_as<float>() + 12), want_sum);
  const vle::Tensor plus_one = vle::cuda::to_host(got[0]);
  EXPECT_EQ(plus_one.data_as<int64_t>()[0], 8);
  EXPECT_EQ(plus_one.data_as<int64_t>()[1], 42);
  EXPECT_EQ(vle::cuda::to_host(got[1]).data_as<uint16_t>()[0], 0x3C00);  // 1.0 in half precision

  // A host fetch from the same device session comes back on the host.
  std::vector<vle::Tensor> host =
      engine->run({{"a", a.view()}, {"b", b.view()}, {"ids", ids.view()}}, {}, {"count"});
  EXPECT_EQ(host[0].memory(), vle::MemoryKind::kHost);
  EXPECT_EQ(host[0].data_as<int32_t>()[1], 41);
}

TEST(OnnxRuntimeEngineCuda, DeviceBoundRunsMakeNoCopies) {
  VLE_REQUIRE_CUDA_PROVIDER();
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("vle-cuda-profile-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  auto engine = cuda_elementwise((dir / "elementwise").string());
  const vle::Tensor a = vle::cuda::to_device(host_tensor<float>(vle::DType::kFloat32, {2, 3}, {1, 2, 3, 4, 5, 6}));
  const vle::Tensor ids = vle::cuda::to_device(host_tensor<int64_t>(vle::DType::kInt64, {2}, {7, 41}));
  vle::Tensor out(vle::DType::kFloat32, {2, 3}, vle::cuda::device_allocator());
  for (int i = 0; i < 3; ++i) {
    engine->run({{"a", a.view()}, {"b", a.view()}, {"ids", ids.view()}}, {{"sum", out.view()}}, {},
                vle::MemoryKind::kDevice);
  }
  const std::vector<vle::RunCopies> runs = vle::profile_copies(engine->end_profiling());
  ASSERT_EQ(runs.size(), 3u);
  for (size_t r = 0; r < runs.size(); ++r) {
    EXPECT_EQ(runs[r].to_host + runs[r].from_host, 0)
        << "run " << r << ": " << runs[r].to_host << " MemcpyToHost, " << runs[r].from_host << " MemcpyFromHost";
  }
  std::filesystem::remove_all(dir);
}

}  // namespace

#else

TEST(OnnxRuntimeEngineCuda, NeedsACudaBuild) {
  GTEST_SKIP() << "built without VLE_WITH_CUDA: configure with -DVLE_WITH_CUDA=ON (cmake --preset cuda) to "
                  "test device binding";
}

#endif
