// The request loop: one artifact folder, one KV arena, one engine per graph, and the steps of a request
// from pixels and prompt to a Result (see the header for the stages). A Pipeline keeps the last frame's
// encodings and the ids whose KV rows are in the arena, so a new request on the same frame recomputes only
// what differs from the cached prefix.
#include "visionllm_edge/pipeline.h"

#include <openssl/evp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <mutex>
#include <random>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include "artifact/contract.h"
#include "artifact/manifest.h"
#include "artifact/safetensors.h"
#include "engines/engine.h"
#include "loop/assemble.h"
#include "loop/diffusion.h"
#include "loop/labels.h"
#include "loop/router.h"
#include "loop/sampling.h"
#include "loop/templates.h"
#include "memory/half.h"
#include "memory/kv_arena.h"
#include "memory/tensor.h"
#include "postprocess/postprocess.h"
#include "postprocess/results.h"
#include "preprocess/image_ops.h"
#include "preprocess/preprocess.h"
#include "tokenizer/tokenizer.h"

namespace vle {

namespace {

using Clock = std::chrono::steady_clock;

// The decoders the routing table names (contract::decoder_of): the object decoder takes [DET] [GRD] [SEG]
// groups, the keypoint decoder [POSE] groups; gen and edit are named like their kinds.
const std::string kObjectDecoder = contract::decoder_of("det");
const std::string kPoseDecoder = contract::decoder_of("pose");

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

void add_timing(Result& result, const std::string& stage, double ms) {
  for (auto& [name, value] : result.timings_ms) {
    if (name == stage) {
      value += ms;
      return;
    }
  }
  result.timings_ms.emplace_back(stage, ms);
}

// Adds the time from its construction to its destruction to one stage of a result.
class StageTimer {
 public:
  StageTimer(Result& result, std::string stage) : result_(result), stage_(std::move(stage)), start_(Clock::now()) {}
  ~StageTimer() { add_timing(result_, stage_, ms_since(start_)); }
  StageTimer(const StageTimer&) = delete;
  StageTimer& operator=(const StageTimer&) = delete;

 private:
  Result& result_;
  std::string stage_;
  Clock::time_point start_;
};

Array::Type array_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return Array::Type::kFloat32;
    case DType::kInt64: return Array::Type::kInt64;
    case DType::kInt32: return Array::Type::kInt32;
    case DType::kBool: return Array::Type::kBool;
    case DType::kFloat16: break;
  }
  throw InputError("float16 tensors are converted to float32 before they become results");
}

// An engine output as a float32 tensor (fp16 artifacts return halves).
Tensor to_float(const Tensor& t) {
  if (t.dtype() == DType::kFloat32) return t;
  if (t.dtype() != DType::kFloat16) {
    throw EngineError(std::string("expected a float output, got ") + dtype_name(t.dtype()));
  }
  Tensor out(DType::kFloat32, t.shape());
  const auto* src = t.data_as<uint16_t>();
  float* dst = out.data_as<float>();
  for (int64_t i = 0; i < t.numel(); ++i) dst[i] = half_to_float(src[i]);
  return out;
}

// A result array sharing an engine output's buffer (float16 converted).
Array to_array(const Tensor& tensor) {
  const Tensor t = tensor.dtype() == DType::kFloat16 ? to_float(tensor) : tensor;
  Array a;
  a.type = array_type(t.dtype());
  a.shape = t.shape();
  // The tensor's buffer stays alive as long as the array: the aliasing constructor shares its owner.
  auto holder = std::make_shared<Tensor>(t);
  a.data = std::shared_ptr<void>(holder, holder->data());
  return a;
}

Array float_array(const float* data, std::vector<int64_t> shape) {
  Array a = Array::make(Array::Type::kFloat32, std::move(shape));
  std::memcpy(a.data.get(), data, a.bytes());
  return a;
}

std::string sha1_key(const std::vector<std::pair<const void*, size_t>>& parts) {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  if (ctx == nullptr) throw std::bad_alloc();
  EVP_DigestInit_ex(ctx, EVP_sha1(), nullptr);
  for (const auto& [data, size] : parts) EVP_DigestUpdate(ctx, data, size);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_DigestFinal_ex(ctx, digest, &length);
  EVP_MD_CTX_free(ctx);
  return std::string(reinterpret_cast<const char*>(digest), length);
}

// Standard normal float32 noise from a seed: Box-Muller on the same generator and uniform draw as the
// sampler, so one seed gives the same latents on every platform and in every front end.
std::vector<float> seeded_normal(uint64_t seed, int64_t count) {
  Sampler rng(seed);
  std::vector<float> out(static_cast<size_t>(count));
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  for (int64_t i = 0; i < count; i += 2) {
    double u1 = rng.uniform();
    const double u2 = rng.uniform();
    if (u1 <= 0.0) u1 = 0x1.0p-53;
    const double radius = std::sqrt(-2.0 * std::log(u1));
    out[static_cast<size_t>(i)] = static_cast<float>(radius * std::cos(kTwoPi * u2));
    if (i + 1 < count) out[static_cast<size_t>(i + 1)] = static_cast<float>(radius * std::sin(kTwoPi * u2));
  }
  return out;
}

int64_t fact_int(const GraphEntry& graph, const std::string& key, std::optional<int64_t> fallback = {}) {
  const auto it = graph.facts.find(key);
  if (it == graph.facts.end() || it->is_null()) {
    if (fallback) return *fallback;
    throw ArtifactError("graphs." + graph.name + ".facts." + key + ": missing (the loop needs it)");
  }
  if (!it->is_number_integer()) {
    throw ArtifactError("graphs." + graph.name + ".facts." + key + ": expected an integer, got " + it->dump());
  }
  return it->get<int64_t>();
}

ImageView image_view(const Image& image) {
  return {image.data(), image.height(), image.width(), image.width() * 3, 3, 1};
}

// A frame: one image and what has been computed from it.
struct Frame {
  std::string key;
  Image image;                      // empty for a text-only request
  int64_t width = 0, height = 0;
  std::vector<float> tiles;         // [T, 3, S, S]
  int64_t num_tiles = 0;
  std::vector<float> image_embeds;  // [T * P, H]
  int64_t num_patches = 0;          // T * P
  Tensor region_levels;             // the vision graph's output, handed to the region graph as it is
  std::vector<float> region_rows;   // [R, H]
  int64_t num_regions = 0;
  std::optional<DetectionInput> det;
};

// A conversation's ids, where the answer starts, and what the labels refer to.
struct Sequence {
  std::vector<int64_t> ids;
  int64_t answer_start = 0;
  std::string question;
  std::optional<std::string> instruction;
  bool forced = false;  // a complete answer: prefill only
  std::vector<std::string> history_answers;
};

struct Prefilled {
  std::vector<float> last_logits;  // [V]
  // The [DET] groups of earlier turns, the keypoint decoder's objects when the answer has none of its own.
  std::vector<LinkGroup> history_objects;
};

}  // namespace

struct Pipeline::Impl {
  std::string dir;
  LoadOptions options;
  Manifest manifest;
  std::unique_ptr<Tokenizer> tokenizer;
  int64_t hidden = 0, vocab = 0;
  std::unique_ptr<SafetensorsFile> embeddings;                    // mapped for the pipeline's lifetime
  const float* token_rows = nullptr;                              // [V, H]: in the mapping, or the copy
  std::vector<float> token_table_copy;                            // a converted fp16 table
  std::unordered_map<std::string, std::vector<float>> query_tables;  // by routing kind, [N, H]
  std::unique_ptr<KVArena> arena;
  DType embed_dtype = DType::kFloat32;
  int64_t patch_id = 0, region_id = 0, eos_id = 0;
  std::unordered_set<int64_t> placeholder_ids;
  std::unordered_map<int64_t, std::string> kind_of;                // routing token id -> kind
  std::unordered_map<int64_t, std::string> specials;               // added token id -> its spelling
  DetectionInput det_scratch;                                      // the decoders' input of a det_image
  std::unique_ptr<SuperLinkRouter> router;
  std::set<std::string> decoders;                                  // decoders the routing table names
  std::map<std::string, std::unique_ptr<Engine>> engines;
  std::optional<Frame> frame;
  std::vector<int64_t> cached_ids;  // the ids whose KV rows are in the arena
  std::mutex mutex;                 // one request at a time

