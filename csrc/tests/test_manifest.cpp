// The manifest parser: a small valid artifact (a few bytes per file; the parser never opens ONNX) built in a
// temporary folder, then corrupted one fault at a time. Each fault must be refused with an ArtifactError
// whose message starts with the manifest file and names the key path.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "artifact/contract.h"
#include "artifact/files.h"
#include "artifact/json_text.h"
#include "text/utf8.h"
#include "artifact/manifest.h"
#include "visionllm_edge/errors.h"

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

namespace {

constexpr int64_t kLayers = 2;
constexpr int64_t kVocab = 32026;

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

Json file_entry(const fs::path& root, const std::string& file) {
  return Json{{"file", file}, {"sha256", vle::file_sha256(root / file)}};
}

Json io(const std::vector<std::string>& templates, const std::string& symbol) {
  Json out = Json::array();
  for (const std::string& t : templates) {
    const int64_t n = t.find("{i}") == std::string::npos ? 1 : kLayers;
    for (int64_t i = 0; i < n; ++i) {
      const std::string name = vle::contract::layer_name(t, i);
      const bool ints = name.find("position") != std::string::npos || name.find("rows") != std::string::npos;
      out.push_back(Json{
          {"name", name}, {"dtype", ints ? "int64" : "float32"}, {"shape", Json::array({symbol, 4, 8})}});
    }
  }
  return out;
}

// Writes dummy files into `root` and returns a valid manifest for them (every graph, every routing kind).
Json make_artifact(const fs::path& root) {
  namespace c = vle::contract;
  fs::create_directories(root);
  Json graphs = Json::object();
  int i = 0;
  for (const std::string& name : c::graph_names()) {
    const c::GraphNames& names = c::graphs().at(name);
    std::string bytes;
    for (int k = 0; k <= i; ++k) bytes += "dummy onnx " + name;
    ++i;
    write_file(root / names.file, bytes);
    Json external = Json::array();
    if (name == c::graph::kLlm) {
      write_file(root / "llm.onnx.data", std::string(64, '\0'));
      external.push_back("llm.onnx.data");
    }
    Json entry = file_entry(root, names.file);
    entry["size_bytes"] = bytes.size();
    entry["external_data"] = external;
    entry["inputs"] = io(names.inputs, "S");
    entry["outputs"] = io(names.outputs, "R");
    entry["opset"] = 17;
    entry["precision"] = "fp32";
    entry["facts"] = Json{{"buckets", {1, 2}}, {"nested", {{"anything", nullptr}}}};
    graphs[name] = entry;
  }
  write_file(root / c::kEmbeddingsFile, "embeddings");
  write_file(root / c::kTokenizerFile, "{\"model\": {}}");
  write_file(root / c::kSentencePieceFile, "sentencepiece model");
  write_file(root / "gen_uncond.safetensors", "uncond");

  Json tokens = Json::object();
  for (size_t t = 0; t < c::added_tokens().size(); ++t) tokens[c::added_tokens()[t]] = 32000 + t;
  tokens["<s>"] = 1;
  tokens["</s>"] = 2;
  tokens["<unk>"] = 0;
  Json routing = Json::object();
  for (const auto& [token, kind] : c::routing_tokens()) {
    routing[kind] = Json{{"token", token},
                         {"id", tokens[token]},
                         {"decoder", c::decoder_of(kind)},
                         {"queries", c::is_generation_kind(kind) ? 64 : 4},
                         {"table", c::query_table_of(kind)}};
  }
  Json grids = Json::array();
  for (auto [cols, rows] :
       std::vector<std::pair<int, int>>{{1, 1}, {1, 2}, {2, 1}, {1, 3}, {3, 1}, {1, 4}, {2, 2}, {4, 1}}) {
    grids.push_back({cols, rows});
  }
  Json tokenizer = file_entry(root, c::kTokenizerFile);
  tokenizer["legacy"] = false;
  tokenizer["add_prefix_space"] = false;
  tokenizer["sentencepiece"] = file_entry(root, c::kSentencePieceFile);
  Json embeddings = file_entry(root, c::kEmbeddingsFile);
  embeddings["token_table"] = "tok_embeddings";
  embeddings["query_tables"] =
      Json{{"det", "emb_det"}, {"pose", "emb_pose"}, {"gen", "emb_gen"}, {"edit", "emb_edit"}};
  return Json{
      {"schema_version", c::kManifestSchemaVersion},
      {"producer", {{"name", "visionllm-edge"}, {"version", "9.9.9"}}},
      {"model",
       {{"name", "tiny-random"},
        {"hidden_size", 64},
        {"num_layers", kLayers},
        {"num_heads", 4},
        {"num_kv_heads", 2},
        {"head_dim", 16},
        {"vocab_size", kVocab},
        {"max_context", 512},
        {"rope_theta", 10000.0},
        {"rms_norm_eps", 1e-5}}},
      {"graphs", graphs},
      {"tokens", tokens},
      {"routing", routing},
      {"embeddings", embeddings},
      {"tokenizer", tokenizer},
      {"preprocess",
       {{"clip",
         {{"tile_size", 336},
          {"max_tiles", 4},
          {"patches_per_tile", 576},
          {"mean", {0.48145466, 0.4578275, 0.40821073}},
          {"std", {0.26862954, 0.26130258, 0.27577711}},
          {"resample", "bicubic"},
          {"candidate_grids", grids}}},
        {"detection",
         {{"short_side", 800},
          {"max_long_side", 1333},
          {"size_divisibility", 32},
          {"mean", {0.485, 0.456, 0.406}},
          {"std", {0.229, 0.224, 0.225}},
          {"resample", "bilinear"}}},
        {"diffusion", {{"gen_image_size", 512}, {"edit_image_size", 256}}}}},
      {"postprocess",
       {{"det_top_k", 100},
        {"det_score_threshold", 0.3},
        {"nms_iou", 0.7},
        {"mask_threshold", 0.5},
        {"seg_score_threshold", 0.3},
        {"pose_top_k", 20},
        {"pose_score_threshold", 0.2}}},
      {"generation",
       {{"max_new_tokens", 64},
        {"bos_id", 1},
        {"eos_id", 2},
        {"diffusion_steps", 50},
        {"guidance_scale", 7.5},
        {"image_guidance_scale", 1.5}}},
      {"chat_template",
       {{"system", c::kSystemPrompt},
        {"roles", {c::kUserRole, c::kAssistantRole}},
        {"sep", c::kSep},
        {"sep2", c::kSep2},
        {"image_token", c::kImageToken},
        {"input_markers", c::input_markers()}}},
      {"extra_files", {{"gen_uncond", file_entry(root, "gen_uncond.safetensors")}}},
  };
}

class ManifestTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::temp_directory_path() / "vle-manifest-XXXXXX").string();
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    tmp_ = pattern;
    root_ = tmp_ / "artifact";
    data_ = make_artifact(root_);
  }
  void TearDown() override { fs::remove_all(tmp_); }

  void write(const Json& data) const { write_file(root_ / "manifest.json", data.dump(2)); }
  std::string source() const { return (root_ / "manifest.json").string(); }

  // The message load_manifest gives for `data` on disk; "" when it loads.
  std::string refusal(const Json& data, bool verify_hashes = true) const {
    write(data);
    try {
      vle::load_manifest(root_, verify_hashes);
    } catch (const vle::ArtifactError& e) {
      return e.what();
    }
    return "";
  }

  fs::path tmp_, root_;
  Json data_;
};

