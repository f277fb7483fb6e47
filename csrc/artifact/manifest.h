// The artifact manifest (`manifest.json`): the typed form the loop reads and its strict parser. Every
// problem is a vle::ArtifactError whose message names the file and the key path, e.g.
//   out/manifest.json: graphs.llm.sha256: llm.onnx: sha256 mismatch (manifest 3f2a..., file 9b1c...)
// Paths in the manifest are confined to the artifact folder (absolute paths, `..` and links that leave it
// are refused). The rules are those of the format's documentation in docs/architecture.md.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "memory/tensor.h"

namespace vle {

struct TensorSpec {
  std::string name;
  DType dtype;
  // A dimension is a size (>= 0) or a symbolic name; `dims[i]` is -1 where `symbols[i]` names the axis.
  std::vector<int64_t> dims;
  std::vector<std::string> symbols;
};

struct GraphEntry {
  std::string name;
  std::string file;                // as written, relative to the artifact folder
  std::filesystem::path path;      // resolved, inside the artifact folder
  std::string sha256;
  int64_t size_bytes = 0;
  std::vector<std::filesystem::path> external_data;
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
  int64_t opset = 0;
  std::string precision;
  nlohmann::json facts;            // free-form exporter facts (an object)

  const TensorSpec* input(const std::string& name) const;   // nullptr when absent
  const TensorSpec* output(const std::string& name) const;
};

struct RoutingEntry {
  std::string kind;     // det grd seg pose gen edit
  std::string token;    // [DET] ...
  int64_t id = 0;
  std::string decoder;  // object pose gen edit
  int64_t queries = 0;
  std::string table;    // det pose gen edit: the query table in embeddings.safetensors
};

struct FileRef {
  std::string file;
  std::filesystem::path path;
  std::string sha256;
};

struct ModelInfo {
  std::string name;
  int64_t hidden_size = 0, num_layers = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0, vocab_size = 0,
          max_context = 0;
  double rope_theta = 0, rms_norm_eps = 0;
};

struct EmbeddingsInfo {
  FileRef file;
  std::string token_table;
  std::map<std::string, std::string> query_tables;  // routing table -> tensor name
};

struct TokenizerInfo {
  FileRef file;                        // tokenizer.json: added tokens and settings
  std::optional<FileRef> sentencepiece;  // tokenizer.model, for the C++ tokenizer
  bool legacy = false;
  bool add_prefix_space = true;
};

struct ClipPreprocess {
  int64_t tile_size = 0, max_tiles = 0, patches_per_tile = 0;
  std::array<float, 3> mean{}, std{};
  std::string resample;
  std::vector<std::pair<int64_t, int64_t>> candidate_grids;  // (cols, rows), tie-breaking order
};

struct DetectionPreprocess {
  int64_t short_side = 0, max_long_side = 0, size_divisibility = 0;
  std::array<float, 3> mean{}, std{};
  std::string resample;
};

struct DiffusionPreprocess {
  int64_t gen_image_size = 0, edit_image_size = 0;
};

struct Postprocess {
  int64_t det_top_k = 0;
  double det_score_threshold = 0;
  std::optional<double> nms_iou;
  double mask_threshold = 0, seg_score_threshold = 0;
  int64_t pose_top_k = 0;
  double pose_score_threshold = 0;
};

struct Generation {
  int64_t max_new_tokens = 0, bos_id = 0, eos_id = 0, diffusion_steps = 0;
  double guidance_scale = 0, image_guidance_scale = 0;
};

struct ChatTemplate {
  std::string system;
  std::array<std::string, 2> roles;
  std::string sep, sep2, image_token;
  std::vector<std::string> input_markers;
};

struct Manifest {
  std::filesystem::path artifact_dir;   // absolute
  std::filesystem::path manifest_file;  // artifact_dir / manifest.json
  int64_t schema_version = 0;
  std::string producer_name, producer_version;
  ModelInfo model;
  std::map<std::string, GraphEntry> graphs;   // only the graphs the artifact holds
  std::map<std::string, int64_t> tokens;      // special token -> id
  std::map<std::string, RoutingEntry> routing;  // by kind; only the kinds the artifact holds
  EmbeddingsInfo embeddings;
  TokenizerInfo tokenizer;
  ClipPreprocess clip;
  DetectionPreprocess detection;
  DiffusionPreprocess diffusion;
  Postprocess postprocess;
  Generation generation;
  ChatTemplate chat_template;
  std::map<std::string, FileRef> extra_files;  // by logical name, e.g. gen_uncond
  nlohmann::json data;                          // the validated document as read

  // The graph's entry; an ArtifactError naming the folder and the graph when it was not exported.
  const GraphEntry& graph(const std::string& name) const;
  bool has_graph(const std::string& name) const { return graphs.count(name) != 0; }
  // The id of a special token; an ArtifactError naming it when absent.
  int64_t token_id(const std::string& token) const;
};

// Reads and checks `artifact_dir/manifest.json`; with `verify_hashes`, every hashed file's sha256 too.
Manifest load_manifest(const std::filesystem::path& artifact_dir, bool verify_hashes = true);
// Checks a manifest document about to be written into `artifact_dir` (the exporter's last step); `source`
// names it in messages.
Manifest parse_manifest(const nlohmann::json& document, const std::filesystem::path& artifact_dir,
                        const std::string& source, bool verify_hashes = true);

}  // namespace vle
