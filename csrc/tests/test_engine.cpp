// The ONNX Runtime engine on csrc/tests/data/elementwise.onnx (made by csrc/tests/data/make_fixtures.py):
// bound outputs land in the caller's buffer, fetched ones come back with the right values and dtypes, every
// bad call is refused before anything runs with an error naming what is wrong, and the options take effect.
#include <gtest/gtest.h>

#include <dirent.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "engines/engine.h"
#include "engines/ort_profile.h"
#include "visionllm_edge/errors.h"
#include "tests/test_util.h"

namespace {

const std::filesystem::path kData = std::filesystem::path(VLE_SOURCE_DIR) / "csrc/tests/data";

std::unique_ptr<vle::Engine> elementwise(const vle::EngineOptions& options = {}) {
  return vle::make_engine("onnxruntime", kData / "elementwise.onnx", "elementwise", options);
}

template <typename T>
vle::TensorView view(std::vector<T>& v, vle::DType dtype, std::vector<int64_t> shape) {
  return {dtype, std::move(shape), v.data()};
}

using vle::test_util::message_of;

struct Inputs {
  std::vector<float> a{1, 2, 3, 4, 5, 6};
  std::vector<float> b{10, 0, 10, 0, 10, 0};
  std::vector<int64_t> ids{7, 41};
  std::vector<vle::NamedView> views() {
    return {{"a", view(a, vle::DType::kFloat32, {2, 3})},
            {"b", view(b, vle::DType::kFloat32, {2, 3})},
            {"ids", view(ids, vle::DType::kInt64, {2})}};
  }
};

size_t thread_count() {
  size_t n = 0;
  if (DIR* d = opendir("/proc/self/task")) {
    while (dirent* e = readdir(d)) n += e->d_name[0] != '.';
    closedir(d);
  }
  return n;
}

TEST(OnnxRuntimeEngine, ReadsTheGraphSignature) {
  auto engine = elementwise();
  EXPECT_EQ(engine->name(), "elementwise");
  ASSERT_EQ(engine->inputs().size(), 3u);
  EXPECT_EQ(engine->inputs()[0].name, "a");
  EXPECT_EQ(engine->inputs()[2].dtype, vle::DType::kInt64);
  EXPECT_EQ(engine->inputs()[0].shape, (std::vector<int64_t>{-1, 3}));
  ASSERT_EQ(engine->outputs().size(), 5u);
  EXPECT_EQ(engine->outputs()[2].name, "half");
  EXPECT_EQ(engine->outputs()[2].dtype, vle::DType::kFloat16);
  EXPECT_EQ(engine->outputs()[3].dtype, vle::DType::kBool);
  EXPECT_EQ(engine->outputs()[4].dtype, vle::DType::kInt32);
}

TEST(OnnxRuntimeEngine, BoundOutputIsWrittenIntoTheCallersBuffer) {
  auto engine = elementwise();
  Inputs in;
  // The buffer is a slice in the middle of a larger block, as the arena's next rows are: the rows around it
  // must stay untouched.
  std::vector<float> block(12, -1.f);
  vle::TensorView rows{vle::DType::kFloat32, {2, 3}, block.data() + 3};
  std::vector<vle::Tensor> got = engine->run(in.views(), {{"sum", rows}}, {});
  EXPECT_TRUE(got.empty());
  const std::vector<float> want{-1, -1, -1, 11, 2, 13, 4, 15, 6, -1, -1, -1};
  EXPECT_EQ(block, want);
}

TEST(OnnxRuntimeEngine, FetchReturnsEveryDtypeInTheOrderAsked) {
  auto engine = elementwise();
  Inputs in;
  std::vector<float> sum(6);
  std::vector<vle::Tensor> got =
      engine->run(in.views(), {{"sum", view(sum, vle::DType::kFloat32, {2, 3})}},
                  {"count", "ids_plus_one", "greater", "half"});
  ASSERT_EQ(got.size(), 4u);
  EXPECT_EQ(sum[0], 11.f);
  EXPECT_EQ(got[0].dtype(), vle::DType::kInt32);
  EXPECT_EQ(got[0].data_as<int32_t>()[1], 41);
  EXPECT_EQ(got[1].dtype(), vle::DType::kInt64);
  EXPECT_EQ(got[1].shape(), (std::vector<int64_t>{2}));
  EXPECT_EQ(got[1].data_as<int64_t>()[0], 8);
  EXPECT_EQ(got[1].data_as<int64_t>()[1], 42);
  EXPECT_EQ(got[2].dtype(), vle::DType::kBool);
  const bool* greater = got[2].data_as<bool>();
  EXPECT_EQ(std::vector<bool>(greater, greater + 6), (std::vector<bool>{false, true, false, true, false, true}));
  EXPECT_EQ(got[3].dtype(), vle::DType::kFloat16);
  EXPECT_EQ(got[3].shape(), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(got[3].data_as<uint16_t>()[0], 0x3C00);  // 1.0 in IEEE half precision
  // A fetched tensor outlives the engine that made it.
  vle::Tensor kept = got[1];
  engine.reset();
  EXPECT_EQ(kept.data_as<int64_t>()[1], 42);
}

TEST(OnnxRuntimeEngine, EmptyBatchRuns) {
  auto engine = elementwise();
  std::vector<float> a, b;
  std::vector<int64_t> ids;
  std::vector<vle::Tensor> got = engine->run({{"a", view(a, vle::DType::kFloat32, {0, 3})},
                                              {"b", view(b, vle::DType::kFloat32, {0, 3})},
                                              {"ids", view(ids, vle::DType::kInt64, {0})}},
                                             {}, {"sum"});
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].shape(), (std::vector<int64_t>{0, 3}));
}