TEST_F(ManifestTest, ValidManifestLoadsIntoTheTypedForm) {
  write(data_);
  const vle::Manifest m = vle::load_manifest(root_);
  EXPECT_EQ(m.schema_version, vle::contract::kManifestSchemaVersion);
  EXPECT_EQ(m.artifact_dir, fs::canonical(root_));
  EXPECT_EQ(m.producer_version, "9.9.9");
  EXPECT_EQ(m.model.num_layers, kLayers);
  EXPECT_DOUBLE_EQ(m.model.rms_norm_eps, 1e-5);
  EXPECT_EQ(m.graphs.size(), vle::contract::graphs().size());
  const vle::GraphEntry& llm = m.graph("llm");
  EXPECT_EQ(llm.path, fs::canonical(root_ / "llm.onnx"));
  EXPECT_EQ(llm.sha256, vle::file_sha256(root_ / "llm.onnx"));
  ASSERT_EQ(llm.external_data.size(), 1u);
  EXPECT_EQ(llm.external_data[0], fs::canonical(root_ / "llm.onnx.data"));
  ASSERT_NE(llm.input("past_value.1"), nullptr);
  EXPECT_EQ(llm.input("past_value.1")->dims, (std::vector<int64_t>{-1, 4, 8}));
  EXPECT_EQ(llm.input("past_value.1")->symbols[0], "S");
  EXPECT_EQ(llm.input("position_ids")->dtype, vle::DType::kInt64);
  EXPECT_EQ(llm.input("nope"), nullptr);
  EXPECT_NE(llm.output("present_key.0"), nullptr);
  EXPECT_EQ(llm.facts["buckets"], nlohmann::json({1, 2}));
  EXPECT_EQ(m.token_id("[GEN]"), 32016);
  EXPECT_EQ(m.routing.at("seg").decoder, "object");
  EXPECT_EQ(m.routing.at("seg").table, "det");
  EXPECT_EQ(m.routing.at("gen").queries, 64);
  EXPECT_EQ(m.embeddings.query_tables.at("pose"), "emb_pose");
  ASSERT_TRUE(m.tokenizer.sentencepiece.has_value());
  EXPECT_EQ(m.tokenizer.sentencepiece->path, fs::canonical(root_ / "tokenizer.model"));
  EXPECT_EQ(m.clip.candidate_grids.size(), 8u);
  EXPECT_EQ(m.clip.candidate_grids[6], std::make_pair(int64_t{2}, int64_t{2}));
  EXPECT_FLOAT_EQ(m.detection.std[0], 0.229f);
  ASSERT_TRUE(m.postprocess.nms_iou.has_value());
  EXPECT_DOUBLE_EQ(*m.postprocess.nms_iou, 0.7);
  EXPECT_EQ(m.generation.eos_id, 2);
  EXPECT_EQ(m.chat_template.roles[1], "ASSISTANT");
  EXPECT_EQ(m.chat_template.input_markers, vle::contract::input_markers());
  EXPECT_EQ(m.extra_files.at("gen_uncond").path, fs::canonical(root_ / "gen_uncond.safetensors"));
  EXPECT_EQ(m.data["model"]["name"], "tiny-random");
  // The manifest file itself may be named, and the unordered document gives the same manifest.
  EXPECT_EQ(vle::load_manifest(root_ / "manifest.json").graphs.size(), m.graphs.size());
  EXPECT_EQ(vle::parse_manifest(nlohmann::json(data_), root_, "built").tokens, m.tokens);
  try {
    m.token_id("[NOPE]");
    FAIL() << "no error";
  } catch (const vle::ArtifactError& e) {
    EXPECT_NE(std::string(e.what()).find("'[NOPE]' is not in the manifest's token table"), std::string::npos);
  }
}