  // LLM step buffers and names, made once.
  std::vector<std::string> past_key_names, past_value_names, present_key_names, present_value_names;
  std::vector<NamedView> step_inputs, step_bound;
  std::vector<std::string> step_fetch;
  std::vector<int64_t> positions, rows_buffer;
  std::vector<uint16_t> half_embeds;
  double last_engine_ms = 0;  // the last LLM engine call alone

  Engine& engine(const std::string& graph);
  const GraphEntry& graph(const std::string& name) const { return manifest.graph(name); }
  // A view of float32 data in the dtype the graph's input wants (converted into `storage` when it differs).
  TensorView float_input(const std::string& graph_name, const std::string& input, const float* data,
                         std::vector<int64_t> shape, std::vector<uint16_t>& storage) const;

  Result run(const Image& image, const std::string& prompt, const RunOptions& options, const TextCallback& on_text);
  Frame& frame_for(const Image& image, const RunOptions& options, Result& result);
  void encode_regions(Frame& frame, const std::vector<Region>& regions);
  DetectionInput detection_input(const Image& image) const;
  const DetectionInput& frame_detection_input(Frame& frame, const RunOptions& options);
  Sequence sequence(const Frame& frame, const std::string& prompt, const RunOptions& options) const;
  std::vector<int64_t> conversation_ids(const std::vector<std::pair<std::string, std::optional<std::string>>>& turns,
                                        const Frame& frame, const std::optional<std::string>& open_answer) const;
  void llm_step(const float* embeds, int64_t rows, const std::vector<int64_t>& output_rows, Tensor& logits,
                Tensor& hidden);
  Prefilled prefill(Sequence& seq, const Frame& frame, Result& result);
  std::string decode(Sequence& seq, std::vector<float> logits, const RunOptions& options, Result& result,
                     const TextCallback& on_text);
  std::string answer_text(const std::vector<int64_t>& ids, size_t start) const;
  std::vector<int64_t> answer_tokens(const std::vector<int64_t>& ids, size_t start) const;
  void dispatch(Frame& frame, const std::map<int64_t, std::string>& labels, const std::vector<LinkGroup>& history,
                const RunOptions& options, Result& result);
  void diffusion(const std::string& kind, const std::vector<DecoderGroup>& groups, const Frame& frame,
                 const RunOptions& options, Result& result);
};

// --- loading ------------------------------------------------------------------------------------------------

Pipeline Pipeline::load(const std::string& artifact_dir, const LoadOptions& options) {
  if (options.backend != "onnxruntime" && options.backend != "tensorrt") {
    throw InputError("unknown backend '" + options.backend + "'; known: 'onnxruntime', 'tensorrt'");
  }
  auto impl = std::make_unique<Impl>();
  Impl& p = *impl;
  p.options = options;
  p.manifest = load_manifest(artifact_dir, options.verify_hashes);
  p.dir = p.manifest.artifact_dir.string();
  if (options.backend == "tensorrt") {
    make_engine(options.backend, p.manifest.artifact_dir, contract::graph::kLlm, {});  // the named error
  }
  for (const std::string& name : options.components) {
    const auto& table = contract::component_graphs();
    const auto it = std::find_if(table.begin(), table.end(), [&](const auto& c) { return c.first == name; });
    if (it == table.end()) {
      std::string known;
      for (const auto& c : table) known += (known.empty() ? "" : ", ") + c.first;
      throw InputError("unknown component '" + name + "'; known: " + known);
    }
    std::string missing;
    for (const std::string& g : it->second) {
      if (!p.manifest.has_graph(g)) missing += (missing.empty() ? "'" : ", '") + g + "'";
    }
    if (!missing.empty()) {
      throw InputError(p.dir + ": component '" + name + "' was not exported (missing graphs [" + missing + "])");
    }
  }

  Postprocess& post = p.manifest.postprocess;
  for (const auto& [name, value] : options.postprocess) {
    if (name == "det_top_k") post.det_top_k = static_cast<int64_t>(value);
    else if (name == "det_score_threshold") post.det_score_threshold = value;
    else if (name == "nms_iou") post.nms_iou = value < 0 ? std::nullopt : std::optional<double>(value);
    else if (name == "mask_threshold") post.mask_threshold = value;
    else if (name == "seg_score_threshold") post.seg_score_threshold = value;
    else if (name == "pose_top_k") post.pose_top_k = static_cast<int64_t>(value);
    else if (name == "pose_score_threshold") post.pose_score_threshold = value;
    else {
      throw InputError("unknown post-processing setting '" + name + "' (known: det_top_k, det_score_threshold, "
                       "nms_iou, mask_threshold, seg_score_threshold, pose_top_k, pose_score_threshold)");
    }
  }
  if (post.det_top_k < 0 || post.pose_top_k < 0) throw InputError("det_top_k and pose_top_k must be >= 0");

  const Manifest& m = p.manifest;
  TokenizerFiles files;
  files.tokenizer_json = m.tokenizer.file.path;
  if (!m.tokenizer.sentencepiece) {
    throw ArtifactError(m.manifest_file.string() + ": tokenizer.sentencepiece: missing (re-export the artifact)");
  }
  files.sentencepiece = m.tokenizer.sentencepiece->path;
  files.legacy = m.tokenizer.legacy;
  files.add_prefix_space = m.tokenizer.add_prefix_space;
  p.tokenizer = std::make_unique<Tokenizer>(files, m.tokens);

  // The token table is read in place from the memory-mapped file when it is float32 and aligned (the
  // assembly reads only the rows of the ids it embeds, so most pages are never touched); an fp16 table is
  // converted once. The query tables are small float32 copies.
  p.embeddings = std::make_unique<SafetensorsFile>(m.embeddings.file.path);
  const SafetensorsFile& tables = *p.embeddings;
  p.vocab = m.model.vocab_size;
  p.hidden = m.model.hidden_size;
  const SafetensorsEntry& token_entry = tables.entry(m.embeddings.token_table);
  if (token_entry.dtype == "F32" && token_entry.shape == std::vector<int64_t>{p.vocab, p.hidden} &&
      reinterpret_cast<uintptr_t>(token_entry.data) % alignof(float) == 0) {
    p.token_rows = reinterpret_cast<const float*>(token_entry.data);
  } else {
    const Tensor token = tables.to_float32(m.embeddings.token_table, {p.vocab, p.hidden});
    p.token_table_copy.assign(token.data_as<float>(), token.data_as<float>() + token.numel());
    p.token_rows = p.token_table_copy.data();
  }
  for (const auto& [kind, route] : m.routing) {
    const auto name = m.embeddings.query_tables.find(route.table);
    if (name == m.embeddings.query_tables.end()) {
      throw ArtifactError(m.manifest_file.string() + ": routing." + kind + ".table: '" + route.table +
                          "' is not in embeddings.query_tables");
    }
    const Tensor table = tables.to_float32(name->second, {route.queries, p.hidden});
    p.query_tables[kind].assign(table.data_as<float>(), table.data_as<float>() + table.numel());
  }

  const int64_t cap = options.max_context > 0 ? std::min(options.max_context, m.model.max_context) : m.model.max_context;
  if (options.max_context < 0) throw InputError("max_context must be positive, got " + std::to_string(options.max_context));
  DType kv_dtype = DType::kFloat32;
  if (m.has_graph(contract::graph::kLlm)) {
    const GraphEntry& llm = m.graph(contract::graph::kLlm);
    if (const TensorSpec* spec = llm.input(contract::layer_name(contract::io::kPastKey, 0))) kv_dtype = spec->dtype;
    if (const TensorSpec* spec = llm.input(contract::io::kInputsEmbeds)) p.embed_dtype = spec->dtype;
  }
  p.arena = std::make_unique<KVArena>(m.model.num_layers, cap, m.model.num_kv_heads, m.model.head_dim,
                                      kv_dtype == DType::kFloat16 ? KVDType::kFloat16 : KVDType::kFloat32);

  p.patch_id = m.token_id(contract::kImagePatchToken);
  p.region_id = m.token_id(contract::kRegionToken);
  p.eos_id = m.generation.eos_id;
  for (const std::string& t : contract::placeholders()) p.placeholder_ids.insert(m.token_id(t));
  for (const std::string& t : contract::added_tokens()) p.specials[m.token_id(t)] = t;
  std::vector<Route> routes;
  for (const auto& [kind, r] : m.routing) {
    std::vector<int64_t> placeholders;
    for (int64_t i = 0; i < r.queries; ++i) {
      placeholders.push_back(contract::is_generation_kind(kind)
                                 ? m.token_id(contract::kGenerationPlaceholder)
                                 : m.token_id(contract::placeholders().at(static_cast<size_t>(i))));
    }
    const std::vector<float>& table = p.query_tables[kind];
    routes.emplace_back(r.id, kind, r.decoder, placeholders, FloatArrayRef{table.data(), {r.queries, p.hidden}});
    p.kind_of[r.id] = kind;
    p.decoders.insert(r.decoder);
  }
  p.router = std::make_unique<SuperLinkRouter>(std::move(routes), p.eos_id);

  for (int64_t l = 0; l < m.model.num_layers; ++l) {
    p.past_key_names.push_back(contract::layer_name(contract::io::kPastKey, l));
    p.past_value_names.push_back(contract::layer_name(contract::io::kPastValue, l));
    p.present_key_names.push_back(contract::layer_name(contract::io::kPresentKey, l));
    p.present_value_names.push_back(contract::layer_name(contract::io::kPresentValue, l));
  }
  p.step_fetch = {contract::io::kLogits, contract::io::kHidden};

  for (const std::string& name : options.components) {
    for (const auto& [component, graphs] : contract::component_graphs()) {
      if (component != name) continue;
      for (const std::string& g : graphs) p.engine(g);
    }
  }
  return Pipeline(std::move(impl));
}

