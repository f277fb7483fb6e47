// The TensorRT backend's logic, none of which needs TensorRT or a GPU: the profile planner on the cases
// tests/test_trt_report.py checks in Python, the profile strings, the precision rules of TensorRT 10 and 11,
// the stamped engine cache, and the named errors where the TensorRT provider or libraries are missing. A
// TensorRT session itself has never run here (TensorRT cannot be installed on these machines).
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "artifact/files.h"
#include "artifact/manifest.h"
#include "engines/engine.h"
#include "engines/tensorrt.h"
#include "engines/tensorrt_profiles.h"
#include "visionllm_edge/errors.h"
#include "tests/test_util.h"

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const fs::path kData = fs::path(VLE_SOURCE_DIR) / "csrc/tests/data";

using vle::test_util::message_of;

// An input with symbolic axes ("" for a static one).
vle::ProfileInput input(const std::string& name, std::vector<int64_t> dims, std::vector<std::string> symbols) {
  return {name, std::move(dims), std::move(symbols)};
}

const vle::ShapeRange& shapes_of(const vle::Profile& p, const std::string& name) {
  for (const auto& [n, s] : p.inputs) {
    if (n == name) return s;
  }
  throw std::runtime_error("no input " + name);
}

// --- the planner ------------------------------------------------------------------------------------------

TEST(TensorrtProfiles, VisionTilesFromFactsAndUnresolvedWithout) {
  const std::vector<vle::ProfileInput> inputs{input("pixel_values", {-1, 3, 8, 8}, {"tiles", "", "", ""})};
  vle::ProfileTable t = vle::profile_shapes("vision", inputs, {{"max_tiles", 4}});
  ASSERT_EQ(t.profiles.size(), 1u);
  EXPECT_EQ(t.profiles[0].name, "default");
  const vle::ShapeRange& s = shapes_of(t.profiles[0], "pixel_values");
  EXPECT_EQ(s.min, (std::vector<int64_t>{1, 3, 8, 8}));
  EXPECT_EQ(s.opt, (std::vector<int64_t>{5, 3, 8, 8}));
  EXPECT_EQ(s.max, (std::vector<int64_t>{5, 3, 8, 8}));
  EXPECT_TRUE(t.unresolved.empty());

  t = vle::profile_shapes("vision", inputs, json::object());
  EXPECT_EQ(t.unresolved, (std::vector<std::string>{"tiles"}));
  EXPECT_EQ(shapes_of(t.profiles[0], "pixel_values").min, (std::vector<int64_t>{-1, 3, 8, 8}));
  const json j = vle::profile_table_json(t);
  EXPECT_TRUE(j["profiles"][0]["inputs"]["pixel_values"]["min"][0].is_null());
  EXPECT_EQ(j["dims"]["default"]["tiles"]["why"], "no fact or default for this dim");
}

TEST(TensorrtProfiles, StaticGraphsHaveNoProfile) {
  const vle::ProfileTable t = vle::profile_shapes("vision", {input("x", {1, 3, 8, 8}, {})}, {{"max_tiles", 4}});
  EXPECT_TRUE(t.profiles.empty());
  EXPECT_EQ(vle::profile_table_json(t), (json{{"dynamic_inputs", json::object()}, {"dims", json::object()},
                                               {"profiles", json::array()}, {"unresolved", json::array()}}));
}