TEST_F(ManifestTest, ASubsetOfGraphsAndRoutesIsValid) {
  Json data = data_;
  data["graphs"] = Json{{"llm", data_["graphs"]["llm"]}, {"vision", data_["graphs"]["vision"]}};
  data["routing"] = Json{{"det", data_["routing"]["det"]}};
  data["extra_files"] = Json::object();
  data["postprocess"]["nms_iou"] = nullptr;
  data["generation"]["guidance_scale"] = 7;  // an integral number is a number
  write(data);
  const vle::Manifest m = vle::load_manifest(root_);
  EXPECT_TRUE(m.has_graph("vision"));
  EXPECT_FALSE(m.has_graph("det"));
  EXPECT_FALSE(m.postprocess.nms_iou.has_value());
  EXPECT_DOUBLE_EQ(m.generation.guidance_scale, 7.0);
  try {
    m.graph("det");
    FAIL() << "no error";
  } catch (const vle::ArtifactError& e) {
    EXPECT_NE(std::string(e.what()).find("this artifact has no 'det' graph (it holds: llm, vision)"), std::string::npos)
        << e.what();
  }
}

struct Variant {
  const char* id;
  std::function<void(const fs::path& root, Json& data)> mutate;
  std::string message;  // what follows "<root>/manifest.json: "
};