TEST(OnnxRuntimeEngine, MissingAndUnexpectedInputsAreNamed) {
  auto engine = elementwise();
  Inputs in;
  auto views = in.views();
  views.erase(views.begin() + 1);                                   // no "b"
  views.push_back({"c", view(in.b, vle::DType::kFloat32, {2, 3})});  // and an unknown "c"
  const std::string msg = message_of<vle::InputError>([&] { engine->run(views, {}, {"sum"}); });
  EXPECT_NE(msg.find("elementwise: inputs missing ['b'], unexpected ['c'] (graph takes ['a', 'b', 'ids'])"),
            std::string::npos)
      << msg;
}

TEST(OnnxRuntimeEngine, WrongDtypeAndShapeAreNamed) {
  auto engine = elementwise();
  Inputs in;
  std::vector<int32_t> ids32{7, 41};
  auto views = in.views();
  views[2].second = view(ids32, vle::DType::kInt32, {2});
  EXPECT_EQ(message_of<vle::InputError>([&] { engine->run(views, {}, {"sum"}); }),
            "elementwise: input 'ids' must be int64, got int32");
  views = in.views();
  views[0].second.shape = {3, 2};
  EXPECT_EQ(message_of<vle::InputError>([&] { engine->run(views, {}, {"sum"}); }),
            "elementwise: input 'a' must have shape [-1, 3] (-1: any size), got [3, 2]");
  std::vector<int64_t> wrong(6);
  EXPECT_EQ(message_of<vle::InputError>(
                [&] { engine->run(in.views(), {{"sum", view(wrong, vle::DType::kInt64, {2, 3})}}, {}); }),
            "elementwise: output buffer 'sum' must be float32, got int64");
}

TEST(OnnxRuntimeEngine, UnknownAndRepeatedOutputsAreNamed) {
  auto engine = elementwise();
  Inputs in;
  EXPECT_EQ(message_of<vle::InputError>([&] { engine->run(in.views(), {}, {"sum", "product"}); }),
            "elementwise: no output named 'product'; outputs are ['sum', 'ids_plus_one', 'half', 'greater', "
            "'count']");
  std::vector<float> sum(6);
  EXPECT_EQ(message_of<vle::InputError>(
                [&] { engine->run(in.views(), {{"sum", view(sum, vle::DType::kFloat32, {2, 3})}}, {"sum"}); }),
            "elementwise: output 'sum' is asked for twice");
}