Pipeline::Pipeline(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Pipeline::Pipeline(Pipeline&&) noexcept = default;
Pipeline& Pipeline::operator=(Pipeline&&) noexcept = default;
Pipeline::~Pipeline() = default;

Engine& Pipeline::Impl::engine(const std::string& name) {
  auto it = engines.find(name);
  if (it != engines.end()) return *it->second;
  if (!manifest.has_graph(name)) {
    throw InputError(dir + ": this artifact has no '" + name + "' graph (export it with its component)");
  }
  EngineOptions eo;
  eo.providers = options.providers;
  eo.provider_options = options.provider_options;
  eo.threads = options.threads;
  eo.onnxruntime_library = options.onnxruntime_library;
  auto made = make_engine(options.backend, manifest.graph(name).path, name, eo);
  return *engines.emplace(name, std::move(made)).first->second;
}

TensorView Pipeline::Impl::float_input(const std::string& graph_name, const std::string& input, const float* data,
                                       std::vector<int64_t> shape, std::vector<uint16_t>& storage) const {
  const TensorSpec* spec = graph(graph_name).input(input);
  const DType want = spec ? spec->dtype : DType::kFloat32;
  if (want == DType::kFloat32) return {DType::kFloat32, std::move(shape), const_cast<float*>(data)};
  if (want != DType::kFloat16) {
    throw ArtifactError("graphs." + graph_name + ".inputs." + input + ": expected a float input, the manifest says " +
                        dtype_name(want));
  }
  const int64_t n = element_count(shape);
  storage.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) storage[static_cast<size_t>(i)] = float_to_half(data[i]);
  return {DType::kFloat16, std::move(shape), storage.data()};
}

// --- frames ---------------------------------------------------------------------------------------------------

Frame& Pipeline::Impl::frame_for(const Image& image, const RunOptions& options, Result& result) {
  if (image.empty()) {
    if (!options.regions.empty()) throw InputError("regions need an image");
    if (!frame || frame->key != "text-only") {
      frame = Frame{};
      frame->key = "text-only";
      cached_ids.clear();
    }
    return *frame;
  }
  std::string key;
  {
    StageTimer t(result, "preprocess");
    std::vector<std::pair<const void*, size_t>> parts;
    const int64_t dims[2] = {image.width(), image.height()};
    parts.emplace_back(dims, sizeof dims);
    parts.emplace_back(image.data(), static_cast<size_t>(image.width() * image.height() * 3));
    for (const Region& r : options.regions) {
      const int kind = static_cast<int>(r.kind);
      parts.emplace_back(&kind, sizeof kind);
      parts.emplace_back(r.coords.data(), r.coords.size() * sizeof(float));
      parts.emplace_back(r.mask.data(), r.mask.size());
    }
    key = sha1_key(parts);
  }
  if (frame && frame->key == key) return *frame;
  Frame f;
  f.key = key;
  f.image = Image::rgb(image.data(), image.width(), image.height());  // the frame outlives the caller's pixels
  f.width = image.width();
  f.height = image.height();
  const ClipPreprocess& clip = manifest.clip;
  {
    StageTimer t(result, "preprocess");
    std::vector<Grid> grids;
    for (const auto& [cols, rows] : clip.candidate_grids) grids.push_back({cols, rows});
    const Grid grid = choose_anyres_grid(f.width, f.height, clip.tile_size, grids);
    f.num_tiles = clip_tile_count(grid.cols, grid.rows);
    f.tiles.resize(static_cast<size_t>(f.num_tiles * 3 * clip.tile_size * clip.tile_size));
    clip_tiles(image_view(f.image), grid.cols, grid.rows, clip.tile_size, clip.mean, clip.std, f.tiles.data());
  }
  {
    StageTimer t(result, "vision");
    std::vector<uint16_t> storage;
    const TensorView pixels = float_input(contract::graph::kVision, contract::io::kPixelValues, f.tiles.data(),
                                          {f.num_tiles, 3, clip.tile_size, clip.tile_size}, storage);
    auto out = engine(contract::graph::kVision)
                   .run({{contract::io::kPixelValues, pixels}}, {}, {contract::io::kImageEmbeds, contract::io::kRegionLevels});
    const Tensor embeds = to_float(out[0]);
    if (embeds.shape().size() != 3 || embeds.shape()[2] != hidden) {
      throw EngineError("vision: image_embeds has shape " + shape_text(embeds.shape()) + ", expected [T, P, " +
                        std::to_string(hidden) + "]");
    }
    f.num_patches = embeds.shape()[0] * embeds.shape()[1];
    f.image_embeds.assign(embeds.data_as<float>(), embeds.data_as<float>() + embeds.numel());
    f.region_levels = out[1];
  }
  if (!options.regions.empty()) {
    StageTimer t(result, "region");
    encode_regions(f, options.regions);
  }
  // The arena's rows belong to the previous frame: none of them may be reused for this one.
  frame = std::move(f);
  cached_ids.clear();
  return *frame;
}