TEST_F(ManifestTest, CorruptedManifestsAreRefusedWithTheKeyPath) {
  const std::vector<Variant> variants = {
      {"unknown-top-level-key", [](auto&, Json& d) { d["colour"] = "red"; }, "colour: unknown key"},
      {"unknown-nested-key", [](auto&, Json& d) { d["graphs"]["llm"]["inputs"][0]["layout"] = "NCHW"; },
       "graphs.llm.inputs[0].layout: unknown key (allowed here: dtype, name, shape)"},
      {"missing-nested", [](auto&, Json& d) { d["tokenizer"].erase("legacy"); },
       "tokenizer.legacy: missing required key"},
      {"missing-sentencepiece", [](auto&, Json& d) { d["tokenizer"].erase("sentencepiece"); },
       "tokenizer.sentencepiece: missing required key"},
      {"missing-token", [](auto&, Json& d) { d["tokens"].erase("<unk>"); },
       "tokens[\"<unk>\"]: missing required key"},
      {"bool-is-not-int", [](auto&, Json& d) { d["model"]["num_layers"] = true; },
       "model.num_layers: expected an integer, got true (a boolean)"},
      {"float-for-int", [](auto&, Json& d) { d["graphs"]["det"]["opset"] = 17.5; },
       "graphs.det.opset: expected an integer, got 17.5 (a number)"},
      {"integral-float-for-int", [](auto&, Json& d) { d["model"]["hidden_size"] = 64.0; },
       "model.hidden_size: expected an integer, got 64.0 (a number)"},
      {"string-for-int", [](auto&, Json& d) { d["model"]["hidden_size"] = "64"; },
       "model.hidden_size: expected an integer, got \"64\" (a string)"},
      {"int-for-bool", [](auto&, Json& d) { d["tokenizer"]["add_prefix_space"] = 0; },
       "tokenizer.add_prefix_space: expected a boolean, got 0 (an integer)"},
      {"unknown-graph", [](auto&, Json& d) { d["graphs"]["vae"] = Json::object(); },
       "graphs.vae: unknown graph 'vae'; contract.GRAPHS has: vision, region, llm, det, pose, gen_mapper"},
      {"bad-dtype", [](auto&, Json& d) { d["graphs"]["vision"]["inputs"][0]["dtype"] = "uint8"; },
       "graphs.vision.inputs[0].dtype: must be one of float32, float16, int64, bool, int32; got 'uint8'"},
      {"bad-dim", [](auto&, Json& d) { d["graphs"]["vision"]["inputs"][0]["shape"][1] = -1; },
       "graphs.vision.inputs[0].shape[1]: must be >= 0, got -1"},
      {"float-dim", [](auto&, Json& d) { d["graphs"]["vision"]["inputs"][0]["shape"][1] = 1.5; },
       "graphs.vision.inputs[0].shape[1]: expected an integer or a symbol (string) as a dimension, got 1.5"},
      {"llm-input-missing-layer",
       [](auto&, Json& d) {
         Json& inputs = d["graphs"]["llm"]["inputs"];
         for (size_t i = 0; i < inputs.size(); ++i) {
           if (inputs[i]["name"] == "past_value.1") inputs.erase(i);
         }
       },
       "graphs.llm.inputs: input names differ from contract.GRAPHS['llm']: missing ['past_value.1']"},
      {"det-output-renamed",
       [](auto&, Json& d) { d["graphs"]["det"]["outputs"][2]["name"] = "pred_masks_all"; },
       "graphs.det.outputs: output names differ from contract.GRAPHS['det']: missing ['pred_masks']; "
       "unexpected "
       "['pred_masks_all']"},
      {"duplicate-io-name", [](auto&, Json& d) { d["graphs"]["region"]["inputs"][1]["name"] = "image"; },
       "graphs.region.inputs[1].name: duplicate input name 'image'"},
      {"graph-file-missing", [](const fs::path& r, Json&) { fs::remove(r / "det.onnx"); },
       "graphs.det.file: 'det.onnx': file not found"},
      {"external-data-missing", [](const fs::path& r, Json&) { fs::remove(r / "llm.onnx.data"); },
       "graphs.llm.external_data[0]: 'llm.onnx.data': file not found"},
      {"graph-file-is-a-folder",
       [](const fs::path& r, Json& d) {
         fs::create_directory(r / "sub");
         d["graphs"]["llm"]["external_data"][0] = "sub";
       },
       "graphs.llm.external_data[0]: 'sub' is not a regular file"},
      {"sha256-mismatch",
       [](const fs::path& r, Json&) {
         write_file(r / "llm.onnx", std::string(fs::file_size(r / "llm.onnx"), 'X'));
       },
       "graphs.llm.sha256: llm.onnx: sha256 mismatch: the manifest says "},
      {"sentencepiece-sha256-mismatch",
       [](const fs::path& r, Json&) { write_file(r / "tokenizer.model", std::string(19, 'Z')); },
       "tokenizer.sentencepiece.sha256: tokenizer.model: sha256 mismatch"},
      {"size-mismatch", [](const fs::path& r, Json&) { write_file(r / "vision.onnx", "shorter"); },
       "graphs.vision.size_bytes: vision.onnx is 7 bytes, the manifest says 17 (truncated or replaced file)"},
      {"sha256-not-hex", [](auto&, Json& d) { d["embeddings"]["sha256"] = "ABC"; },
       "embeddings.sha256: expected 64 lower-case hex digits, got \"ABC\" (a string)"},
      {"absolute-path", [](auto&, Json& d) { d["graphs"]["vision"]["file"] = "/etc/passwd"; },
       "graphs.vision.file: '/etc/passwd' is not a relative '/'-separated path inside the artifact folder"},
      {"dotdot-path", [](auto&, Json& d) { d["tokenizer"]["file"] = "../tokenizer.json"; },
       "tokenizer.file: '../tokenizer.json' leaves the artifact folder ('..')"},
      {"dotdot-inside",
       [](auto&, Json& d) { d["graphs"]["llm"]["external_data"][0] = "sub/../../llm.onnx.data"; },
       "graphs.llm.external_data[0]: 'sub/../../llm.onnx.data' leaves the artifact folder ('..')"},
      {"drive-path", [](auto&, Json& d) { d["extra_files"]["gen_uncond"]["file"] = "C:u.safetensors"; },
       "extra_files.gen_uncond.file: 'C:u.safetensors' is not a relative '/'-separated path"},
      {"backslash-path", [](auto&, Json& d) { d["embeddings"]["file"] = "sub\\embeddings.safetensors"; },
       "embeddings.file: 'sub\\\\embeddings.safetensors' is not a relative '/'-separated path"},
      {"empty-path", [](auto&, Json& d) { d["embeddings"]["file"] = ""; },
       "embeddings.file: must not be empty"},
      {"symlink-outside",
       [](const fs::path& r, Json& d) {
         write_file(r.parent_path() / "elsewhere.safetensors", "embeddings");
         fs::create_symlink(r.parent_path() / "elsewhere.safetensors", r / "linked.safetensors");
         d["embeddings"]["file"] = "linked.safetensors";
       },
       "embeddings.file: 'linked.safetensors' resolves outside the artifact folder (to "},
      {"symlink-dir-outside",
       [](const fs::path& r, Json& d) {
         fs::create_directory(r.parent_path() / "out");
         write_file(r.parent_path() / "out" / "u.safetensors", "uncond");
         fs::create_directory_symlink(r.parent_path() / "out", r / "linked");
         d["extra_files"]["gen_uncond"]["file"] = "linked/u.safetensors";
       },
       "extra_files.gen_uncond.file: 'linked/u.safetensors' resolves outside the artifact folder"},
      {"dangling-symlink-outside",
       [](const fs::path& r, Json& d) {
         fs::create_symlink(r.parent_path() / "missing.model", r / "dangling.model");
         d["tokenizer"]["sentencepiece"]["file"] = "dangling.model";
       },
       "tokenizer.sentencepiece.file: 'dangling.model' resolves outside the artifact folder"},
      {"newer-schema",
       [](auto&, Json& d) {
         d["schema_version"] = 3;
         d["brand_new_section"] = Json::object();
       },
       "schema_version: the artifact was written by a newer visionllm-edge 9.9.9 (schema_version 3); this "
       "visionllm-edge 0.1.0 reads schema_version 2: upgrade visionllm-edge"},
      {"version-1", [](auto&, Json& d) { d["schema_version"] = 1; },
       "schema_version: schema_version 1 is older than this visionllm-edge 0.1.0 reads (schema_version 2): "
       "re-export "
       "the artifact with this version"},
      {"routing-id-mismatch", [](auto&, Json& d) { d["routing"]["det"]["id"] = 32013; },
       "routing.det.id: 32013 is not the id of '[DET]' in tokens (32012)"},
      {"duplicate-token-id", [](auto&, Json& d) { d["tokens"]["[GRD]"] = d["tokens"]["[DET]"]; },
       "tokens[\"[GRD]\"]: id 32012 is also the id of '[DET]'; special-token ids must be unique"},
      {"token-id-beyond-vocab", [](auto&, Json& d) { d["tokens"]["[EMB8]"] = kVocab; },
       "tokens[\"[EMB8]\"]: id 32026 is not below model.vocab_size 32026"},
      {"routing-wrong-token", [](auto&, Json& d) { d["routing"]["seg"]["token"] = "[DET]"; },
       "routing.seg.token: kind 'seg' is routed by '[SEG]', got '[DET]'"},
      {"routing-wrong-decoder", [](auto&, Json& d) { d["routing"]["grd"]["decoder"] = "pose"; },
       "routing.grd.decoder: kind 'grd' goes to the 'object' decoder, got 'pose'"},
      {"routing-unknown-decoder", [](auto&, Json& d) { d["routing"]["grd"]["decoder"] = "mask"; },
       "routing.grd.decoder: must be one of object, pose, gen, edit; got 'mask'"},
      {"routing-wrong-table", [](auto&, Json& d) { d["routing"]["seg"]["table"] = "pose"; },
       "routing.seg.table: kind 'seg' reads query table 'det', got 'pose'"},
      {"routing-unknown-kind", [](auto&, Json& d) { d["routing"]["caption"] = Json::object(); },
       "routing.caption: unknown routing kind 'caption'; known: det, grd, seg, pose, gen, edit"},
      {"routing-shared-table-queries", [](auto&, Json& d) { d["routing"]["grd"]["queries"] = 5; },
       "routing.grd.queries: 5 differs from routing.det.queries 4, which reads the same query table 'det'"},
      {"routing-too-many-perception-queries",
       [](auto&, Json& d) {
         for (const char* k : {"det", "grd", "seg"}) d["routing"][k]["queries"] = 9;
       },
       "routing.det.queries: 9 exceeds the 8 placeholder tokens a perception group can use"},
      {"eos-mismatch", [](auto&, Json& d) { d["generation"]["eos_id"] = 3; },
       "generation.eos_id: 3 is not the id of '</s>' in tokens (2)"},
      {"max-new-tokens-beyond-context", [](auto&, Json& d) { d["generation"]["max_new_tokens"] = 513; },
       "generation.max_new_tokens: 513 exceeds model.max_context 512"},
      {"mean-two-values", [](auto&, Json& d) { d["preprocess"]["detection"]["mean"] = {0.5, 0.5}; },
       "preprocess.detection.mean: expected 3 items, got 2"},
      {"std-zero", [](auto&, Json& d) { d["preprocess"]["clip"]["std"][1] = 0.0; },
       "preprocess.clip.std[1]: must be > 0, got 0.0"},
      {"wrong-resample", [](auto&, Json& d) { d["preprocess"]["clip"]["resample"] = "bilinear"; },
       "preprocess.clip.resample: must be one of bicubic; got 'bilinear'"},
      {"grid-beyond-max-tiles",
       [](auto&, Json& d) { d["preprocess"]["clip"]["candidate_grids"][0] = {3, 2}; },
       "preprocess.clip.candidate_grids[0]: grid 3x2 has more tiles than max_tiles 4"},
      {"grid-overflowing",
       [](auto&, Json& d) {
         d["preprocess"]["clip"]["candidate_grids"][0] = {int64_t{1} << 40, int64_t{1} << 40};
       },
       "preprocess.clip.candidate_grids[0][0]: must be <= 64 (docs/limits.md), got 1099511627776"},
      // Every size the manifest sets has a cap (artifact/limits.h): a context that passes as a positive
      // integer once made the KV arena's byte count wrap, and the arena too small for the rows written.
      {"context-over-cap", [](auto&, Json& d) { d["model"]["max_context"] = int64_t{1} << 40; },
       "model.max_context: must be <= 1048576 (docs/limits.md), got 1099511627776"},
      {"layers-over-cap", [](auto&, Json& d) { d["model"]["num_layers"] = 5000; },
       "model.num_layers: must be <= 1024 (docs/limits.md), got 5000"},
      {"head-dim-over-cap", [](auto&, Json& d) { d["model"]["head_dim"] = int64_t{1} << 32; },
       "model.head_dim: must be <= 1024 (docs/limits.md), got 4294967296"},
      {"vocab-over-cap", [](auto&, Json& d) { d["model"]["vocab_size"] = int64_t{1} << 30; },
       "model.vocab_size: must be <= 16777216 (docs/limits.md), got 1073741824"},
      {"queries-over-cap", [](auto&, Json& d) { d["routing"]["gen"]["queries"] = 100000; },
       "routing.gen.queries: must be <= 4096 (docs/limits.md), got 100000"},
      {"tile-size-over-cap", [](auto&, Json& d) { d["preprocess"]["clip"]["tile_size"] = 1 << 20; },
       "preprocess.clip.tile_size: must be <= 4096 (docs/limits.md), got 1048576"},
      {"steps-over-cap", [](auto&, Json& d) { d["generation"]["diffusion_steps"] = 1000000; },
       "generation.diffusion_steps: must be <= 1000 (docs/limits.md), got 1000000"},
      {"top-k-over-cap", [](auto&, Json& d) { d["postprocess"]["det_top_k"] = int64_t{1} << 40; },
       "postprocess.det_top_k: must be <= 10000 (docs/limits.md), got 1099511627776"},
      {"grid-twice", [](auto&, Json& d) { d["preprocess"]["clip"]["candidate_grids"][1] = {1, 1}; },
       "preprocess.clip.candidate_grids[1]: grid 1x1 is listed twice"},
      {"no-grids", [](auto&, Json& d) { d["preprocess"]["clip"]["candidate_grids"] = Json::array(); },
       "preprocess.clip.candidate_grids: expected at least 1 item(s), got 0"},
      {"long-side-below-short", [](auto&, Json& d) { d["preprocess"]["detection"]["max_long_side"] = 600; },
       "preprocess.detection.max_long_side: 600 is below short_side 800"},
      {"diffusion-size-not-multiple-of-8",
       [](auto&, Json& d) { d["preprocess"]["diffusion"]["gen_image_size"] = 500; },
       "preprocess.diffusion.gen_image_size: 500 is not a multiple of 8 (the VAE's scale)"},
      {"threshold-above-one", [](auto&, Json& d) { d["postprocess"]["mask_threshold"] = 1.5; },
       "postprocess.mask_threshold: must be <= 1.0, got 1.5"},
      {"nms-iou-zero", [](auto&, Json& d) { d["postprocess"]["nms_iou"] = 0; },
       "postprocess.nms_iou: must be > 0, got 0.0"},
      {"negative-guidance", [](auto&, Json& d) { d["generation"]["guidance_scale"] = -1e-05; },
       "generation.guidance_scale: must be >= 0.0, got -1e-05"},
      {"image-token-unknown", [](auto&, Json& d) { d["chat_template"]["image_token"] = "<picture>"; },
       "chat_template.image_token: '<picture>' is not a token of the tokens table"},
      {"marker-twice", [](auto&, Json& d) { d["chat_template"]["input_markers"][1] = "<image>"; },
       "chat_template.input_markers[1]: '<image>' is listed twice"},
      {"image-token-not-a-marker", [](auto&, Json& d) { d["chat_template"]["input_markers"] = {"<region>"}; },
       "chat_template.input_markers: must include image_token '<image>'"},
      {"roles-three", [](auto&, Json& d) { d["chat_template"]["roles"] = {"USER", "ASSISTANT", "SYSTEM"}; },
       "chat_template.roles: expected 2 items, got 3"},
      {"kv-heads-do-not-divide", [](auto&, Json& d) { d["model"]["num_kv_heads"] = 3; },
       "model.num_kv_heads: 3 does not divide num_heads 4"},
      {"foreign-producer", [](auto&, Json& d) { d["producer"]["name"] = "other-tool"; },
       "producer.name: must be one of visionllm-edge; got 'other-tool'"},
      {"facts-not-object", [](auto&, Json& d) { d["graphs"]["pose"]["facts"] = Json::array(); },
       "graphs.pose.facts: expected an object, got an array"},
      {"bad-logical-name",
       [](auto&, Json& d) { d["extra_files"]["gen uncond"] = d["extra_files"]["gen_uncond"]; },
       "extra_files[\"gen uncond\"]: logical name 'gen uncond' must match [A-Za-z0-9_.-]+"},
      {"long-string-value", [](auto&, Json& d) { d["model"]["num_heads"] = std::string(60, 'x'); },
       "model.num_heads: expected an integer, got \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... (a string)"},
      {"empty-object", [](auto&, Json& d) { d = Json::object(); }, "schema_version: missing required key"},
      {"array-document", [](auto&, Json& d) { d = Json::array({1, 2}); },
       "the manifest must be a JSON object, got an array"},
  };
  for (const Variant& v : variants) {
    SCOPED_TRACE(v.id);
    fs::remove_all(root_);
    Json data = make_artifact(root_);
    v.mutate(root_, data);
    const std::string message = refusal(data);
    ASSERT_FALSE(message.empty()) << v.id << " was accepted";
    EXPECT_EQ(message.rfind(source() + ": ", 0), 0u) << message;
    EXPECT_NE(message.find(source() + ": " + v.message), std::string::npos) << message;
  }
  EXPECT_GE(variants.size(), 60u);
}