TEST(TensorrtProfiles, LlmDecodeAndPrefill) {
  const std::vector<vle::ProfileInput> inputs{input("inputs_embeds", {1, -1, 8}, {"", "S", ""}),
                                              input("past_key.0", {-1, 2, 4}, {"P", "", ""}),
                                              input("output_rows", {-1}, {"R"})};
  const json facts{{"max_context", 256}, {"max_link_queries", 8}, {"max_tiles", 2}, {"patches_per_tile", 4}};
  const vle::ProfileTable t = vle::profile_shapes("llm", inputs, facts);
  ASSERT_EQ(t.profiles.size(), 2u);
  const vle::Profile &decode = t.profiles[0], &prefill = t.profiles[1];
  EXPECT_EQ(decode.name, "decode");
  EXPECT_EQ(prefill.name, "prefill");
  EXPECT_EQ(shapes_of(decode, "inputs_embeds").min, (std::vector<int64_t>{1, 1, 8}));
  EXPECT_EQ(shapes_of(decode, "inputs_embeds").opt, (std::vector<int64_t>{1, 1, 8}));
  EXPECT_EQ(shapes_of(decode, "inputs_embeds").max, (std::vector<int64_t>{1, 9, 8}));
  EXPECT_EQ(shapes_of(prefill, "inputs_embeds").max, (std::vector<int64_t>{1, 256, 8}));
  EXPECT_EQ(shapes_of(prefill, "inputs_embeds").opt, (std::vector<int64_t>{1, 3 * 4 + 64, 8}));
  EXPECT_EQ(shapes_of(decode, "past_key.0").min, (std::vector<int64_t>{0, 2, 4}));
  EXPECT_EQ(shapes_of(decode, "past_key.0").opt, (std::vector<int64_t>{128, 2, 4}));
  EXPECT_EQ(shapes_of(decode, "past_key.0").max, (std::vector<int64_t>{255, 2, 4}));
  EXPECT_EQ(decode.dims.at("R").max, 8);
  EXPECT_EQ(decode.dims.at("R").why, "the rows one step asks for: the super-link step asks its N=8 query rows");
  EXPECT_TRUE(t.unresolved.empty());
  // Without routing facts a decode step may be any length up to the context.
  const vle::ProfileTable bare = vle::profile_shapes("llm", inputs, {{"max_context", 64}});
  EXPECT_EQ(shapes_of(bare.profiles[0], "inputs_embeds").max, (std::vector<int64_t>{1, 64, 8}));
  EXPECT_EQ(shapes_of(bare.profiles[1], "inputs_embeds").opt, (std::vector<int64_t>{1, 64, 8}));
}

TEST(TensorrtProfiles, DefaultsAndDecoderImageRange) {
  vle::ProfileTable t = vle::profile_shapes("region", {input("masks", {-1, 4}, {"regions", ""})}, json::object());
  EXPECT_EQ(t.profiles[0].dims.at("regions").max, vle::kDefaultMaxRegions);
  EXPECT_EQ(t.profiles[0].dims.at("regions").why, "no fact bounds it; default 8");
  // Unnamed dynamic axes are named "<input>:<axis>".
  t = vle::profile_shapes("region", {input("masks", {0, 4}, {})}, json::object());
  EXPECT_EQ(t.unresolved, (std::vector<std::string>{"masks:0"}));

  const json facts{{"image_size", {{"min_side", 64}, {"max_side", 1344}, {"size_divisibility", 32}}},
                   {"det_short_side", 800}, {"det_max_long_side", 1333}, {"max_groups", 16}};
  t = vle::profile_shapes("det", {input("pixel_values", {1, 3, -1, -1}, {"", "", "height", "width"}),
                                  input("text", {-1, 4}, {"groups", ""})},
                          facts);
  const vle::Profile& p = t.profiles[0];
  EXPECT_EQ(shapes_of(p, "pixel_values").opt, (std::vector<int64_t>{1, 3, 800, 1088}));  // 1067 padded to /32
  EXPECT_EQ(shapes_of(p, "pixel_values").min, (std::vector<int64_t>{1, 3, 64, 64}));
  EXPECT_EQ(shapes_of(p, "pixel_values").max, (std::vector<int64_t>{1, 3, 1344, 1344}));
  EXPECT_EQ(p.dims.at("height").why, "image_size 64..1344; opt: a 4:3 image at short side 800, padded to /32");
  EXPECT_EQ(shapes_of(p, "text").max, (std::vector<int64_t>{16, 4}));

  t = vle::profile_shapes("gen_unet", {input("sample", {-1, 4, -1, -1}, {"batch", "", "latent_height", "latent_width"})},
                          {{"guidance_batch", {{"encoder_hidden_states", {"uncond", "cond"}}}}, {"latent_size", 32},
                           {"latent_multiple", 8}});
  EXPECT_EQ(t.profiles[0].dims.at("batch").why, "the guidance batch ['uncond', 'cond']");
  EXPECT_EQ(shapes_of(t.profiles[0], "sample").min, (std::vector<int64_t>{1, 4, 8, 8}));
  EXPECT_EQ(shapes_of(t.profiles[0], "sample").opt, (std::vector<int64_t>{2, 4, 32, 32}));
}