void Pipeline::Impl::encode_regions(Frame& f, const std::vector<Region>& regions) {
  const int64_t size = manifest.clip.tile_size;
  const int64_t cells = size * size;
  std::vector<float> masks(static_cast<size_t>(cells) * regions.size());
  for (size_t i = 0; i < regions.size(); ++i) {
    const Region& r = regions[i];
    float* out = masks.data() + i * static_cast<size_t>(cells);
    switch (r.kind) {
      case Region::Kind::kThumbnailMask:
        if (r.mask_width != size || r.mask_height != size || static_cast<int64_t>(r.mask.size()) != cells) {
          throw InputError("thumbnail-frame regions must be " + std::to_string(size) + "x" + std::to_string(size) +
                           ", got " + std::to_string(r.mask_height) + "x" + std::to_string(r.mask_width));
        }
        for (int64_t c = 0; c < cells; ++c) out[c] = r.mask[static_cast<size_t>(c)] ? 1.f : 0.f;
        break;
      case Region::Kind::kMask: {
        if (static_cast<int64_t>(r.mask.size()) != r.mask_width * r.mask_height) {
          throw InputError("region " + std::to_string(i) + ": the mask has " + std::to_string(r.mask.size()) +
                           " bytes for " + std::to_string(r.mask_height) + "x" + std::to_string(r.mask_width));
        }
        const BoolMaskView view{reinterpret_cast<const bool*>(r.mask.data()), r.mask_height, r.mask_width,
                                r.mask_width, 1};
        region_mask_from_mask(view, f.width, f.height, size, out);
        break;
      }
      case Region::Kind::kBox:
        if (r.coords.size() != 4) throw InputError("region " + std::to_string(i) + ": a box has 4 numbers");
        region_mask_box({r.coords[0], r.coords[1], r.coords[2], r.coords[3]}, f.width, f.height, size, out);
        break;
      case Region::Kind::kPoint:
        if (r.coords.size() != 2) throw InputError("region " + std::to_string(i) + ": a point has 2 numbers");
        region_mask_point({r.coords[0], r.coords[1]}, f.width, f.height, size, out);
        break;
    }
  }
  const int64_t n = static_cast<int64_t>(regions.size());
  std::vector<uint16_t> s1, s2;
  const float* thumbnail = f.tiles.data() + (f.num_tiles - 1) * 3 * cells;
  const TensorView image = float_input(contract::graph::kRegion, contract::io::kRegionImage, thumbnail,
                                       {1, 3, size, size}, s1);
  const TensorView mask_view = float_input(contract::graph::kRegion, contract::io::kRegionMasks, masks.data(),
                                           {n, size, size}, s2);
  TensorView levels = f.region_levels.view();
  std::vector<uint16_t> s3;
  Tensor levels_f;
  const TensorSpec* want = graph(contract::graph::kRegion).input(contract::io::kRegionLevels);
  if (want && want->dtype != levels.dtype) {
    levels_f = to_float(f.region_levels);
    levels = float_input(contract::graph::kRegion, contract::io::kRegionLevels, levels_f.data_as<float>(),
                         levels_f.shape(), s3);
  }
  auto out = engine(contract::graph::kRegion)
                 .run({{contract::io::kRegionImage, image}, {contract::io::kRegionMasks, mask_view},
                       {contract::io::kRegionLevels, levels}},
                      {}, {contract::io::kRegionEmbeds});
  const Tensor rows = to_float(out[0]);
  f.region_rows.assign(rows.data_as<float>(), rows.data_as<float>() + rows.numel());
  f.num_regions = n;
}

DetectionInput Pipeline::Impl::detection_input(const Image& image) const {
  const DetectionPreprocess& d = manifest.detection;
  std::optional<Size2> pad_to;
  if (manifest.has_graph(contract::graph::kDet)) {
    // A decoder exported at one static size (a bucket) takes every image padded into it; a dynamic one takes
    // the image padded to a multiple of size_divisibility, as the official code does.
    const auto& facts = manifest.graph(contract::graph::kDet).facts;
    const auto it = facts.find("image_size");
    if (it != facts.end() && it->is_array() && it->size() == 2) pad_to = Size2{(*it)[0].get<int64_t>(), (*it)[1].get<int64_t>()};
  }
  const Size2 resized = detection_resized_size(image.width(), image.height(), d.short_side, d.max_long_side);
  const Size2 padded = detection_padded_size(resized, d.size_divisibility, pad_to);
  DetectionInput in;
  in.pixel_values = Array::make(Array::Type::kFloat32, {1, 3, padded.height, padded.width});
  in.pixel_mask = Array::make(Array::Type::kBool, {1, padded.height, padded.width});
  vle::detection_input(image_view(image), resized, padded, d.mean, d.std, in.pixel_values.as<float>(),
                       in.pixel_mask.as<bool>());
  in.resized_hw = {resized.height, resized.width};
  return in;
}

const DetectionInput& Pipeline::Impl::frame_detection_input(Frame& f, const RunOptions& options) {
  if (options.det_input) return *options.det_input;
  if (options.det_image) {
    det_scratch = detection_input(*options.det_image);
    return det_scratch;
  }
  if (f.image.empty()) throw InputError("this answer routes to a perception decoder, which needs an image");
  if (!f.det) f.det = detection_input(f.image);
  return *f.det;
}

// --- sequences ------------------------------------------------------------------------------------------------

std::vector<int64_t> Pipeline::Impl::conversation_ids(
    const std::vector<std::pair<std::string, std::optional<std::string>>>& turns, const Frame& f,
    const std::optional<std::string>& open_answer) const {
  const Conversation conv = build_conversation(turns);
  const std::string text = conv.text + (open_answer ? " " + *open_answer : "");
  std::vector<int64_t> ids = tokenizer->tokenize_with_image(text, conv.user_spans);
  const int64_t expected = f.image.empty() ? 0 : 1;
  const int64_t found = std::count(ids.begin(), ids.end(), kImageSentinel);
  if (found != expected) {
    throw InputError("the conversation must contain " + std::to_string(expected) + " <image>, found " +
                     std::to_string(found));
  }
  if (!expected) return ids;
  const auto at = std::find(ids.begin(), ids.end(), kImageSentinel);
  std::vector<int64_t> out(ids.begin(), at);
  out.insert(out.end(), static_cast<size_t>(f.num_patches), patch_id);
  out.insert(out.end(), at + 1, ids.end());
  return out;
}

Sequence Pipeline::Impl::sequence(const Frame& f, const std::string& prompt, const RunOptions& o) const {
  const int64_t num_embs = manifest.routing.count("det") ? manifest.routing.at("det").queries : 4;
  const int64_t num_gen = manifest.routing.count("gen") ? manifest.routing.at("gen").queries : 64;
  std::vector<std::pair<std::string, std::optional<std::string>>> turns;
  for (const auto& [user, answer] : o.history) turns.emplace_back(user, insert_placeholders(answer, num_embs, num_gen));
  std::optional<std::string> full;
  if (o.answer) full = insert_placeholders(*o.answer, num_embs, num_gen);
  turns.emplace_back(prompt, full);
  if (!f.image.empty()) {
    const bool has_image = std::any_of(turns.begin(), turns.end(), [](const auto& t) {
      return t.first.find(contract::kImageToken) != std::string::npos;
    });
    if (!has_image) turns[0].first = std::string(contract::kImageToken) + "\n" + turns[0].first;
  }
  auto open_turns = turns;
  open_turns.back().second.reset();
  Sequence seq;
  const std::vector<int64_t> prompt_ids = conversation_ids(open_turns, f, std::nullopt);
  if (full) {
    seq.ids = conversation_ids(turns, f, std::nullopt);
  } else if (o.answer_prefix && !o.answer_prefix->empty()) {
    seq.ids = conversation_ids(turns, f, insert_placeholders(*o.answer_prefix, num_embs, num_gen));
  } else {
    seq.ids = prompt_ids;
  }
  size_t start = 0;
  while (start < prompt_ids.size() && start < seq.ids.size() && prompt_ids[start] == seq.ids[start]) ++start;
  if (static_cast<int64_t>(seq.ids.size()) >= arena->capacity()) {
    throw InputError("the prompt is " + std::to_string(seq.ids.size()) + " tokens; the context holds " +
                     std::to_string(arena->capacity()));
  }
  seq.answer_start = static_cast<int64_t>(start);
  seq.question = prompt;
  seq.instruction = o.instruction;
  seq.forced = full.has_value();
  for (const auto& turn : o.history) seq.history_answers.push_back(turn.second);
  return seq;
}

// --- the LLM --------------------------------------------------------------------------------------------------

