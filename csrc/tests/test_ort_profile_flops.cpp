// profile_flops (engines/ort_profile.h) on hand-written profiles whose FLOPs follow from the shapes alone, and
// on a real one: ONNX Runtime's profile of the elementwise fixture, which has no matrix kernel.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "engines/engine.h"
#include "engines/ort_profile.h"
#include "tests/test_util.h"
#include "visionllm_edge/errors.h"

namespace {

using vle::test_util::message_of;

struct ScratchDir {
  std::filesystem::path path =
      std::filesystem::temp_directory_path() / ("vle-profile-flops-" + std::to_string(getpid()));
  ScratchDir() { std::filesystem::create_directories(path); }
  ~ScratchDir() { std::filesystem::remove_all(path); }
  std::filesystem::path write(const std::string& name, const std::string& text) const {
    std::ofstream(path / name) << text;
    return path / name;
  }
};

// Each rule once, with sizes chosen so that every product is distinct:
//   MatMul [2,3,4] x [4,5] -> [2,3,5]: 2 * 30 * 4 = 240
//   Gemm with A transposed, A [7,3] (K = 7), Y [3,6]: 2 * 18 * 7 = 252
//   Conv X [1,3,8,8], W [16,3,3,3], Y [1,16,6,6]: 2 * 576 * 27 = 31104
//   ConvTranspose X [1,4,5,5], W [4,2,3,3], Y [1,2,7,7]: 2 * 100 * 18 = 3600
//   MatMulInteger [4,8] x [8,2] -> [4,2]: 2 * 8 * 8 = 128 (int8)
//   QLinearConv X [1,2,4,4], W (input 3) [3,2,1,1], Y [1,3,4,4]: 2 * 48 * 2 = 192 (int8)
//   MatMulNBits A [1,5,64], Y [1,5,10]: 2 * 50 * 64 = 6400 (nbits)
// The second run has one MatMul [1,1,4] -> [1,1,5] (40) and an Einsum, which is reported, not counted.
constexpr const char* kProfile = R"([
  {"cat": "Session", "name": "model_run", "ts": 100, "dur": 100},
  {"cat": "Node", "name": "mm_kernel_time", "ts": 101, "dur": 2, "args": {"op_name": "MatMul",
   "input_type_shape": [{"float": [2, 3, 4]}, {"float": [4, 5]}], "output_type_shape": [{"float": [2, 3, 5]}]}},
  {"cat": "Node", "name": "mm_fence_before", "ts": 101, "dur": 0, "args": {"op_name": "MatMul"}},
  {"cat": "Node", "name": "gemm_kernel_time", "ts": 104, "dur": 2, "args": {"op_name": "Gemm",
   "input_type_shape": [{"float": [7, 3]}, {"float": [7, 6]}, {"float": [6]}], "output_type_shape": [{"float": [3, 6]}]}},
  {"cat": "Node", "name": "conv_kernel_time", "ts": 110, "dur": 2, "args": {"op_name": "Conv",
   "input_type_shape": [{"float": [1, 3, 8, 8]}, {"float": [16, 3, 3, 3]}], "output_type_shape": [{"float": [1, 16, 6, 6]}]}},
  {"cat": "Node", "name": "deconv_kernel_time", "ts": 120, "dur": 2, "args": {"op_name": "ConvTranspose",
   "input_type_shape": [{"float": [1, 4, 5, 5]}, {"float": [4, 2, 3, 3]}], "output_type_shape": [{"float": [1, 2, 7, 7]}]}},
  {"cat": "Node", "name": "mmi_kernel_time", "ts": 130, "dur": 2, "args": {"op_name": "MatMulInteger",
   "input_type_shape": [{"uint8": [4, 8]}, {"int8": [8, 2]}], "output_type_shape": [{"int32": [4, 2]}]}},
  {"cat": "Node", "name": "qconv_kernel_time", "ts": 140, "dur": 2, "args": {"op_name": "QLinearConv",
   "input_type_shape": [{"uint8": [1, 2, 4, 4]}, {"float": []}, {"uint8": []}, {"int8": [3, 2, 1, 1]}],
   "output_type_shape": [{"uint8": [1, 3, 4, 4]}]}},
  {"cat": "Node", "name": "nbits_kernel_time", "ts": 150, "dur": 2, "args": {"op_name": "MatMulNBits",
   "input_type_shape": [{"float": [1, 5, 64]}, {"uint8": [10, 2, 16]}, {"float": [20]}], "output_type_shape": [{"float": [1, 5, 10]}]}},
  {"cat": "Node", "name": "add_kernel_time", "ts": 160, "dur": 2, "args": {"op_name": "Add",
   "input_type_shape": [{"float": [1000, 1000]}, {"float": [1000, 1000]}], "output_type_shape": [{"float": [1000, 1000]}]}},
  {"cat": "Session", "name": "model_run", "ts": 300, "dur": 40},
  {"cat": "Node", "name": "mm_kernel_time", "ts": 301, "dur": 2, "args": {"op_name": "MatMul",
   "input_type_shape": [{"float": [1, 1, 4]}, {"float": [4, 5]}], "output_type_shape": [{"float": [1, 1, 5]}]}},
  {"cat": "Node", "name": "einsum_kernel_time", "ts": 305, "dur": 2, "args": {"op_name": "Einsum",
   "input_type_shape": [{"float": [2, 3]}], "output_type_shape": [{"float": [3]}]}}
])";