TEST(OnnxRuntimeEngine, ARefusedCallWritesNothing) {
  auto engine = elementwise();
  Inputs in;
  std::vector<float> sum(6, -1.f);
  EXPECT_THROW(engine->run(in.views(), {{"sum", view(sum, vle::DType::kFloat32, {2, 3})}}, {"nope"}),
               vle::InputError);
  EXPECT_EQ(sum, std::vector<float>(6, -1.f));
}

// Binding device memory needs a CUDA session, which needs a GPU: that path is exercised by scripts/gpu_check.sh
// only. Here: a CPU session says it cannot, and refuses device views and device fetches by name.
TEST(OnnxRuntimeEngine, ACpuSessionRefusesDeviceMemoryByName) {
  auto engine = elementwise();
  EXPECT_FALSE(engine->device_io());
  Inputs in;
  auto views = in.views();
  views[1].second.memory = vle::MemoryKind::kDevice;
  EXPECT_EQ(message_of<vle::InputError>([&] { engine->run(views, {}, {"sum"}); }),
            "elementwise: input 'b' is device memory; this engine binds host memory only (its session has "
            "neither the CUDA nor the TensorRT execution provider)");
  std::vector<float> sum(6, -1.f);
  vle::TensorView rows = view(sum, vle::DType::kFloat32, {2, 3});
  rows.memory = vle::MemoryKind::kDevice;
  EXPECT_EQ(message_of<vle::InputError>([&] { engine->run(in.views(), {{"sum", rows}}, {}); }),
            "elementwise: output buffer 'sum' is device memory; this engine binds host memory only (its "
            "session has neither the CUDA nor the TensorRT execution provider)");
  EXPECT_EQ(sum, std::vector<float>(6, -1.f));
  EXPECT_EQ(message_of<vle::InputError>(
                [&] { engine->run(in.views(), {}, {"sum", "half"}, vle::MemoryKind::kDevice); }),
            "elementwise: outputs ['sum', 'half'] were asked for in device memory; this engine fetches into host "
            "memory only (its session has neither the CUDA nor the TensorRT execution provider)");
  // Host fetches say where they live.
  EXPECT_EQ(engine->run(in.views(), {}, {"sum"})[0].memory(), vle::MemoryKind::kHost);
  vle::EngineOptions negative;
  negative.device_id = -1;
  EXPECT_EQ(message_of<vle::InputError>([&] { elementwise(negative); }),
            "elementwise: device_id must be a CUDA device index (0 or more), got -1");
}

// The profile of a CPU session has a model_run per run and no copies; the copies of a GPU session's profile
// are counted on a snippet in the same format (what ONNX Runtime writes for its Memcpy nodes).
TEST(OnnxRuntimeEngine, ProfileCountsRunsAndTheirCopies) {
  EXPECT_EQ(elementwise()->end_profiling(), "");
  vle::EngineOptions options;
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("vle-profile-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  options.profile_prefix = (dir / "elementwise").string();
  auto engine = elementwise(options);
  Inputs in;
  for (int i = 0; i < 3; ++i) engine->run(in.views(), {}, {"sum"});
  const std::string file = engine->end_profiling();
  ASSERT_EQ(file.rfind(options.profile_prefix, 0), 0u) << file;
  const std::vector<vle::RunCopies> runs = vle::profile_copies(file);
  ASSERT_EQ(runs.size(), 3u);
  for (const vle::RunCopies& r : runs) EXPECT_EQ(r.to_host + r.from_host, 0);

  const std::filesystem::path snippet = dir / "gpu.json";
  std::ofstream(snippet) << R"([
    {"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 90},
    {"cat": "Node", "name": "Memcpy_token_0_kernel_time", "ts": 101, "dur": 3,
     "args": {"op_name": "MemcpyFromHost", "output_size": "8"}},
    {"cat": "Node", "name": "Memcpy_token_0_fence_before", "ts": 100, "dur": 0, "args": {"op_name": "MemcpyFromHost"}},
    {"cat": "Node", "name": "MatMul_kernel_time", "ts": 105, "dur": 30, "args": {"op_name": "MatMul"}},
    {"cat": "Node", "name": "Memcpy_token_1_kernel_time", "ts": 140, "dur": 3,
     "args": {"op_name": "MemcpyToHost", "output_size": "4096"}},
    {"cat": "Node", "name": "Memcpy_token_2_kernel_time", "ts": 142, "dur": 3,
     "args": {"op_name": "MemcpyToHost", "output_size": "16"}},
    {"cat": "Session", "name": "model_run", "ts": 100, "dur": 50},
    {"cat": "Node", "name": "MatMul_kernel_time", "ts": 205, "dur": 30, "args": {"op_name": "MatMul"}},
    {"cat": "Session", "name": "model_run", "ts": 200, "dur": 50}
  ])";
  const std::vector<vle::RunCopies> copies = vle::profile_copies(snippet);
  ASSERT_EQ(copies.size(), 2u);
  EXPECT_EQ(copies[0].from_host, 1);
  EXPECT_EQ(copies[0].to_host, 2);
  EXPECT_EQ(copies[1].from_host + copies[1].to_host, 0);
  ASSERT_EQ(copies[0].nodes.size(), 3u);
  EXPECT_EQ(copies[0].nodes[0].op, "MemcpyFromHost");
  EXPECT_EQ(copies[0].nodes[0].node, "Memcpy_token_0");
  EXPECT_TRUE(copies[1].nodes.empty());
  EXPECT_TRUE(runs[0].nodes.empty());

  std::ofstream(dir / "not.json") << R"({"traceEvents": []})";
  EXPECT_EQ(message_of<vle::ArtifactError>([&] { vle::profile_copies(dir / "not.json"); }),
            (dir / "not.json").string() + ": not an ONNX Runtime profile (a JSON array of trace events)");
  std::filesystem::remove_all(dir);
}