void Pipeline::Impl::llm_step(const float* embeds, int64_t s, const std::vector<int64_t>& output_rows,
                              Tensor& logits, Tensor& hidden_out) {
  KVArena& a = *arena;
  a.check_room(s);
  const int64_t past = a.length();
  const int64_t kv = a.kv_heads(), dim = a.head_dim();
  const DType kv_dtype = a.dtype() == KVDType::kFloat16 ? DType::kFloat16 : DType::kFloat32;
  positions.resize(static_cast<size_t>(s));
  for (int64_t i = 0; i < s; ++i) positions[static_cast<size_t>(i)] = past + i;
  rows_buffer.assign(output_rows.begin(), output_rows.end());

  const int64_t layers = a.num_layers();
  if (step_inputs.empty()) {
    step_inputs.resize(static_cast<size_t>(3 + 2 * layers));
    step_bound.resize(static_cast<size_t>(2 * layers));
    step_inputs[0].first = contract::io::kInputsEmbeds;
    step_inputs[1].first = contract::io::kPositionIds;
    step_inputs[2].first = contract::io::kOutputRows;
    for (int64_t l = 0; l < layers; ++l) {
      step_inputs[static_cast<size_t>(3 + 2 * l)].first = past_key_names[static_cast<size_t>(l)];
      step_inputs[static_cast<size_t>(4 + 2 * l)].first = past_value_names[static_cast<size_t>(l)];
      step_bound[static_cast<size_t>(2 * l)].first = present_key_names[static_cast<size_t>(l)];
      step_bound[static_cast<size_t>(2 * l + 1)].first = present_value_names[static_cast<size_t>(l)];
    }
  }
  if (embed_dtype == DType::kFloat16) {
    half_embeds.resize(static_cast<size_t>(s * hidden));
    for (int64_t i = 0; i < s * hidden; ++i) half_embeds[static_cast<size_t>(i)] = float_to_half(embeds[i]);
    step_inputs[0].second = {DType::kFloat16, {1, s, hidden}, half_embeds.data()};
  } else {
    step_inputs[0].second = {DType::kFloat32, {1, s, hidden}, const_cast<float*>(embeds)};
  }
  step_inputs[1].second = {DType::kInt64, {s}, positions.data()};
  step_inputs[2].second = {DType::kInt64, {static_cast<int64_t>(rows_buffer.size())}, rows_buffer.data()};
  for (int64_t l = 0; l < layers; ++l) {
    step_inputs[static_cast<size_t>(3 + 2 * l)].second = {kv_dtype, {past, kv, dim}, a.key_row(l, 0)};
    step_inputs[static_cast<size_t>(4 + 2 * l)].second = {kv_dtype, {past, kv, dim}, a.value_row(l, 0)};
    step_bound[static_cast<size_t>(2 * l)].second = {kv_dtype, {s, kv, dim}, a.key_row(l, past)};
    step_bound[static_cast<size_t>(2 * l + 1)].second = {kv_dtype, {s, kv, dim}, a.value_row(l, past)};
  }
  Engine& llm = engine(contract::graph::kLlm);
  const auto t0 = Clock::now();
  auto out = llm.run(step_inputs, step_bound, step_fetch);
  last_engine_ms = ms_since(t0);
  a.commit(s);
  logits = to_float(out[0]);
  hidden_out = to_float(out[1]);
}

Prefilled Pipeline::Impl::prefill(Sequence& seq, const Frame& f, Result& result) {
  const std::vector<int64_t>& ids = seq.ids;
  const int64_t n = static_cast<int64_t>(ids.size());
  int64_t reuse = 0;
  if (&*frame == &f) {
    while (reuse < static_cast<int64_t>(cached_ids.size()) && reuse < n && cached_ids[reuse] == ids[reuse]) ++reuse;
  }
  // Always recompute the last row (its logits) and every row whose hidden state is needed: the query rows of
  // the answer's groups and, for a pose answer without objects, those of the history's [DET] groups, each
  // group from its routing token on (the assembly gives placeholder rows their query rows only after the
  // token that opens them).
  std::vector<int64_t> answer_rows = router->prefill_query_rows(ids.data(), n, seq.answer_start);
  std::vector<std::pair<int64_t, std::vector<int64_t>>> history_groups;
  const auto det = manifest.routing.find("det");
  const auto pose = manifest.routing.find("pose");
  if (det != manifest.routing.end() && pose != manifest.routing.end()) {
    const auto begin = ids.begin() + seq.answer_start;
    const bool answer_has_pose = std::find(begin, ids.end(), pose->second.id) != ids.end();
    const bool answer_has_det = std::find(begin, ids.end(), det->second.id) != ids.end();
    if (answer_has_pose && !answer_has_det) {
      const int64_t q = det->second.queries;
      for (int64_t p = 0; p < seq.answer_start; ++p) {
        if (ids[p] != det->second.id || p + q >= n) continue;
        bool followed = true;
        for (int64_t i = p + 1; i <= p + q; ++i) followed = followed && placeholder_ids.count(ids[i]);
        if (!followed) continue;
        std::vector<int64_t> rows;
        for (int64_t i = p + 1; i <= p + q; ++i) rows.push_back(i);
        history_groups.emplace_back(p, std::move(rows));
      }
    }
  }
  std::vector<int64_t> needed;
  for (const auto& [pos, rows] : history_groups) needed.insert(needed.end(), rows.begin(), rows.end());
  const size_t history_rows = needed.size();
  needed.insert(needed.end(), answer_rows.begin(), answer_rows.end());
  int64_t first_needed = n - 1;
  for (int64_t r : needed) first_needed = std::min(first_needed, r - 1);
  reuse = std::min({reuse, first_needed, arena->length()});
  arena->rollback(reuse);
  result.stats["reused_rows"] = static_cast<double>(reuse);

  Tensor logits, hidden_states;
  {
    StageTimer t(result, "prefill");
    const int64_t rest = n - reuse;
    // Rows already in the arena consumed their image and region rows: hand over only the remaining ones.
    AssemblyInputs in;
    in.token_table = {token_rows, {vocab, hidden}};
    in.ids = ids.data() + reuse;
    in.num_ids = rest;
    in.image_token_id = patch_id;
    in.region_token_id = region_id;
    if (!f.image_embeds.empty()) {
      const int64_t done = std::count(ids.begin(), ids.begin() + reuse, patch_id);
      if (done < f.num_patches) {
        in.image_rows = FloatArrayRef{f.image_embeds.data() + done * hidden, {f.num_patches - done, hidden}};
      }
    }
    if (f.num_regions > 0) {
      const int64_t done = std::count(ids.begin(), ids.begin() + reuse, region_id);
      if (done < f.num_regions) {
        in.region_rows = FloatArrayRef{f.region_rows.data() + done * hidden, {f.num_regions - done, hidden}};
      }
    }
    for (const auto& [kind, route] : manifest.routing) {
      in.query_tables[kind] = {query_tables.at(kind).data(), {route.queries, hidden}};
    }
    in.routing_kinds.insert(kind_of.begin(), kind_of.end());
    in.placeholder_ids = placeholder_ids;
    std::vector<float> embeds(static_cast<size_t>(rest * hidden));
    assemble_embeddings(in, embeds.data());
    std::vector<int64_t> out_rows;
    for (int64_t r : needed) out_rows.push_back(r - reuse);
    out_rows.push_back(n - 1 - reuse);
    llm_step(embeds.data(), rest, out_rows, logits, hidden_states);
  }
  cached_ids = ids;
  // Groups already in the prefill (a forced answer or an answer prefix): record their links.
  router->reset();
  const float* h = hidden_states.data_as<float>();
  if (!answer_rows.empty()) {
    router->observe_prefill(ids.data(), n, seq.answer_start,
                            {h + history_rows * hidden, {static_cast<int64_t>(answer_rows.size()), hidden}});
  }
  Prefilled out;
  size_t row = 0;
  for (const auto& [pos, rows] : history_groups) {
    LinkGroup obj;
    obj.kind = "det";
    obj.decoder = kObjectDecoder;
    obj.position = pos;
    obj.num_queries = static_cast<int64_t>(rows.size());
    obj.hidden = hidden;
    obj.states = std::make_shared<const std::vector<float>>(h + row * hidden, h + (row + rows.size()) * hidden);
    out.history_objects.push_back(std::move(obj));
    row += rows.size();
  }
  const int64_t last = logits.shape()[0] - 1;
  out.last_logits.assign(logits.data_as<float>() + last * vocab, logits.data_as<float>() + (last + 1) * vocab);
  return out;
}