TEST_F(ManifestTest, HashesAreSkippedOnlyWhenAsked) {
  write_file(root_ / "llm.onnx", std::string(fs::file_size(root_ / "llm.onnx"), 'X'));
  EXPECT_NE(refusal(data_).find("graphs.llm.sha256: llm.onnx: sha256 mismatch"), std::string::npos);
  EXPECT_EQ(refusal(data_, /*verify_hashes=*/false), "");
  // The size is checked even without hashing.
  write_file(root_ / "llm.onnx", "short");
  EXPECT_NE(refusal(data_, false).find("graphs.llm.size_bytes: llm.onnx is 5 bytes"), std::string::npos);
}

TEST_F(ManifestTest, UnreadableJsonNamesTheFileAndThePlace) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\n  \"schema_version\": 1,\n  \"producer\": {,}\n}", "invalid JSON at line 3, column 16: "},
      {"{\"schema_version\": 1, \"schema_version\": 1}",
       "invalid JSON: key 'schema_version' appears twice in one object"},
      {"{\"graphs\": {\"llm\": {\"inputs\": [{\"name\": 1}, {\"name\": 2, \"name\": 3}]}}}",
       "graphs.llm.inputs[1]: invalid JSON: key 'name' appears twice in one object"},
      {"{\"a\": [[1, {\"x\": 1}], {\"k\": 1, \"k\": 2}]}", "a[1]: invalid JSON: key 'k' appears twice"},
      {"{\"schema_version\": NaN}", "invalid JSON at line 1, column 20: NaN is not a JSON number"},
      {"{\"schema_version\": -Infinity}", "-Infinity is not a JSON number"},
      {"{\"schema_version\": Infinity}", "Infinity is not a JSON number"},
      {"{\"schema_version\": 1e400}", "invalid JSON: number overflow parsing '1e400'"},
      {"", "invalid JSON at line 1, column 1: "},
      {"{\"schema_version\": \"1\"}", "schema_version: expected an integer, got \"1\" (a string)"},
  };
  for (const auto& [text, message] : cases) {
    SCOPED_TRACE(text);
    write_file(root_ / "manifest.json", text);
    try {
      vle::load_manifest(root_);
      FAIL() << "accepted";
    } catch (const vle::ArtifactError& e) {
      const std::string what = e.what();
      EXPECT_EQ(what.rfind(source() + ": ", 0), 0u) << what;
      EXPECT_NE(what.find(message), std::string::npos) << what;
    }
  }
}

