#include "artifact/manifest.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <system_error>

#include "artifact/contract.h"
#include "artifact/files.h"
#include "artifact/json_text.h"
#include "artifact/limits.h"
#include "text/utf8.h"
#include "visionllm_edge/errors.h"

namespace fs = std::filesystem;

namespace vle {

const TensorSpec* GraphEntry::input(const std::string& tensor) const {
  for (const TensorSpec& t : inputs) {
    if (t.name == tensor) return &t;
  }
  return nullptr;
}

const TensorSpec* GraphEntry::output(const std::string& tensor) const {
  for (const TensorSpec& t : outputs) {
    if (t.name == tensor) return &t;
  }
  return nullptr;
}

const GraphEntry& Manifest::graph(const std::string& name) const {
  const auto it = graphs.find(name);
  if (it == graphs.end()) {
    std::vector<std::string> held;
    for (const auto& entry : graphs) held.push_back(entry.first);
    throw ArtifactError(artifact_dir.string() + ": this artifact has no " + utf8::python_repr(name) +
                        " graph (it holds: " + (held.empty() ? "none" : joined(held)) +
                        "); export it with its component");
  }
  return it->second;
}

int64_t Manifest::token_id(const std::string& token) const {
  const auto it = tokens.find(token);
  if (it == tokens.end()) {
    throw ArtifactError(manifest_file.string() + ": special token " + utf8::python_repr(token) +
                        " is not in the manifest's token table");
  }
  return it->second;
}

namespace {

using Json = OrderedJson;
using Names = std::vector<std::string>;

bool contains(const Names& names, const std::string& name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

bool is_logical_name(const std::string& name) {
  if (name.empty()) return false;
  for (char c : name) {
    const bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' ||
                    c == '.' || c == '-';
    if (!ok) return false;
  }
  return true;
}

std::vector<std::string> expanded(const std::vector<std::string>& templates, int64_t num_layers) {
  std::vector<std::string> out;
  for (const std::string& t : templates) {
    if (t.find("{i}") == std::string::npos) {
      out.push_back(t);
      continue;
    }
    for (int64_t i = 0; i < num_layers; ++i) out.push_back(contract::layer_name(t, i));
  }
  return out;
}

// Checks a manifest document and builds the typed Manifest; the first fault throws. The order of the checks
// is part of the behaviour: messages name the first fault in the document, sections in the order below.
class Parser {
 public:
  Parser(std::string source, const fs::path& artifact_dir, bool verify_hashes)
      : source_(std::move(source)), root_(resolve_folder(artifact_dir)), verify_hashes_(verify_hashes) {}

  Manifest parse(const Json& data) {
    Manifest m;
    m.schema_version = check_version(data);
    object(data, "",
           {"schema_version", "producer", "model", "graphs", "tokens", "routing", "embeddings", "tokenizer",
            "preprocess", "postprocess", "generation", "chat_template", "extra_files"});
    m.artifact_dir = root_;
    m.manifest_file = root_ / contract::kManifestFile;
    producer(data["producer"], "producer", m);
    model(data["model"], "model", m.model);
    tokens(data["tokens"], "tokens", m);
    graphs(data["graphs"], "graphs", m);
    routing(data["routing"], "routing", m);
    embeddings(data["embeddings"], "embeddings", m.embeddings);
    tokenizer(data["tokenizer"], "tokenizer", m.tokenizer);
    preprocess(data["preprocess"], "preprocess", m);
    postprocess(data["postprocess"], "postprocess", m.postprocess);
    generation(data["generation"], "generation", m);
    chat_template(data["chat_template"], "chat_template", m);
    extra_files(data["extra_files"], "extra_files", m);
    m.data = nlohmann::json(data);
    return m;
  }

 private:
  [[noreturn]] void fail(const std::string& path, const std::string& message) const {
    throw ArtifactError(source_ + ": " + (path.empty() ? "" : path + ": ") + message);
  }

  // --- typed readers ---------------------------------------------------------------------------------------

  // An object with exactly these keys: an unknown key and a missing key are errors.
  const Json& object(const Json& value, const std::string& path, const Names& required) const {
    if (!value.is_object()) fail(path, "expected an object, got " + describe(value));
    for (const auto& item : value.items()) {
      if (!contains(required, item.key())) {
        Names allowed = required;
        std::sort(allowed.begin(), allowed.end());
        fail(key_child(path, item.key()), "unknown key (allowed here: " + joined(allowed) + ")");
      }
    }
    for (const std::string& key : required) {
      if (!value.contains(key)) fail(key_child(path, key), "missing required key");
    }
    return value;
  }

  // JSON integers only: 64.0 and true are not counts or ids, whatever JSON Schema says. A size takes its cap
  // from artifact/limits.h as `maximum`.
  int64_t integer(const Json& value, const std::string& path, std::optional<int64_t> minimum = {},
                  std::optional<int64_t> maximum = {}) const {
    if (!value.is_number_integer()) fail(path, "expected an integer, got " + describe(value));
    if (value.is_number_unsigned() &&
        value.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      fail(path,
           "must be <= " + std::to_string(std::numeric_limits<int64_t>::max()) + ", got " + value.dump());
    }
    const int64_t v = value.get<int64_t>();
    if (minimum && v < *minimum)
      fail(path, "must be >= " + std::to_string(*minimum) + ", got " + std::to_string(v));
    if (maximum && v > *maximum)
      fail(path, "must be <= " + std::to_string(*maximum) + " (docs/limits.md), got " + std::to_string(v));
    return v;
  }

  double number(const Json& value, const std::string& path, std::optional<double> minimum = {},
                std::optional<double> maximum = {}, bool positive = false) const {
    if (!value.is_number()) fail(path, "expected a number, got " + describe(value));
    const double v = value.get<double>();
    const std::string got = ", got " + number_text(v);
    if (!std::isfinite(v)) fail(path, "must be finite" + got);
    if (positive && v <= 0) fail(path, "must be > 0" + got);
    if (minimum && v < *minimum) fail(path, "must be >= " + number_text(*minimum) + got);
    if (maximum && v > *maximum) fail(path, "must be <= " + number_text(*maximum) + got);
    return v;
  }

  std::string string(const Json& value, const std::string& path, bool nonempty = false,
                     const Names* choices = nullptr) const {
    if (!value.is_string()) fail(path, "expected a string, got " + describe(value));
    const std::string text = value.get<std::string>();
    if (nonempty && text.empty()) fail(path, "must not be empty");
    if (choices && !contains(*choices, text)) {
      fail(path, "must be one of " + joined(*choices) + "; got " + utf8::python_repr(text));
    }
    return text;
  }

  bool boolean(const Json& value, const std::string& path) const {
    if (!value.is_boolean()) fail(path, "expected a boolean, got " + describe(value));
    return value.get<bool>();
  }

  const Json& array(const Json& value, const std::string& path, std::optional<size_t> length = {},
                    size_t min_length = 0) const {
    if (!value.is_array()) fail(path, "expected an array, got " + describe(value));
    if (length && value.size() != *length) {
      fail(path, "expected " + std::to_string(*length) + " items, got " + std::to_string(value.size()));
    }
    if (value.size() < min_length) {
      fail(path, "expected at least " + std::to_string(min_length) + " item(s), got " +
                     std::to_string(value.size()));
    }
    return value;
  }

  std::string sha256(const Json& value, const std::string& path) const {
    const std::string text = string(value, path);
    if (!is_sha256_hex(text)) fail(path, "expected 64 lower-case hex digits, got " + describe(value));
    return text;
  }

  std::array<float, 3> triple(const Json& value, const std::string& path, bool positive = false) const {
    const Json& items = array(value, path, 3);
    std::array<float, 3> out{};
    for (size_t i = 0; i < 3; ++i) {
      out[i] = static_cast<float>(number(items[i], key_child(path, i), {}, {}, positive));
    }
    return out;
  }

  // --- files -----------------------------------------------------------------------------------------------

  // A relative path that stays inside the artifact folder and names an existing regular file.
  fs::path file(const Json& value, const std::string& path) const {
    const std::string text = string(value, path, /*nonempty=*/true);
    const ConfinedFile confined = confine_to_folder(root_, text);
    if (!confined.problem.empty()) fail(path, confined.problem);
    return confined.resolved;
  }

  // `file`, `sha256` (and `size_bytes` where present) of `node`, checked against the file. The size is
  // checked even without hashing, and before it: it is free and names the likely cause (a truncated copy)
  // more precisely than a hash mismatch.
  FileRef hashed_file(const Json& node, const std::string& path) const {
    FileRef ref;
    ref.path = file(node["file"], key_child(path, "file"));
    ref.file = node["file"].get<std::string>();
    ref.sha256 = sha256(node["sha256"], key_child(path, "sha256"));
    if (node.contains("size_bytes")) {
      const int64_t size = integer(node["size_bytes"], key_child(path, "size_bytes"), 0);
      std::error_code ec;
      const auto actual = static_cast<int64_t>(fs::file_size(ref.path, ec));
      if (ec) fail(key_child(path, "file"), ref.file + ": cannot read its size (" + ec.message() + ")");
      if (actual != size) {
        fail(key_child(path, "size_bytes"), ref.file + " is " + std::to_string(actual) +
                                                " bytes, the manifest says " + std::to_string(size) +
                                                " (truncated or replaced file)");
      }
    }
    if (verify_hashes_) {
      std::string actual;
      try {
        actual = file_sha256(ref.path);
      } catch (const ArtifactError& e) {
        fail(key_child(path, "sha256"), e.what());
      }
      if (actual != ref.sha256) {
        fail(key_child(path, "sha256"), ref.file + ": sha256 mismatch: the manifest says " + ref.sha256 +
                                            ", the file has " + actual +
                                            " (the file changed after export, or the copy is incomplete)");
      }
    }
    return ref;
  }

  // --- sections --------------------------------------------------------------------------------------------

  // Checked before anything else: a newer manifest will also have keys this version does not know, and
  // "unknown key" would hide the real fix (upgrade visionllm-edge, or re-export).
  int64_t check_version(const Json& data) const {
    if (!data.is_object()) fail("", "the manifest must be a JSON object, got " + describe(data));
    if (!data.contains("schema_version")) fail("schema_version", "missing required key");
    const int64_t version = integer(data["schema_version"], "schema_version");
    const int64_t lo = contract::kManifestMinSchemaVersion, hi = contract::kManifestSchemaVersion;
    if (lo <= version && version <= hi) return version;
    const std::string readable = lo == hi
                                     ? "schema_version " + std::to_string(hi)
                                     : "schema_version " + std::to_string(lo) + " to " + std::to_string(hi);
    const std::string ours = std::string("this visionllm-edge ") + contract::kPackageVersion;
    if (version > hi) {
      std::string by;
      const auto producer = data.find("producer");
      if (producer != data.end() && producer->is_object() && producer->contains("version") &&
          (*producer)["version"].is_string()) {
        by = " " + (*producer)["version"].get<std::string>();
      }
      fail("schema_version", "the artifact was written by a newer visionllm-edge" + by + " (schema_version " +
                                 std::to_string(version) + "); " + ours + " reads " + readable +
                                 ": upgrade visionllm-edge, or re-export the artifact with this one");
    }
    fail("schema_version", "schema_version " + std::to_string(version) + " is older than " + ours +
                               " reads (" + readable + "): re-export the artifact with this version");
  }

  void producer(const Json& node, const std::string& path, Manifest& m) const {
    object(node, path, {"name", "version"});
    const Names names = {contract::kProducerName};
    m.producer_name = string(node["name"], key_child(path, "name"), false, &names);
    m.producer_version = string(node["version"], key_child(path, "version"), true);
  }

  void model(const Json& node, const std::string& path, ModelInfo& out) const {
    object(node, path,
           {"name", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
            "max_context", "rope_theta", "rms_norm_eps"});
    out.name = string(node["name"], key_child(path, "name"), true);
    auto count = [&](const char* key, int64_t cap) { return integer(node[key], key_child(path, key), 1, cap); };
    out.hidden_size = count("hidden_size", limits::kMaxHiddenSize);
    out.num_layers = count("num_layers", limits::kMaxLayers);
    out.num_heads = count("num_heads", limits::kMaxHeads);
    out.num_kv_heads = count("num_kv_heads", limits::kMaxHeads);
    out.head_dim = count("head_dim", limits::kMaxHeadDim);
    out.vocab_size = count("vocab_size", limits::kMaxVocab);
    out.max_context = count("max_context", limits::kMaxContext);
    out.rope_theta = number(node["rope_theta"], key_child(path, "rope_theta"), {}, {}, true);
    out.rms_norm_eps = number(node["rms_norm_eps"], key_child(path, "rms_norm_eps"), {}, {}, true);
    if (out.num_heads % out.num_kv_heads) {
      fail(key_child(path, "num_kv_heads"),
           std::to_string(out.num_kv_heads) + " does not divide num_heads " + std::to_string(out.num_heads) +
               " (grouped-query attention shares each KV head among a whole number of query heads)");
    }
  }

  void tokens(const Json& node, const std::string& path, Manifest& m) const {
    const Names& required = contract::required_tokens();
    object(node, path, required);
    std::map<int64_t, std::string> owner;
    for (const std::string& token : required) {
      const std::string at = key_child(path, token);
      const int64_t id = integer(node[token], at, 0);
      if (id >= m.model.vocab_size) {
        fail(at, "id " + std::to_string(id) + " is not below model.vocab_size " +
                     std::to_string(m.model.vocab_size));
      }
      const auto seen = owner.find(id);
      if (seen != owner.end()) {
        fail(at, "id " + std::to_string(id) + " is also the id of " + utf8::python_repr(seen->second) +
                     "; special-token ids must be unique");
      }
      owner[id] = token;
      m.tokens[token] = id;
    }
  }

  std::vector<TensorSpec> tensors(const Json& node, const std::string& path) const {
    std::vector<TensorSpec> specs;
    const Json& items = array(node, path);
    for (size_t i = 0; i < items.size(); ++i) {
      const std::string at = key_child(path, i);
      const Json& item = object(items[i], at, {"name", "dtype", "shape"});
      TensorSpec spec;
      spec.name = string(item["name"], key_child(at, "name"), true);
      spec.dtype = parse_dtype(string(item["dtype"], key_child(at, "dtype"), false, &contract::dtypes()));
      const std::string shape_at = key_child(at, "shape");
      const Json& shape = array(item["shape"], shape_at);
      for (size_t j = 0; j < shape.size(); ++j) {
        const std::string dim_at = key_child(shape_at, j);
        if (shape[j].is_string()) {
          spec.symbols.push_back(string(shape[j], dim_at, true));
          spec.dims.push_back(-1);
        } else if (shape[j].is_number_integer()) {
          spec.dims.push_back(integer(shape[j], dim_at, 0));
          spec.symbols.emplace_back();
        } else {
          fail(dim_at, "expected an integer or a symbol (string) as a dimension, got " + describe(shape[j]));
        }
      }
      specs.push_back(std::move(spec));
    }
    return specs;
  }

  // Compared as sets: the runtime binds graph I/O by name, so the order is the exporter's business.
  void io_names(const std::vector<TensorSpec>& specs, const std::string& path, const Names& expected,
                const std::string& graph, const char* what) const {
    std::set<std::string> seen;
    Names names;
    for (size_t i = 0; i < specs.size(); ++i) {
      if (!seen.insert(specs[i].name).second) {
        fail(key_child(key_child(path, i), "name"),
             std::string("duplicate ") + what + " name " + utf8::python_repr(specs[i].name));
      }
      names.push_back(specs[i].name);
    }
    const std::set<std::string> wanted(expected.begin(), expected.end());
    Names missing, unexpected;
    for (const std::string& n : expected) {
      if (!seen.count(n)) missing.push_back(n);
    }
    for (const std::string& n : names) {
      if (!wanted.count(n)) unexpected.push_back(n);
    }
    if (missing.empty() && unexpected.empty()) return;
    Names parts;
    if (!missing.empty()) parts.push_back("missing " + short_list(missing));
    if (!unexpected.empty()) parts.push_back("unexpected " + short_list(unexpected));
    fail(path, std::string(what) + " names differ from contract.GRAPHS[" + utf8::python_repr(graph) +
                   "]: " + joined(parts, "; "));
  }

  void graphs(const Json& node, const std::string& path, Manifest& m) const {
    if (!node.is_object()) fail(path, "expected an object, got " + describe(node));
    for (const auto& item : node.items()) {
      const std::string& name = item.key();
      const std::string at = key_child(path, name);
      const auto known = contract::graphs().find(name);
      if (known == contract::graphs().end()) {
        fail(at, "unknown graph " + utf8::python_repr(name) +
                     "; contract.GRAPHS has: " + joined(contract::graph_names()));
      }
      const Json& entry = object(item.value(), at,
                                 {"file", "sha256", "size_bytes", "external_data", "inputs", "outputs",
                                  "opset", "precision", "facts"});
      GraphEntry g;
      g.name = name;
      const FileRef ref = hashed_file(entry, at);
      g.file = ref.file;
      g.path = ref.path;
      g.sha256 = ref.sha256;
      g.size_bytes = entry["size_bytes"].get<int64_t>();
      const std::string ext_at = key_child(at, "external_data");
      const Json& external = array(entry["external_data"], ext_at);
      for (size_t i = 0; i < external.size(); ++i)
        g.external_data.push_back(file(external[i], key_child(ext_at, i)));
      g.inputs = tensors(entry["inputs"], key_child(at, "inputs"));
      g.outputs = tensors(entry["outputs"], key_child(at, "outputs"));
      io_names(g.inputs, key_child(at, "inputs"), expanded(known->second.inputs, m.model.num_layers), name,
               "input");
      io_names(g.outputs, key_child(at, "outputs"), expanded(known->second.outputs, m.model.num_layers), name,
               "output");
      g.opset = integer(entry["opset"], key_child(at, "opset"), 1);
      g.precision = string(entry["precision"], key_child(at, "precision"), false, &contract::precisions());
      const Json& facts = entry["facts"];
      if (!facts.is_object()) fail(key_child(at, "facts"), "expected an object, got " + describe(facts));
      g.facts = nlohmann::json(facts);
      m.graphs[name] = std::move(g);
    }
  }

  void routing(const Json& node, const std::string& path, Manifest& m) const {
    if (!node.is_object()) fail(path, "expected an object, got " + describe(node));
    std::vector<const RoutingEntry*> in_order;
    for (const auto& item : node.items()) {
      const std::string& kind = item.key();
      const std::string at = key_child(path, kind);
      const std::string& expected_token = contract::routing_token_of(kind);
      if (expected_token.empty()) {
        fail(at,
             "unknown routing kind " + utf8::python_repr(kind) + "; known: " + joined(contract::routing_kinds()));
      }
      const Json& entry = object(item.value(), at, {"token", "id", "decoder", "queries", "table"});
      RoutingEntry r;
      r.kind = kind;
      r.token = string(entry["token"], key_child(at, "token"));
      if (r.token != expected_token) {
        fail(key_child(at, "token"), "kind " + utf8::python_repr(kind) + " is routed by " +
                                         utf8::python_repr(expected_token) + ", got " + utf8::python_repr(r.token));
      }
      r.id = integer(entry["id"], key_child(at, "id"), 0);
      const int64_t token_id = m.tokens.at(r.token);
      if (r.id != token_id) {
        fail(key_child(at, "id"), std::to_string(r.id) + " is not the id of " + utf8::python_repr(r.token) +
                                      " in tokens (" + std::to_string(token_id) + ")");
      }
      r.decoder = string(entry["decoder"], key_child(at, "decoder"), false, &contract::decoders());
      const std::string& decoder = contract::decoder_of(kind);
      if (r.decoder != decoder) {
        fail(key_child(at, "decoder"), "kind " + utf8::python_repr(kind) + " goes to the " + utf8::python_repr(decoder) +
                                           " decoder, got " + utf8::python_repr(r.decoder));
      }
      r.queries = integer(entry["queries"], key_child(at, "queries"), 1, limits::kMaxQueries);
      // Perception groups use distinct placeholders [EMB], [EMB2], ...; only generation repeats one.
      const auto placeholders = static_cast<int64_t>(contract::placeholders().size());
      if (!contract::is_generation_kind(kind) && r.queries > placeholders) {
        fail(key_child(at, "queries"), std::to_string(r.queries) + " exceeds the " +
                                           std::to_string(placeholders) +
                                           " placeholder tokens a perception group can use");
      }
      r.table = string(entry["table"], key_child(at, "table"), false, &contract::query_tables());
      const std::string& table = contract::query_table_of(kind);
      if (r.table != table) {
        fail(key_child(at, "table"), "kind " + utf8::python_repr(kind) + " reads query table " + utf8::python_repr(table) +
                                         ", got " + utf8::python_repr(r.table));
      }
      in_order.push_back(&(m.routing[kind] = std::move(r)));
    }
    // Kinds that share a query table ([DET], [GRD], [SEG]) read the same rows, so the same count.
    std::map<std::string, const RoutingEntry*> first_of_table;
    for (const RoutingEntry* entry : in_order) {
      const RoutingEntry* other = first_of_table.emplace(entry->table, entry).first->second;
      if (other->queries != entry->queries) {
        fail(key_child(key_child(path, entry->kind), "queries"),
             std::to_string(entry->queries) + " differs from routing." + other->kind + ".queries " +
                 std::to_string(other->queries) + ", which reads the same query table " +
                 utf8::python_repr(entry->table));
      }
    }
  }

  void embeddings(const Json& node, const std::string& path, EmbeddingsInfo& out) const {
    object(node, path, {"file", "sha256", "token_table", "query_tables"});
    out.file = hashed_file(node, path);
    out.token_table = string(node["token_table"], key_child(path, "token_table"), true);
    const std::string tables_at = key_child(path, "query_tables");
    const Json& tables = object(node["query_tables"], tables_at, contract::query_tables());
    for (const std::string& t : contract::query_tables()) {
      out.query_tables[t] = string(tables[t], key_child(tables_at, t), true);
    }
  }

  void tokenizer(const Json& node, const std::string& path, TokenizerInfo& out) const {
    object(node, path, {"file", "sha256", "legacy", "add_prefix_space", "sentencepiece"});
    out.file = hashed_file(node, path);
    out.legacy = boolean(node["legacy"], key_child(path, "legacy"));
    out.add_prefix_space = boolean(node["add_prefix_space"], key_child(path, "add_prefix_space"));
    const std::string sp_at = key_child(path, "sentencepiece");
    object(node["sentencepiece"], sp_at, {"file", "sha256"});
    out.sentencepiece = hashed_file(node["sentencepiece"], sp_at);
  }

  void preprocess(const Json& node, const std::string& path, Manifest& m) const {
    object(node, path, {"clip", "detection", "diffusion"});

    std::string at = key_child(path, "clip");
    const Json& clip =
        object(node["clip"], at,
               {"tile_size", "max_tiles", "patches_per_tile", "mean", "std", "resample", "candidate_grids"});
    ClipPreprocess& c = m.clip;
    c.max_tiles = integer(clip["max_tiles"], key_child(at, "max_tiles"), 1, limits::kMaxTiles);
    const std::string grids_at = key_child(at, "candidate_grids");
    const Json& grids = array(clip["candidate_grids"], grids_at, {}, 1);
    for (size_t i = 0; i < grids.size(); ++i) {
      const std::string g_at = key_child(grids_at, i);
      const Json& grid = array(grids[i], g_at, 2);
      const int64_t cols = integer(grid[0], key_child(g_at, 0), 1, limits::kMaxTiles);
      const int64_t rows = integer(grid[1], key_child(g_at, 1), 1, limits::kMaxTiles);
      const std::string shown = std::to_string(cols) + "x" + std::to_string(rows);
      int64_t tiles = 0;
      if (__builtin_mul_overflow(cols, rows, &tiles) || tiles > c.max_tiles) {
        fail(g_at, "grid " + shown + " has more tiles than max_tiles " + std::to_string(c.max_tiles));
      }
      if (std::find(c.candidate_grids.begin(), c.candidate_grids.end(), std::make_pair(cols, rows)) !=
          c.candidate_grids.end()) {
        fail(g_at, "grid " + shown + " is listed twice");
      }
      c.candidate_grids.emplace_back(cols, rows);
    }
    c.tile_size = integer(clip["tile_size"], key_child(at, "tile_size"), 1, limits::kMaxTileSize);
    c.patches_per_tile =
        integer(clip["patches_per_tile"], key_child(at, "patches_per_tile"), 1, limits::kMaxPatchesPerTile);
    c.mean = triple(clip["mean"], key_child(at, "mean"));
    c.std = triple(clip["std"], key_child(at, "std"), true);
    const Names bicubic = {contract::kClipResample};
    c.resample = string(clip["resample"], key_child(at, "resample"), false, &bicubic);

    at = key_child(path, "detection");
    const Json& det = object(node["detection"], at,
                             {"short_side", "max_long_side", "size_divisibility", "mean", "std", "resample"});
    DetectionPreprocess& d = m.detection;
    d.short_side = integer(det["short_side"], key_child(at, "short_side"), 1, limits::kMaxImageSide);
    d.max_long_side = integer(det["max_long_side"], key_child(at, "max_long_side"), 1, limits::kMaxImageSide);
    if (d.max_long_side < d.short_side) {
      fail(key_child(at, "max_long_side"),
           std::to_string(d.max_long_side) + " is below short_side " + std::to_string(d.short_side));
    }
    d.size_divisibility =
        integer(det["size_divisibility"], key_child(at, "size_divisibility"), 1, limits::kMaxSizeDivisibility);
    d.mean = triple(det["mean"], key_child(at, "mean"));
    d.std = triple(det["std"], key_child(at, "std"), true);
    const Names bilinear = {contract::kDetectionResample};
    d.resample = string(det["resample"], key_child(at, "resample"), false, &bilinear);

    at = key_child(path, "diffusion");
    const Json& diff = object(node["diffusion"], at, {"gen_image_size", "edit_image_size"});
    for (const char* key : {"gen_image_size", "edit_image_size"}) {
      const int64_t size = integer(diff[key], key_child(at, key), 1, limits::kMaxImageSide);
      if (size % contract::kVaeScale) {
        fail(key_child(at, key), std::to_string(size) + " is not a multiple of " +
                                     std::to_string(contract::kVaeScale) + " (the VAE's scale)");
      }
      (std::string(key) == "gen_image_size" ? m.diffusion.gen_image_size : m.diffusion.edit_image_size) =
          size;
    }
  }

  void postprocess(const Json& node, const std::string& path, Postprocess& out) const {
    object(node, path,
           {"det_top_k", "det_score_threshold", "nms_iou", "mask_threshold", "seg_score_threshold",
            "pose_top_k", "pose_score_threshold"});
    auto unit = [&](const char* key) { return number(node[key], key_child(path, key), 0.0, 1.0); };
    // null: no NMS.
    if (!node["nms_iou"].is_null())
      out.nms_iou = number(node["nms_iou"], key_child(path, "nms_iou"), {}, 1.0, true);
    out.det_top_k = integer(node["det_top_k"], key_child(path, "det_top_k"), 1, limits::kMaxTopK);
    out.det_score_threshold = unit("det_score_threshold");
    out.mask_threshold = unit("mask_threshold");
    out.seg_score_threshold = unit("seg_score_threshold");
    out.pose_top_k = integer(node["pose_top_k"], key_child(path, "pose_top_k"), 1, limits::kMaxTopK);
    out.pose_score_threshold = unit("pose_score_threshold");
  }

  void generation(const Json& node, const std::string& path, Manifest& m) const {
    object(
        node, path,
        {"max_new_tokens", "bos_id", "eos_id", "diffusion_steps", "guidance_scale", "image_guidance_scale"});
    Generation& g = m.generation;
    g.max_new_tokens = integer(node["max_new_tokens"], key_child(path, "max_new_tokens"), 1);
    if (g.max_new_tokens > m.model.max_context) {
      fail(key_child(path, "max_new_tokens"), std::to_string(g.max_new_tokens) +
                                                  " exceeds model.max_context " +
                                                  std::to_string(m.model.max_context));
    }
    for (const auto& [key, token] :
         {std::make_pair("bos_id", contract::kBosToken), std::make_pair("eos_id", contract::kEosToken)}) {
      const int64_t id = integer(node[key], key_child(path, key), 0);
      const int64_t expected = m.tokens.at(token);
      if (id != expected) {
        fail(key_child(path, key), std::to_string(id) + " is not the id of " + utf8::python_repr(token) +
                                       " in tokens (" + std::to_string(expected) + ")");
      }
      (std::string(key) == "bos_id" ? g.bos_id : g.eos_id) = id;
    }
    g.diffusion_steps =
        integer(node["diffusion_steps"], key_child(path, "diffusion_steps"), 1, limits::kMaxDiffusionSteps);
    g.guidance_scale = number(node["guidance_scale"], key_child(path, "guidance_scale"), 0.0);
    g.image_guidance_scale =
        number(node["image_guidance_scale"], key_child(path, "image_guidance_scale"), 0.0);
  }

  void chat_template(const Json& node, const std::string& path, Manifest& m) const {
    object(node, path, {"system", "roles", "sep", "sep2", "image_token", "input_markers"});
    ChatTemplate& t = m.chat_template;
    const std::string roles_at = key_child(path, "roles");
    const Json& roles = array(node["roles"], roles_at, 2);
    for (size_t i = 0; i < 2; ++i) t.roles[i] = string(roles[i], key_child(roles_at, i), true);
    t.image_token = string(node["image_token"], key_child(path, "image_token"), true);
    if (!m.tokens.count(t.image_token)) {
      fail(key_child(path, "image_token"), utf8::python_repr(t.image_token) + " is not a token of the tokens table");
    }
    const std::string markers_at = key_child(path, "input_markers");
    const Json& markers = array(node["input_markers"], markers_at);
    for (size_t i = 0; i < markers.size(); ++i) {
      const std::string marker = string(markers[i], key_child(markers_at, i), true);
      if (!m.tokens.count(marker))
        fail(key_child(markers_at, i), utf8::python_repr(marker) + " is not a token of the tokens table");
      if (contains(t.input_markers, marker))
        fail(key_child(markers_at, i), utf8::python_repr(marker) + " is listed twice");
      t.input_markers.push_back(marker);
    }
    if (!contains(t.input_markers, t.image_token))
      fail(markers_at, "must include image_token " + utf8::python_repr(t.image_token));
    t.system = string(node["system"], key_child(path, "system"));
    t.sep = string(node["sep"], key_child(path, "sep"));
    t.sep2 = string(node["sep2"], key_child(path, "sep2"));
  }

  void extra_files(const Json& node, const std::string& path, Manifest& m) const {
    if (!node.is_object()) fail(path, "expected an object, got " + describe(node));
    for (const auto& item : node.items()) {
      const std::string at = key_child(path, item.key());
      if (!is_logical_name(item.key())) {
        fail(at, "logical name " + utf8::python_repr(item.key()) + " must match [A-Za-z0-9_.-]+");
      }
      object(item.value(), at, {"file", "sha256"});
      m.extra_files[item.key()] = hashed_file(item.value(), at);
    }
  }

  std::string source_;
  fs::path root_;
  bool verify_hashes_;
};

}  // namespace

ManifestLocation locate_manifest(const fs::path& artifact_dir) {
  ManifestLocation where;
  where.folder = artifact_dir;
  std::error_code ec;
  if (artifact_dir.filename() == contract::kManifestFile && fs::is_regular_file(artifact_dir, ec)) {
    where.folder = artifact_dir.parent_path();
    if (where.folder.empty()) where.folder = ".";
  }
  where.file = where.folder / contract::kManifestFile;
  where.source = where.file.string();
  if (!fs::is_directory(where.folder, ec)) {
    throw ArtifactError(where.source + ": the artifact folder " + where.folder.string() + " does not exist");
  }
  return where;
}

std::string read_manifest_text(const ManifestLocation& where) {
  std::error_code ec;
  if (!fs::exists(where.file, ec)) {
    throw ArtifactError(where.source + ": not found; is " + where.folder.string() + " an exported artifact?");
  }
  std::ifstream in(where.file, std::ios::binary);
  std::ostringstream text;
  if (in) text << in.rdbuf();
  if (!in || in.bad()) throw ArtifactError(where.source + ": cannot read (not a readable file)");
  return text.str();
}

nlohmann::ordered_json parse_manifest_text(const std::string& text, const std::string& source) {
  return parse_json_strictly(text, source);
}

Manifest parse_manifest(const nlohmann::ordered_json& document, const fs::path& artifact_dir,
                        const std::string& source, bool verify_hashes) {
  return Parser(source, artifact_dir, verify_hashes).parse(document);
}

Manifest parse_manifest(const nlohmann::json& document, const fs::path& artifact_dir,
                        const std::string& source, bool verify_hashes) {
  return parse_manifest(nlohmann::ordered_json(document), artifact_dir, source, verify_hashes);
}

Manifest load_manifest(const fs::path& artifact_dir, bool verify_hashes) {
  const ManifestLocation where = locate_manifest(artifact_dir);
  const nlohmann::ordered_json document = parse_manifest_text(read_manifest_text(where), where.source);
  return parse_manifest(document, where.folder, where.source, verify_hashes);
}

}  // namespace vle