std::string Pipeline::Impl::decode(Sequence& seq, std::vector<float> logits, const RunOptions& o, Result& result,
                                   const TextCallback& on_text) {
  Sampler sampler(o.seed);
  SamplingParams params;
  params.do_sample = o.do_sample;
  params.temperature = o.temperature;
  params.top_k = o.top_k;
  params.top_p = o.top_p;
  params.repetition_penalty = o.repetition_penalty;
  check_sampling_params(params);
  std::vector<int64_t>& ids = seq.ids;
  std::set<int64_t> penalized_set;
  for (int64_t t : ids) {
    if (!placeholder_ids.count(t) && t != patch_id) penalized_set.insert(t);
  }
  std::vector<int64_t> penalized(penalized_set.begin(), penalized_set.end());
  const size_t stream_start = ids.size();
  std::string streamed;
  std::string stop = "length";
  int64_t steps = 0;
  double engine_ms = 0;
  std::vector<double> overheads_us;
  Tensor step_logits, step_hidden;
  {
    StageTimer t(result, "decode");
    for (int64_t generated = 1; generated <= o.max_new_tokens; ++generated) {
      const auto step_start = Clock::now();
      double step_engine_ms = 0;
      const int64_t token = sampler.sample(logits.data(), vocab, params, penalized);
      const StepPlan plan = router->plan(token, arena->length(), arena->capacity(), generated == o.max_new_tokens);
      ids.insert(ids.end(), plan.ids.begin(), plan.ids.end());  // empty when the step does not fit
      if (on_text && !plan.ids.empty()) {
        const std::string text = answer_text(ids, stream_start);
        if (text.size() > streamed.size() && text.compare(0, streamed.size(), streamed) == 0) {
          on_text(std::string_view(text).substr(streamed.size()));
        }
        streamed = text;
      }
      if (plan.feed) {
        const std::vector<float> rows = router->step_embeddings(plan, {token_rows, {vocab, hidden}});
        llm_step(rows.data(), plan.rows, plan.output_rows, step_logits, step_hidden);
        step_engine_ms = last_engine_ms;
        engine_ms += step_engine_ms;
        ++steps;
        router->observe(plan, {step_hidden.data_as<float>(), step_hidden.shape()});
        const int64_t last = step_logits.shape()[0] - 1;
        logits.assign(step_logits.data_as<float>() + last * vocab, step_logits.data_as<float>() + (last + 1) * vocab);
        if (params.repetition_penalty != 1.0 && penalized_set.insert(token).second) {
          penalized.assign(penalized_set.begin(), penalized_set.end());
        }
      }
      if (plan.feed) overheads_us.push_back((ms_since(step_start) - step_engine_ms) * 1000.0);
      if (plan.stop != StopReason::kNone) {
        stop = stop_reason_name(plan.stop);
        break;
      }
    }
  }
  // The loop's own work per fed step, outside the engine call: sampling, planning, the step's rows, the
  // link, streaming (benchmarks/decode_overhead.py reports it against the engine call).
  if (!overheads_us.empty()) {
    std::sort(overheads_us.begin(), overheads_us.end());
    result.stats["decode_overhead_us_median"] = overheads_us[overheads_us.size() / 2];
    result.stats["decode_overhead_us_max"] = overheads_us.back();
  }
  result.stats["decode_steps"] = static_cast<double>(steps);
  result.stats["decode_engine_ms"] = engine_ms;
  cached_ids.assign(ids.begin(), ids.begin() + std::min<int64_t>(arena->length(), ids.size()));
  return stop;
}

std::string Pipeline::Impl::answer_text(const std::vector<int64_t>& ids, size_t start) const {
  // Runs of plain tokens are decoded together; added tokens show as their own spelling, bar the placeholders
  // and EOS, which are left out.
  std::string text;
  std::vector<int64_t> run;
  for (size_t i = start; i < ids.size(); ++i) {
    const int64_t t = ids[i];
    const auto special = specials.find(t);
    if (special != specials.end() || t == eos_id) {
      if (!run.empty()) {
        text += tokenizer->decode(run);
        run.clear();
      }
      if (special != specials.end() && !placeholder_ids.count(t)) text += special->second;
    } else {
      run.push_back(t);
    }
  }
  if (!run.empty()) text += tokenizer->decode(run);
  return templates::python_strip(text);
}

std::vector<int64_t> Pipeline::Impl::answer_tokens(const std::vector<int64_t>& ids, size_t start) const {
  std::vector<int64_t> out;
  int64_t skip = 0;
  for (size_t i = start; i < ids.size(); ++i) {
    if (skip) {
      --skip;
      continue;
    }
    out.push_back(ids[i]);
    const auto kind = kind_of.find(ids[i]);
    if (kind != kind_of.end()) skip = manifest.routing.at(kind->second).queries;
  }
  return out;
}

// --- decoders -------------------------------------------------------------------------------------------------