// The bytes of each copy are its output_size, a decimal string as ONNX Runtime writes it (a number is read
// too); the GPU check's bar is on them, so a Memcpy kernel without a readable size is an error, never 0.
TEST(OnnxRuntimeEngine, ProfileListsEachCopyNodeWithItsBytes) {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("vle-profile-bytes-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  const std::filesystem::path snippet = dir / "gpu.json";
  std::ofstream(snippet) << R"([
    {"cat": "Session", "name": "model_run", "ts": 100, "dur": 50},
    {"cat": "Node", "name": "Memcpy_past_kernel_time", "ts": 101, "dur": 3,
     "args": {"op_name": "MemcpyFromHost", "output_size": "1048576"}},
    {"cat": "Node", "name": "MatMul_kernel_time", "ts": 105, "dur": 30,
     "args": {"op_name": "MatMul", "output_size": "64"}},
    {"cat": "Node", "name": "Memcpy_pos_kernel_time", "ts": 140, "dur": 3,
     "args": {"op_name": "MemcpyToHost", "output_size": 8}},
    {"cat": "Session", "name": "model_run", "ts": 200, "dur": 50},
    {"cat": "Node", "name": "Memcpy_pos_kernel_time", "ts": 201, "dur": 3,
     "args": {"op_name": "MemcpyToHost", "output_size": "8"}}
  ])";
  const std::vector<vle::RunCopies> runs = vle::profile_copies(snippet);
  ASSERT_EQ(runs.size(), 2u);
  ASSERT_EQ(runs[0].nodes.size(), 2u);
  EXPECT_EQ(runs[0].nodes[0].op, "MemcpyFromHost");
  EXPECT_EQ(runs[0].nodes[0].node, "Memcpy_past");
  EXPECT_EQ(runs[0].nodes[0].bytes, 1048576);
  EXPECT_EQ(runs[0].nodes[1].op, "MemcpyToHost");
  EXPECT_EQ(runs[0].nodes[1].node, "Memcpy_pos");
  EXPECT_EQ(runs[0].nodes[1].bytes, 8);
  EXPECT_EQ(runs[0].to_host, 1);
  EXPECT_EQ(runs[0].from_host, 1);
  ASSERT_EQ(runs[1].nodes.size(), 1u);
  EXPECT_EQ(runs[1].nodes[0].bytes, 8);
  EXPECT_EQ(runs[1].to_host, 1);

  const std::filesystem::path unsized = dir / "unsized.json";
  std::ofstream(unsized) << R"([
    {"cat": "Session", "name": "model_run", "ts": 100, "dur": 50},
    {"cat": "Node", "name": "Memcpy_past_kernel_time", "ts": 101, "dur": 3, "args": {"op_name": "MemcpyFromHost"}}
  ])";
  EXPECT_EQ(message_of<vle::ArtifactError>([&] { vle::profile_copies(unsized); }),
            unsized.string() + ": MemcpyFromHost node 'Memcpy_past' has no output_size (a whole number of bytes) "
                               "in its args");
  std::filesystem::remove_all(dir);
}