TEST(TensorrtProfiles, FactsComeFromTheManifestWithTheGraphsOwnOnTop) {
  vle::Manifest m;
  m.model.max_context = 256;
  m.clip.max_tiles = 6;
  m.clip.patches_per_tile = 64;
  m.routing["det"].queries = 100;
  m.routing["gen"].queries = 64;
  m.detection.short_side = 800;  // max_long_side 0: no fact
  EXPECT_EQ(vle::artifact_profile_facts(m), (json{{"max_context", 256}, {"max_tiles", 6}, {"patches_per_tile", 64},
                                                  {"max_link_queries", 100}, {"det_short_side", 800}}));
  vle::GraphEntry g;
  g.facts = {{"max_context", 128}, {"max_groups", 16}};
  vle::TensorSpec embeds;
  embeds.name = "inputs_embeds";
  embeds.dims = {1, -1, 8};
  embeds.symbols = {"", "S", ""};
  g.inputs = {embeds};
  const json facts = vle::profile_facts(m, g);
  EXPECT_EQ(facts["max_context"], 128);  // the graph's own fact wins
  EXPECT_EQ(facts["max_groups"], 16);
  EXPECT_EQ(facts["max_tiles"], 6);
  const vle::ProfileTable t = vle::profile_shapes("llm", vle::profile_inputs(g), facts);
  EXPECT_EQ(shapes_of(t.profiles[1], "inputs_embeds").max, (std::vector<int64_t>{1, 128, 8}));
  EXPECT_EQ(shapes_of(t.profiles[0], "inputs_embeds").max, (std::vector<int64_t>{1, 101, 8}));
}

// --- profile strings and precision -------------------------------------------------------------------------

TEST(TensorrtPlan, OneProfileCoversDecodeAndPrefillTunedForDecode) {
  const std::vector<vle::ProfileInput> inputs{input("inputs_embeds", {1, -1, 8}, {"", "S", ""}),
                                              input("past_key.0", {-1, 2, 4}, {"P", "", ""})};
  const vle::ProfileTable t = vle::profile_shapes("llm", inputs, {{"max_context", 256}, {"max_link_queries", 8}});
  const vle::TensorrtProfileStrings s = vle::tensorrt_profile_strings(t);
  EXPECT_EQ(s.min, "inputs_embeds:1x1x8,past_key.0:0x2x4");
  EXPECT_EQ(s.opt, "inputs_embeds:1x1x8,past_key.0:128x2x4");
  EXPECT_EQ(s.max, "inputs_embeds:1x256x8,past_key.0:255x2x4");
  // An unresolved symbol leaves the profiles to ONNX Runtime.
  const vle::ProfileTable open = vle::profile_shapes("llm", inputs, json::object());
  EXPECT_TRUE(vle::tensorrt_profile_strings(open).min.empty());
}

vle::TensorrtMachine machine(int major, int minor = 0) {
  vle::TensorrtMachine m;
  m.major = major;
  m.minor = minor;
  m.gpu_name = "NVIDIA Orin";
  m.sm_major = 8;
  m.sm_minor = 7;
  return m;
}

TEST(TensorrtPlan, VersionNumbersOfBothSchemes) {
  vle::TensorrtMachine m;
  vle::decode_tensorrt_version(100300, &m);  // TensorRT 10.3.0
  EXPECT_EQ(m.version(), "10.3.0");
  vle::decode_tensorrt_version(110102, &m);
  EXPECT_EQ(m.version(), "11.1.2");
  vle::decode_tensorrt_version(8601, &m);    // TensorRT 8.6.1
  EXPECT_EQ(m.version(), "8.6.1");
}