void Pipeline::Impl::dispatch(Frame& f, const std::map<int64_t, std::string>& labels,
                              const std::vector<LinkGroup>& history, const RunOptions& o, Result& result) {
  auto label_of = [&](int64_t position) {
    const auto it = labels.find(position);
    return it == labels.end() ? std::string() : it->second;
  };
  const Postprocess& post = manifest.postprocess;
  if (decoders.count(kObjectDecoder)) {
    const std::vector<DecoderGroup> groups = router->groups_for(kObjectDecoder).at(0).second;
    if (!groups.empty()) {
      const DetectionInput& det = frame_detection_input(f, o);
      const GraphEntry& g = graph(contract::graph::kDet);
      const int64_t max_groups = fact_int(g, "max_groups", fact_int(g, "max_text_len", 256));
      const int64_t num_queries = fact_int(g, "num_queries");
      std::vector<Array> logits, boxes, masks;
      {
        StageTimer t(result, "object_decoder");
        std::vector<int64_t> query_index(static_cast<size_t>(num_queries));
        for (int64_t i = 0; i < num_queries; ++i) query_index[static_cast<size_t>(i)] = i;
        for (size_t begin = 0; begin < groups.size(); begin += static_cast<size_t>(max_groups)) {
          const size_t end = std::min(groups.size(), begin + static_cast<size_t>(max_groups));
          const int64_t k = static_cast<int64_t>(end - begin);
          const int64_t nq = groups[begin].link.num_queries;
          std::vector<float> query;
          for (size_t i = begin; i < end; ++i) {
            query.insert(query.end(), groups[i].link.states->begin(), groups[i].link.states->end());
          }
          std::vector<uint8_t> query_mask(static_cast<size_t>(k), 1);
          auto out = engine(contract::graph::kDet)
                         .run({{contract::io::kPixelValues, {DType::kFloat32, det.pixel_values.shape, det.pixel_values.data.get()}},
                               {contract::io::kPixelMask, {DType::kBool, det.pixel_mask.shape, det.pixel_mask.data.get()}},
                               {contract::io::kTextQuery, {DType::kFloat32, {1, k, nq, hidden}, query.data()}},
                               {contract::io::kTextQueryMask, {DType::kBool, {1, k}, query_mask.data()}},
                               {contract::io::kMaskQueryIndex, {DType::kInt64, {1, num_queries}, query_index.data()}}},
                              {}, {contract::io::kLogits, contract::io::kPredBoxes, contract::io::kPredMasks});
          logits.push_back(to_array(out[0]));
          boxes.push_back(to_array(out[1]));
          masks.push_back(to_array(out[2]));
        }
      }
      // One chunk per decoder call, stacked: [chunks, ...] without the batch axis.
      auto stack = [](const std::vector<Array>& parts) {
        std::vector<int64_t> shape = parts[0].shape;
        shape[0] = static_cast<int64_t>(parts.size());
        Array out = Array::make(parts[0].type, shape);
        size_t offset = 0;
        for (const Array& a : parts) {
          if (a.shape != parts[0].shape) throw EngineError("det: decoder calls returned different shapes");
          std::memcpy(static_cast<char*>(out.data.get()) + offset, a.data.get(), a.bytes());
          offset += a.bytes();
        }
        return out;
      };
      Array all_logits = stack(logits), all_boxes = stack(boxes), all_masks = stack(masks);
      result.decoders[kObjectDecoder] = {{contract::io::kLogits, all_logits}, {contract::io::kPredBoxes, all_boxes},
                                         {contract::io::kPredMasks, all_masks}};
      std::vector<ObjectGroup> object_groups;
      for (const DecoderGroup& dg : groups) object_groups.push_back({dg.link.kind, label_of(dg.link.position), dg.index});
      StageTimer t(result, "postprocess");
      object_results(all_logits, all_boxes, all_masks, object_groups, max_groups, det.resized_hw, f.width, f.height,
                     post, result);
    }
  }
  if (decoders.count(kPoseDecoder)) {
    const DecoderGroups pose_groups = router->groups_for(kPoseDecoder);
    std::vector<const LinkGroup*> objects;
    for (const DecoderGroup& g : pose_groups.at(0).second) objects.push_back(&g.link);
    if (objects.empty()) {
      for (const LinkGroup& g : history) objects.push_back(&g);
    }
    const std::vector<DecoderGroup>& keypoints = pose_groups.at(1).second;
    if (!keypoints.empty() && !objects.empty()) {
      const DetectionInput& det = frame_detection_input(f, o);
      const GraphEntry& g = graph(contract::graph::kPose);
      const int64_t max_keypoints = fact_int(g, "max_keypoints", 68);
      constexpr int64_t kSlots = 100;
      if (static_cast<int64_t>(objects.size()) > kSlots || static_cast<int64_t>(keypoints.size()) > max_keypoints) {
        throw InputError("the keypoint decoder takes at most 100 object and " + std::to_string(max_keypoints) +
                         " keypoint groups, got " + std::to_string(objects.size()) + " and " +
                         std::to_string(keypoints.size()));
      }
      const int64_t nq = keypoints[0].link.num_queries;
      const size_t group = static_cast<size_t>(nq * hidden);
      std::vector<float> obj(static_cast<size_t>(kSlots) * group, 0.f), kpt(static_cast<size_t>(kSlots) * group, 0.f);
      std::vector<uint8_t> om(kSlots, 0), km(kSlots, 0);
      for (size_t i = 0; i < objects.size(); ++i) {
        const std::vector<float>& states = *objects[i]->states;
        if (states.size() != group) throw InputError("pose: an object group has the wrong number of states");
        std::copy(states.begin(), states.end(), obj.begin() + i * group);
        om[i] = 1;
      }
      for (size_t i = 0; i < keypoints.size(); ++i) {
        std::copy(keypoints[i].link.states->begin(), keypoints[i].link.states->end(), kpt.begin() + i * group);
        km[i] = 1;
      }
      std::vector<Tensor> out;
      {
        StageTimer t(result, "pose_decoder");
        out = engine(contract::graph::kPose)
                  .run({{contract::io::kPixelValues, {DType::kFloat32, det.pixel_values.shape, det.pixel_values.data.get()}},
                        {contract::io::kPixelMask, {DType::kBool, det.pixel_mask.shape, det.pixel_mask.data.get()}},
                        {contract::io::kObjectQuery, {DType::kFloat32, {1, kSlots, nq, hidden}, obj.data()}},
                        {contract::io::kObjectQueryMask, {DType::kBool, {1, kSlots}, om.data()}},
                        {contract::io::kKeypointQuery, {DType::kFloat32, {1, kSlots, nq, hidden}, kpt.data()}},
                        {contract::io::kKeypointQueryMask, {DType::kBool, {1, kSlots}, km.data()}}},
                       {}, {contract::io::kPredLogits, contract::io::kPredBoxes, contract::io::kPredKeypoints});
      }
      Array pl = to_array(out[0]), pb = to_array(out[1]), pk = to_array(out[2]);
      result.decoders[kPoseDecoder] = {{contract::io::kPredLogits, pl}, {contract::io::kPredBoxes, pb},
                                       {contract::io::kPredKeypoints, pk}};
      std::vector<std::string> object_labels, keypoint_names;
      for (const LinkGroup* g : objects) object_labels.push_back(label_of(g->position));
      for (const DecoderGroup& k : keypoints) keypoint_names.push_back(label_of(k.link.position));
      StageTimer t(result, "postprocess");
      pose_results(pl, pb, pk, object_labels, keypoint_names, {det.pixel_values.shape[2], det.pixel_values.shape[3]},
                   det.resized_hw, f.width, f.height, post, result);
    }
  }
  for (const std::string& kind : contract::generation_kinds()) {
    if (!decoders.count(kind)) continue;
    const std::vector<DecoderGroup> groups = router->groups_for(kind).at(0).second;
    if (groups.empty()) continue;
    StageTimer t(result, kind + "_decoder");
    diffusion(kind, groups, f, o, result);
  }
}

void Pipeline::Impl::diffusion(const std::string& kind, const std::vector<DecoderGroup>& groups, const Frame& f,
                               const RunOptions& o, Result& result) {
  const int64_t n = static_cast<int64_t>(groups.size());
  const int64_t nq = groups[0].link.num_queries;
  std::vector<float> states;
  for (const DecoderGroup& g : groups) states.insert(states.end(), g.link.states->begin(), g.link.states->end());
  const std::string mapper = kind + contract::graph::kMapperSuffix;
  auto mapped = engine(mapper).run({{contract::io::kLinkStates, {DType::kFloat32, {n, nq, hidden}, states.data()}}}, {},
                                   {contract::io::kConditioning});
  Array cond = to_array(mapped[0]);
  auto& raw = result.decoders[kind];
  raw[contract::io::kConditioning] = cond;
  if (!o.decode_images) return;

  const std::string unet_name = kind + contract::graph::kUnetSuffix;
  const GraphEntry& unet_graph = graph(unet_name);
  const int64_t latent = fact_int(unet_graph, "latent_size");
  const auto uncond_ref = manifest.extra_files.find(kind + "_uncond");
  if (uncond_ref == manifest.extra_files.end()) {
    throw ArtifactError(manifest.manifest_file.string() + ": extra_files." + kind + "_uncond: missing (needed by [" +
                        kind + "])");
  }
  std::string uncond_name = contract::kUncondTensor;
  if (const auto it = unet_graph.facts.find("uncond_tensor"); it != unet_graph.facts.end() && it->is_string()) {
    uncond_name = it->get<std::string>();
  }
  const Tensor uncond = SafetensorsFile(uncond_ref->second.path).to_float32(uncond_name);

  const std::vector<int64_t> noise_shape = {n, 4, latent, latent};
  Array noise;
  if (o.noise) {
    if (o.noise->shape != noise_shape || o.noise->type != Array::Type::kFloat32) {
      throw InputError("noise: expected float32 of shape " + shape_text(noise_shape) + ", got " +
                       shape_text(o.noise->shape));
    }
    noise = *o.noise;
  } else {
    const std::vector<float> drawn = seeded_normal(o.seed, element_count(noise_shape));
    noise = float_array(drawn.data(), noise_shape);
  }
  std::vector<float> image_latents;
  if (kind == "edit") {
    if (f.image.empty()) throw InputError("[EDIT] needs an input image");
    const int64_t size = fact_int(unet_graph, "image_size");
    std::vector<uint8_t> resized(static_cast<size_t>(size * size * 3));
    resize_rgb(image_view(f.image), size, size, ResampleFilter::kBicubic, resized.data());
    std::vector<float> chw(static_cast<size_t>(3 * size * size));
    for (int64_t c = 0; c < 3; ++c) {
      for (int64_t i = 0; i < size * size; ++i) chw[static_cast<size_t>(c * size * size + i)] = resized[static_cast<size_t>(i * 3 + c)] / 255.0f;
    }
    auto enc = engine(kind + contract::graph::kVaeEncoderSuffix)
                   .run({{contract::io::kImages, {DType::kFloat32, {1, 3, size, size}, chw.data()}}}, {}, {contract::io::kLatents});
    const Tensor one = to_float(enc[0]);
    for (int64_t i = 0; i < n; ++i) image_latents.insert(image_latents.end(), one.data_as<float>(), one.data_as<float>() + one.numel());
  }
  Engine& unet = engine(unet_name);
  const UNetFn unet_fn = [&unet](const TensorView& sample, const TensorView& timestep, const TensorView& context,
                                 const TensorView& noise_pred) {
    unet.run({{contract::io::kSample, sample}, {contract::io::kTimestep, timestep},
              {contract::io::kEncoderHiddenStates, context}},
             {{contract::io::kNoisePred, noise_pred}}, {});
  };
  const auto scheduler = unet_graph.facts.find("scheduler");
  if (scheduler == unet_graph.facts.end()) {
    throw ArtifactError(manifest.manifest_file.string() + ": graphs." + unet_name + ".facts.scheduler: missing");
  }
  const DDIMConfig config = DDIMConfig::from_facts(*scheduler);
  std::optional<TensorView> image_view_latents;
  if (!image_latents.empty()) image_view_latents = TensorView{DType::kFloat32, noise_shape, image_latents.data()};
  const Tensor latents =
      denoise(unet_fn, {DType::kFloat32, cond.shape, cond.data.get()}, uncond.view(),
              {DType::kFloat32, noise_shape, noise.data.get()}, manifest.generation.diffusion_steps,
              manifest.generation.guidance_scale, image_view_latents, manifest.generation.image_guidance_scale, config);
  auto decoded = engine(kind + contract::graph::kVaeDecoderSuffix)
                     .run({{contract::io::kLatents, latents.view()}}, {},
                          {contract::io::kImages});
  Array images = to_array(decoded[0]);
  raw["noise"] = noise;  // the initial latents (not a graph tensor)
  raw[contract::io::kLatents] = to_array(latents);
  raw[contract::io::kImages] = images;
  for (Array& im : images_to_uint8(images)) result.images.push_back(std::move(im));
}

