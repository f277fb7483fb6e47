// The artifact manifest (`manifest.json`): the typed form the loop reads and its strict parser. Every
// problem is a vle::ArtifactError whose message names the file and the key path, e.g.
//   out/manifest.json: graphs.llm.sha256: llm.onnx: sha256 mismatch: the manifest says 3f2a..., the file
//   has 9b1c... (the file changed after export, or the copy is incomplete)
//
// The format, schema_version 2 (contract::kManifestSchemaVersion); every object has exactly these keys:
//   schema_version, producer{name, version},
//   model{name, hidden_size, num_layers, num_heads, num_kv_heads, head_dim, vocab_size, max_context,
//         rope_theta, rms_norm_eps},
//   graphs{<graph>: {file, sha256, size_bytes, external_data[], inputs[], outputs[], opset, precision,
//          facts{}}},                                    any subset of contract::graph_names()
//   tokens{<the 26 added tokens, <s>, </s>, <unk>>: id},
//   routing{<kind>: {token, id, decoder, queries, table}},  any subset of contract::routing_kinds()
//   embeddings{file, sha256, token_table, query_tables{det, pose, gen, edit}},
//   tokenizer{file, sha256, legacy, add_prefix_space, sentencepiece{file, sha256}},
//   preprocess{clip{tile_size, max_tiles, patches_per_tile, mean, std, resample, candidate_grids},
//              detection{short_side, max_long_side, size_divisibility, mean, std, resample},
//              diffusion{gen_image_size, edit_image_size}},
//   postprocess{det_top_k, det_score_threshold, nms_iou, mask_threshold, seg_score_threshold, pose_top_k,
//               pose_score_threshold},
//   generation{max_new_tokens, bos_id, eos_id, diffusion_steps, guidance_scale, image_guidance_scale},
//   chat_template{system, roles, sep, sep2, image_token, input_markers},
//   extra_files{<logical name>: {file, sha256}}            e.g. gen_uncond
//
// Beyond types and ranges the parser checks what ties sections together: graph I/O names equal the
// contract's (per LLM layer), token ids are unique and below the vocabulary size, routing entries agree with
// the tokens and the contract, kinds sharing a query table have the same number of queries, generation's
// bos/eos ids are the tokens', the chat template's tokens exist. Integers are never written as 64.0 or true.
// Paths are relative and confined to the artifact folder (absolute paths, `..` and links that leave it are
// refused); every named file must exist with the recorded size and, when asked, sha256. External data files
// of a graph are checked for presence and confinement, not hashed (the format records no hash for them).
// ONNX files are never opened here.
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
  // tokenizer.model, for the C++ tokenizer; always set by the parser (schema_version 2 requires it).
  std::optional<FileRef> sentencepiece;
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

// Reads and checks `artifact_dir/manifest.json` (`artifact_dir` may also be the manifest file itself); with
// `verify_hashes`, every hashed file's sha256 too (sizes and presence are always checked).
Manifest load_manifest(const std::filesystem::path& artifact_dir, bool verify_hashes = true);
// Checks a manifest document about to be written into `artifact_dir` (the exporter's last step); `source`
// names it in messages. The ordered form reports the first fault in the document's own key order.
Manifest parse_manifest(const nlohmann::json& document, const std::filesystem::path& artifact_dir,
                        const std::string& source, bool verify_hashes = true);
Manifest parse_manifest(const nlohmann::ordered_json& document, const std::filesystem::path& artifact_dir,
                        const std::string& source, bool verify_hashes = true);

// The steps of load_manifest, for callers that keep the document in its file order (the Python SDK).
struct ManifestLocation {
  std::filesystem::path folder;  // as given
  std::filesystem::path file;    // folder / manifest.json
  std::string source;            // `file` as messages name it
};
// `artifact_dir` or, when it is a manifest.json file, its folder; an ArtifactError when there is no folder.
ManifestLocation locate_manifest(const std::filesystem::path& artifact_dir);
// The manifest's text; an ArtifactError when it is missing or unreadable.
std::string read_manifest_text(const ManifestLocation& location);
// JSON read strictly: a key repeated in one object, NaN or Infinity, or a syntax error is an ArtifactError
// naming `source` (and the line and column, or the key path).
nlohmann::ordered_json parse_manifest_text(const std::string& text, const std::string& source);

}  // namespace vle