TEST_F(ManifestTest, MissingManifestOrFolder) {
  try {
    vle::load_manifest(root_);
    FAIL() << "accepted";
  } catch (const vle::ArtifactError& e) {
    EXPECT_NE(std::string(e.what()).find("manifest.json: not found; is "), std::string::npos) << e.what();
  }
  try {
    vle::load_manifest(tmp_ / "nowhere");
    FAIL() << "accepted";
  } catch (const vle::ArtifactError& e) {
    EXPECT_NE(
        std::string(e.what()).find("the artifact folder " + (tmp_ / "nowhere").string() + " does not exist"),
        std::string::npos)
        << e.what();
  }
}

TEST(ArtifactFiles, Sha256OfKnownInputs) {
  EXPECT_EQ(vle::sha256_hex("abc", 3), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(vle::sha256_hex("", 0), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  // More than one 1 MiB chunk: the file's digest equals the buffer's.
  const fs::path file = fs::temp_directory_path() / ("vle-sha-" + std::to_string(::getpid()));
  std::string big((size_t{1} << 20) * 2 + 17, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 31 % 251);
  write_file(file, big);
  EXPECT_EQ(vle::file_sha256(file), vle::sha256_hex(big.data(), big.size()));
  fs::remove(file);
  EXPECT_TRUE(vle::is_sha256_hex(std::string(64, 'a')));
  EXPECT_FALSE(vle::is_sha256_hex(std::string(64, 'A')));
  EXPECT_FALSE(vle::is_sha256_hex(std::string(63, 'a')));
  EXPECT_THROW(vle::file_sha256("/nonexistent/vle"), vle::ArtifactError);
}

TEST(ArtifactText, NumbersPrintAsPythonPrintsThem) {
  const std::vector<std::pair<double, std::string>> cases = {
      {17.5, "17.5"},        {64.0, "64.0"},
      {0.0, "0.0"},          {-0.0, "-0.0"},
      {1e-05, "1e-05"},      {0.0001, "0.0001"},
      {1e16, "1e+16"},       {1e15, "1000000000000000.0"},
      {0.1, "0.1"},          {123456.789, "123456.789"},
      {1.5e300, "1.5e+300"}, {-2.5e-7, "-2.5e-07"},
      {0.3, "0.3"},          {10000.0, "10000.0"}};
  for (const auto& [value, text] : cases) EXPECT_EQ(vle::number_text(value), text);
  EXPECT_EQ(vle::utf8::python_repr("it's"), "\"it's\"");
  EXPECT_EQ(vle::utf8::python_repr("a\\b\n"), "'a\\\\b\\n'");
  EXPECT_EQ(vle::key_child("", "a"), "a");
  EXPECT_EQ(vle::key_child("tokens", "<s>"), "tokens[\"<s>\"]");
  EXPECT_EQ(vle::key_child("x", size_t{3}), "x[3]");
  EXPECT_EQ(vle::describe(Json("\xc3\xa9")), "\"\\u00e9\" (a string)");
  EXPECT_EQ(vle::short_list({"a", "b", "c", "d", "e", "f", "g", "h"}),
            "['a', 'b', 'c', 'd', 'e', 'f', ... 2 more]");
}

TEST(ArtifactContract, NamesTheParserChecksAgainst) {
  namespace c = vle::contract;
  for (const std::string& dtype : c::dtypes()) EXPECT_EQ(vle::dtype_name(vle::parse_dtype(dtype)), dtype);
  EXPECT_EQ(c::required_tokens().size(), 29u);
  EXPECT_EQ(c::graph_names().size(), c::graphs().size());
  for (const std::string& name : c::graph_names()) EXPECT_EQ(c::graphs().count(name), 1u) << name;
  for (const std::string& kind : c::routing_kinds()) {
    EXPECT_NE(std::find(c::decoders().begin(), c::decoders().end(), c::decoder_of(kind)),
              c::decoders().end());
    EXPECT_NE(std::find(c::query_tables().begin(), c::query_tables().end(), c::query_table_of(kind)),
              c::query_tables().end());
    EXPECT_FALSE(c::routing_token_of(kind).empty());
  }
  EXPECT_EQ(c::routing_token_of("caption"), "");
}

}  // namespace