// --- requests -------------------------------------------------------------------------------------------------

Result Pipeline::Impl::run(const Image& image, const std::string& prompt, const RunOptions& o,
                           const TextCallback& on_text) {
  if (o.max_new_tokens <= 0) throw InputError("max_new_tokens must be positive, got " + std::to_string(o.max_new_tokens));
  if (o.do_sample && o.temperature <= 0) {
    throw InputError("temperature must be positive when sampling, got " + std::to_string(o.temperature));
  }
  const auto start = Clock::now();
  Result result;
  Frame& f = frame_for(image, o, result);
  Sequence seq;
  {
    StageTimer t(result, "tokenize");
    seq = sequence(f, prompt, o);
  }
  const int64_t markers = std::count(seq.ids.begin(), seq.ids.end(), region_id);
  if (markers != f.num_regions) {
    throw InputError("the prompt has " + std::to_string(markers) + " <region> marker(s) but " +
                     std::to_string(f.num_regions) + " region(s) were given");
  }
  Prefilled pre = prefill(seq, f, result);
  std::string stop = seq.forced ? "eos" : "length";
  if (!seq.forced) stop = decode(seq, std::move(pre.last_logits), o, result, on_text);
  const std::string text = answer_text(seq.ids, static_cast<size_t>(seq.answer_start));
  const auto label_list = label_groups(text, prompt, o.instruction);
  const std::vector<LinkGroup>& links = router->links();
  std::map<int64_t, std::string> labels;
  for (size_t i = 0; i < links.size() && i < label_list.size(); ++i) labels[links[i].position] = label_list[i].second;
  // A pose answer's objects from an earlier turn are labelled by that turn's answer.
  if (!pre.history_objects.empty()) {
    std::vector<std::string> names;
    for (const std::string& answer : seq.history_answers) {
      for (const auto& [kind, label] : label_groups(answer, seq.question, std::nullopt)) {
        if (kind == "det") names.push_back(label);
      }
    }
    for (size_t i = 0; i < pre.history_objects.size() && i < names.size(); ++i) {
      labels[pre.history_objects[i].position] = names[i];
    }
  }
  dispatch(f, labels, pre.history_objects, o, result);
  result.text = text;
  result.token_ids = answer_tokens(seq.ids, static_cast<size_t>(seq.answer_start));
  result.stop_reason = stop;
  for (const LinkGroup& g : links) {
    const auto it = labels.find(g.position);
    result.links.push_back({g.kind, it == labels.end() ? "" : it->second, g.position,
                            float_array(g.states->data(), {g.num_queries, g.hidden})});
  }
  result.input_ids = seq.ids;
  add_timing(result, "total", ms_since(start));
  return result;
}

Result Pipeline::run(const Image& image, const std::string& prompt, const RunOptions& options,
                     const TextCallback& on_text) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->run(image, prompt, options, on_text);
}

Result Pipeline::detect(const Image& image, const std::vector<std::string>& classes, RunOptions options) {
  const templates::TaskTemplate t = templates::detection(classes);
  options.answer = t.answer;
  return run(image, t.question, options);
}

Result Pipeline::ground(const Image& image, const std::string& phrase, RunOptions options) {
  const templates::TaskTemplate t = templates::grounding(phrase);
  options.answer = t.answer;
  return run(image, t.question, options);
}

Result Pipeline::segment(const Image& image, const std::vector<std::string>& classes, RunOptions options) {
  const templates::TaskTemplate t = templates::segmentation(classes);
  options.answer = t.answer;
  return run(image, t.question, options);
}

Result Pipeline::pose(const Image& image, const std::vector<std::string>& keypoint_names,
                      const std::vector<std::string>& objects, RunOptions options) {
  const templates::TaskTemplate t = templates::pose(keypoint_names, objects);
  options.history = t.history;
  options.answer = t.answer;
  return run(image, t.question, options);
}

Result Pipeline::generate_image(const std::string& prompt, RunOptions options) {
  const templates::TaskTemplate t = templates::generation(prompt);
  options.answer = t.answer;
  options.instruction = prompt;
  return run(Image(), t.question, options);
}

Result Pipeline::edit_image(const Image& image, const std::string& instruction, RunOptions options) {
  const templates::TaskTemplate t = templates::editing(instruction);
  options.answer = t.answer;
  options.instruction = instruction;
  return run(image, t.question, options);
}

Chat Pipeline::chat(const Image& image, RunOptions defaults) {
  return Chat(*this, Image::rgb(image.data(), image.width(), image.height()), std::move(defaults));
}

DetectionInput Pipeline::detection_input(const Image& image) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->detection_input(image);
}

int64_t Pipeline::context_capacity() const { return impl_->arena->capacity(); }
int64_t Pipeline::context_length() const { return impl_->arena->length(); }
int64_t Pipeline::arena_bytes() const {
  const KVArena& a = *impl_->arena;
  return 2 * a.num_layers() * a.capacity() * static_cast<int64_t>(a.row_bytes());
}
const std::string& Pipeline::artifact_dir() const { return impl_->dir; }

std::vector<std::string> Pipeline::components() const {
  std::vector<std::string> out;
  for (const auto& [component, graphs] : contract::component_graphs()) {
    if (std::all_of(graphs.begin(), graphs.end(), [&](const std::string& g) { return impl_->manifest.has_graph(g); })) {
      out.push_back(component);
    }
  }
  return out;
}

Result Chat::ask(const std::string& prompt, const TextCallback& on_text) { return ask(prompt, defaults_, on_text); }

Result Chat::ask(const std::string& prompt, const RunOptions& options, const TextCallback& on_text) {
  RunOptions o = options;
  o.history = history_;
  Result r = pipeline_->run(image_, prompt, o, on_text);
  history_.emplace_back(prompt, r.text);
  return r;
}

}  // namespace vle