TEST(OrtProfileFlops, CountsEachRuleFromTheShapesItRan) {
  ScratchDir dir;
  const std::vector<vle::RunFlops> runs = vle::profile_flops(dir.write("p.json", kProfile));
  ASSERT_EQ(runs.size(), 2u);
  EXPECT_EQ(runs[0].ts_us, 100);
  EXPECT_EQ(runs[0].dur_us, 100);
  EXPECT_EQ(runs[0].float_flops, 240 + 252 + 31104 + 3600);
  EXPECT_EQ(runs[0].int8_flops, 128 + 192);
  EXPECT_EQ(runs[0].nbits_flops, 6400);
  EXPECT_TRUE(runs[0].uncounted.empty());
  EXPECT_EQ(runs[1].ts_us, 300);
  EXPECT_EQ(runs[1].float_flops, 40);
  EXPECT_EQ(runs[1].int8_flops + runs[1].nbits_flops, 0);
  ASSERT_EQ(runs[1].uncounted.size(), 1u);
  EXPECT_EQ(runs[1].uncounted.at("Einsum"), 1);
}

// A counted kernel whose shapes cannot be read would make the floor silently low: an error naming the node.
TEST(OrtProfileFlops, AKernelWithoutItsShapesIsNamed) {
  ScratchDir dir;
  const auto unshaped = dir.write("unshaped.json", R"([
    {"cat": "Session", "name": "model_run", "ts": 0, "dur": 10},
    {"cat": "Node", "name": "proj_kernel_time", "ts": 1, "dur": 2, "args": {"op_name": "MatMul",
     "input_type_shape": [{"float": [2, 4]}, {"float": [4, 3]}]}}
  ])");
  EXPECT_EQ(message_of<vle::ArtifactError>([&] { vle::profile_flops(unshaped); }),
            unshaped.string() +
                ": MatMul node 'proj' has no output shape (input_type_shape / output_type_shape with whole "
                "dimensions) in its args");
  const auto symbolic = dir.write("symbolic.json", R"([
    {"cat": "Session", "name": "model_run", "ts": 0, "dur": 10},
    {"cat": "Node", "name": "c_kernel_time", "ts": 1, "dur": 2, "args": {"op_name": "Conv",
     "input_type_shape": [{"float": [1, 3, 8, 8]}], "output_type_shape": [{"float": [1, 4, 8, 8]}]}}
  ])");
  EXPECT_NE(message_of<vle::ArtifactError>([&] { vle::profile_flops(symbolic); })
                .find("Conv node 'c' has no input shapes"),
            std::string::npos);
  const auto not_profile = dir.write("not.json", R"({"traceEvents": []})");
  EXPECT_EQ(message_of<vle::ArtifactError>([&] { vle::profile_flops(not_profile); }),
            not_profile.string() + ": not an ONNX Runtime profile (a JSON array of trace events)");
}

// ONNX Runtime's own profile of a graph of element-wise ops: every run is listed, none has matrix FLOPs.
TEST(OrtProfileFlops, ReadsOnnxRuntimesProfile) {
  ScratchDir dir;
  vle::EngineOptions options;
  options.profile_prefix = (dir.path / "elementwise").string();
  auto engine = vle::make_engine(
      "onnxruntime", std::filesystem::path(VLE_SOURCE_DIR) / "csrc/tests/data/elementwise.onnx", "elementwise",
      options);
  std::vector<float> a{1, 2, 3, 4, 5, 6}, b{10, 0, 10, 0, 10, 0};
  std::vector<int64_t> ids{7, 41};
  const std::vector<vle::NamedView> in = {{"a", {vle::DType::kFloat32, {2, 3}, a.data()}},
                                          {"b", {vle::DType::kFloat32, {2, 3}, b.data()}},
                                          {"ids", {vle::DType::kInt64, {2}, ids.data()}}};
  for (int i = 0; i < 2; ++i) engine->run(in, {}, {"sum"});
  const std::vector<vle::RunFlops> runs = vle::profile_flops(engine->end_profiling());
  ASSERT_EQ(runs.size(), 2u);
  EXPECT_LT(runs[0].ts_us, runs[1].ts_us);
  for (const vle::RunFlops& r : runs) EXPECT_EQ(r.float_flops + r.int8_flops + r.nbits_flops, 0);
}

}  // namespace