TEST(OnnxRuntimeEngine, AFailureInsideOnnxRuntimeIsAnEngineErrorNamingTheGraph) {
  auto engine = elementwise();
  Inputs in;
  std::vector<float> b3(9);
  auto views = in.views();
  views[1].second = view(b3, vle::DType::kFloat32, {3, 3});  // N = 2 against N = 3: only the graph can tell
  const std::string msg = message_of<vle::EngineError>([&] { engine->run(views, {}, {"sum"}); });
  EXPECT_EQ(msg.rfind("elementwise: ONNX Runtime failed running the graph: ", 0), 0u) << msg;
}

TEST(OnnxRuntimeEngine, UnknownProviderNamesItAndWhatTheLibraryHas) {
  vle::EngineOptions options;
  options.providers = {"NoSuchExecutionProvider", "CPUExecutionProvider"};
  const std::string msg = message_of<vle::BackendUnavailableError>([&] { elementwise(options); });
  EXPECT_NE(msg.find("elementwise: execution provider(s) ['NoSuchExecutionProvider'] are not in this "
                     "onnxruntime build"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("'CPUExecutionProvider'"), std::string::npos) << msg;
  const auto have = vle::available_providers();
  EXPECT_NE(std::find(have.begin(), have.end(), "CPUExecutionProvider"), have.end());
}

TEST(OnnxRuntimeEngine, FilesBackendsAndLibrariesAreNamed) {
  const std::filesystem::path missing = kData / "no_such_graph.onnx";
  EXPECT_NE(message_of<vle::ArtifactError>([&] { vle::make_engine("onnxruntime", missing, "llm", {}); })
                .find(missing.string()),
            std::string::npos);
  const std::filesystem::path corrupt = kData / "not_a_model.onnx";
  EXPECT_NE(message_of<vle::ArtifactError>([&] { vle::make_engine("onnxruntime", corrupt, "llm", {}); })
                .find("llm: ONNX Runtime cannot load " + corrupt.string()),
            std::string::npos);
  EXPECT_EQ(message_of<vle::InputError>([&] { vle::make_engine("openvino", missing, "llm", {}); }),
            "unknown backend 'openvino'; known: 'onnxruntime', 'tensorrt'");
  vle::EngineOptions other;
  other.onnxruntime_library = "/nonexistent/libonnxruntime.so.1";
  const std::string msg = message_of<vle::BackendUnavailableError>([&] { elementwise(other); });
  EXPECT_NE(msg.find("/nonexistent/libonnxruntime.so.1"), std::string::npos) << msg;
  EXPECT_NE(vle::onnxruntime_library_in_use().find("(ONNX Runtime 1."), std::string::npos);
}

TEST(OnnxRuntimeEngine, ThreadsSizeTheSessionsPool) {
  // ONNX Runtime's intra-op pool of n threads starts n - 1 workers beside the caller's thread.
  vle::EngineOptions one, three;
  one.threads = 1;
  three.threads = 3;
  elementwise();  // the library and its environment are up before counting
  const size_t before = thread_count();
  auto single = elementwise(one);
  EXPECT_EQ(thread_count(), before);
  auto pooled = elementwise(three);
  EXPECT_EQ(thread_count(), before + 2);
  Inputs in;
  EXPECT_EQ(pooled->run(in.views(), {}, {"ids_plus_one"})[0].data_as<int64_t>()[0], 8);
  vle::EngineOptions negative;
  negative.threads = -1;
  EXPECT_EQ(message_of<vle::InputError>([&] { elementwise(negative); }),
            "elementwise: threads must be 0 (ONNX Runtime's default) or positive, got -1");
}

}  // namespace