TEST(TensorrtPlan, PrecisionByBuilderFlagOnTensorrt10AndFromTheGraphOn11) {
  vle::TensorrtOptions o;
  o.precision = "fp32";
  o.onnx_sha256 = std::string(64, 'a');
  vle::TensorrtPlan p = vle::plan_tensorrt("llm", o, machine(10, 3), 0, "1.32.0");
  EXPECT_EQ(p.provider_options.count("trt_fp16_enable"), 0u);
  EXPECT_EQ(p.stamp["precision"], "fp32");
  EXPECT_EQ(p.provider_options.at("device_id"), "0");

  o.fp16 = true;
  p = vle::plan_tensorrt("llm", o, machine(10, 3), 1, "1.32.0");
  EXPECT_EQ(p.provider_options.at("trt_fp16_enable"), "1");
  EXPECT_EQ(p.provider_options.at("trt_layer_norm_fp32_fallback"), "1");
  EXPECT_EQ(p.provider_options.at("device_id"), "1");
  EXPECT_EQ(p.stamp["precision"], "fp16");
  EXPECT_EQ(p.stamp["tensorrt_version"], "10.3.0");
  EXPECT_EQ(p.stamp["gpu"], "NVIDIA Orin");
  EXPECT_EQ(p.stamp["sm"], "8.7");

  // TensorRT 11: fp16 must already be in the graph.
  EXPECT_EQ(message_of<vle::InputError>([&] { vle::plan_tensorrt("llm", o, machine(11, 1), 0, "1.32.0"); }),
            "llm: fp16 was asked for, but TensorRT 11.1.0 is strongly typed (no fp16 builder flag) and this graph "
            "is fp32; export the artifact with --precision fp16 instead");
  o.precision = "fp16";
  p = vle::plan_tensorrt("llm", o, machine(11, 1), 0, "1.32.0");
  EXPECT_EQ(p.provider_options.count("trt_fp16_enable"), 0u);
  EXPECT_EQ(p.stamp["precision"], "fp16");

  EXPECT_NE(message_of<vle::BackendUnavailableError>([&] { vle::plan_tensorrt("llm", o, machine(8, 6), 0, "1"); })
                .find("the loaded TensorRT is 8.6.0; the TensorRT backend needs TensorRT 10 or 11"),
            std::string::npos);
}

TEST(TensorrtPlan, CachesGoUnderTheGraphsFolder) {
  vle::TensorrtOptions o;
  o.cache_dir = "/artifact/engines/llm";
  const vle::TensorrtPlan p = vle::plan_tensorrt("llm", o, machine(10), 0, "1.32.0");
  EXPECT_EQ(p.provider_options.at("trt_engine_cache_enable"), "1");
  EXPECT_EQ(p.provider_options.at("trt_engine_cache_path"), "/artifact/engines/llm");
  EXPECT_EQ(p.provider_options.at("trt_timing_cache_path"), "/artifact/engines/llm");
  vle::TensorrtOptions none;
  EXPECT_EQ(vle::plan_tensorrt("llm", none, machine(10), 0, "1.32.0").provider_options.count("trt_engine_cache_enable"),
            0u);
}

// --- the stamped cache -------------------------------------------------------------------------------------

class EngineCache : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("vle-trt-cache-" + std::to_string(getpid()) + "-" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    vle::TensorrtOptions o;
    o.precision = "fp16";
    o.onnx_sha256 = std::string(64, 'b');
    stamp_ = vle::plan_tensorrt("llm", o, machine(10, 3), 0, "1.32.0").stamp;
  }
  void TearDown() override { fs::remove_all(dir_); }

  void write(const std::string& name, const std::string& text) { std::ofstream(dir_ / name) << text; }
  // A folder as a finished build leaves it: a plan, a profile, a timing cache and the stamp.
  void build() {
    ASSERT_FALSE(vle::prepare_engine_cache(dir_, stamp_));
    write("TensorrtExecutionProvider_TRTKernel_graph_0_sm87.engine", "plan bytes");
    write("TensorrtExecutionProvider_TRTKernel_graph_0_sm87.profile", "profile bytes");
    write("TensorrtExecutionProvider_cache_sm87.timing", "timing bytes");
    vle::write_engine_stamp(dir_, stamp_);
  }
  size_t files() const { return static_cast<size_t>(std::distance(fs::directory_iterator(dir_), {})); }

  fs::path dir_;
  json stamp_;
};

TEST_F(EngineCache, AMatchingStampLoads) {
  build();
  EXPECT_TRUE(vle::prepare_engine_cache(dir_, stamp_));
  EXPECT_EQ(files(), 4u);  // kept
}

TEST_F(EngineCache, EachMismatchingFieldRebuilds) {
  for (const std::string field : {"tensorrt_version", "gpu", "sm", "precision", "profiles", "source_onnx_sha256",
                                  "onnxruntime_version"}) {
    build();
    json now = stamp_;
    now[field] = field == "profiles" ? json{{"min", "x:1"}, {"opt", "x:1"}, {"max", "x:2"}} : json("other");
    EXPECT_FALSE(vle::prepare_engine_cache(dir_, now)) << field;
    EXPECT_EQ(files(), 0u) << field << ": the folder is cleared for the rebuild";
  }
}

TEST_F(EngineCache, AFolderTheStampDoesNotDescribeRebuilds) {
  build();
  write("stray.engine", "not stamped");
  EXPECT_FALSE(vle::prepare_engine_cache(dir_, stamp_));
  EXPECT_EQ(files(), 0u);
  build();
  fs::remove(dir_ / "TensorrtExecutionProvider_cache_sm87.timing");
  EXPECT_FALSE(vle::prepare_engine_cache(dir_, stamp_));
  build();
  write(vle::kEngineStampFile, "{not json");
  EXPECT_FALSE(vle::prepare_engine_cache(dir_, stamp_));
}

TEST_F(EngineCache, ACorruptPlanIsRefused) {
  build();
  const fs::path plan = dir_ / "TensorrtExecutionProvider_TRTKernel_graph_0_sm87.engine";
  write(plan.filename().string(), "plan bytes, flipped");
  const std::string msg = message_of<vle::ArtifactError>([&] { vle::prepare_engine_cache(dir_, stamp_); });
  EXPECT_EQ(msg.rfind(plan.string() + ": corrupt TensorRT plan: its sha256 is ", 0), 0u) << msg;
  EXPECT_NE(msg.find("delete the folder to rebuild it"), std::string::npos) << msg;
  EXPECT_TRUE(fs::exists(plan));  // refused, not deleted behind the user's back
}

TEST_F(EngineCache, TheStampIsWrittenWhole) {
  build();
  std::ifstream in(dir_ / vle::kEngineStampFile);
  const json written = json::parse(in);
  EXPECT_EQ(written["plans"].size(), 3u);
  const std::string timing = "TensorrtExecutionProvider_cache_sm87.timing";
  EXPECT_EQ(written["plans"][timing], vle::sha256_hex("timing bytes", 12));
  for (auto it = stamp_.begin(); it != stamp_.end(); ++it) EXPECT_EQ(written[it.key()], it.value()) << it.key();
  // Written through a temporary file renamed over the stamp: nothing else is left, and a temporary a crash
  // left behind is neither a plan nor the stamp.
  EXPECT_EQ(files(), 4u);
  write(std::string(vle::kEngineStampFile) + ".tmp-1", "{half a stamp");
  EXPECT_TRUE(vle::prepare_engine_cache(dir_, stamp_));
}

TEST_F(EngineCache, AFolderThatCannotBeMadeIsNamed) {
  std::ofstream(dir_.string() + ".file") << "a file where a folder should go";
  const fs::path under_a_file = fs::path(dir_.string() + ".file") / "llm";
  const std::string msg =
      message_of<vle::ArtifactError>([&] { vle::prepare_engine_cache(under_a_file, stamp_); });
  EXPECT_EQ(msg.rfind(under_a_file.string() + ": cannot create the TensorRT engine folder (", 0), 0u) << msg;
  EXPECT_NE(msg.find("give a writable one with engine_cache / --engine-cache"), std::string::npos) << msg;
  fs::remove(dir_.string() + ".file");
}

// --- what is missing ---------------------------------------------------------------------------------------

TEST(TensorrtBackend, AnOnnxruntimeWithoutTheProviderIsTheNamedError) {
  const auto have = vle::available_providers();
  if (std::find(have.begin(), have.end(), "TensorrtExecutionProvider") != have.end()) {
    GTEST_SKIP() << "this onnxruntime has the TensorRT provider; the error path needs one without it";
  }
  const std::string msg = message_of<vle::BackendUnavailableError>(
      [&] { vle::make_engine("tensorrt", kData / "elementwise.onnx", "llm", {}); });
  EXPECT_EQ(msg.rfind("llm: the TensorRT backend needs ONNX Runtime's TensorrtExecutionProvider, and ", 0), 0u)
      << msg;
  EXPECT_NE(msg.find("'CPUExecutionProvider'"), std::string::npos) << msg;
}

TEST(TensorrtBackend, MissingLibrariesAreNamed) {
  std::string msg = message_of<vle::BackendUnavailableError>(
      [] { vle::probe_tensorrt_machine(0, {"libnvinfer-missing.so.10", "libnvinfer-missing.so"}); });
  EXPECT_EQ(msg.rfind("the TensorRT backend needs TensorRT's libnvinfer, and none of libnvinfer-missing.so.10, "
                      "libnvinfer-missing.so opens",
                      0),
            0u)
      << msg;
}

}  // namespace
