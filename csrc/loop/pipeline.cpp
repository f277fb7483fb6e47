// The request loop: one artifact folder, one KV arena, one engine per graph, and the steps of a request
// from pixels and prompt to a Result (see the public header for the stages). A Pipeline keeps the last
// frame's encodings and the ids whose KV rows are in the arena, so a new request on the same frame
// recomputes only what differs from the cached prefix. This file: loading, sequences, the LLM, requests;
// frames.cpp: a frame's preprocessing and encoders; dispatch.cpp: the decoders and the diffusion loop.
#include "loop/pipeline_impl.h"

#ifdef VLE_WITH_CUDA
#include "cuda/device.h"
#include "cuda/llm_device.h"
#include "cuda/memory.h"
#endif

namespace vle {

using namespace loop;

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
    require_tensorrt_provider(options.onnxruntime_library, p.dir);
  } else if (options.fp16 || !options.engine_cache.empty()) {
    throw InputError(std::string(options.fp16 ? "fp16" : "engine_cache") +
                     " applies to the tensorrt backend only; the onnxruntime backend runs the graphs in the "
                     "artifact's own precision (export with --precision fp16 for fp16) and caches nothing");
  }
  if (options.device_id < 0) {
    throw InputError("device_id must be a CUDA device index (0 or more), got " + std::to_string(options.device_id));
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

  // A NaN or inf row would flow through the LLM into plausible-looking tokens; refused here, at load.
  const auto check_table = [&](const std::string& key, const std::string& tensor, const float* data, int64_t n) {
    if (const auto bad = first_non_finite(data, n)) {
      throw ArtifactError(m.embeddings.file.path.string() + ": tensor '" + tensor + "' (" + key +
                          ") is not finite: " + non_finite_text(data, *bad, n));
    }
  };
  check_table("embeddings.token_table", m.embeddings.token_table, p.token_rows, p.vocab * p.hidden);
  for (const auto& [kind, table] : p.query_tables) {
    check_table("routing." + kind + ".table", m.embeddings.query_tables.at(m.routing.at(kind).table), table.data(),
                static_cast<int64_t>(table.size()));
  }

  const int64_t cap = options.max_context > 0 ? std::min(options.max_context, m.model.max_context) : m.model.max_context;
  if (options.max_context < 0) throw InputError("max_context must be positive, got " + std::to_string(options.max_context));
  DType kv_dtype = DType::kFloat32;
  if (m.has_graph(contract::graph::kLlm)) {
    const GraphEntry& llm = m.graph(contract::graph::kLlm);
    if (const TensorSpec* spec = llm.input(contract::layer_name(contract::io::kPastKey, 0))) kv_dtype = spec->dtype;
    if (const TensorSpec* spec = llm.input(contract::io::kInputsEmbeds)) p.embed_dtype = spec->dtype;
  }
  try {
    p.arena = std::make_unique<KVArena>(m.model.num_layers, cap, m.model.num_kv_heads, m.model.head_dim,
                                        kv_dtype == DType::kFloat16 ? KVDType::kFloat16 : KVDType::kFloat32);
  } catch (const std::length_error& e) {  // sizes whose bytes overflow, or memory the machine does not have
    throw ArtifactError(m.manifest_file.string() + ": model (num_layers " + std::to_string(m.model.num_layers) +
                        ", num_kv_heads " + std::to_string(m.model.num_kv_heads) + ", head_dim " +
                        std::to_string(m.model.head_dim) + ") with a context of " + std::to_string(cap) +
                        " rows: " + e.what() + "; lower LoadOptions::max_context");
  }

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
  eo.device_id = options.device_id;
  if (!options.profile_dir.empty()) {
    eo.profile_prefix = (std::filesystem::path(options.profile_dir) / name).string();
  }
  if (options.backend == "tensorrt") {
    const GraphEntry& g = manifest.graph(name);
    eo.tensorrt.fp16 = options.fp16;
    eo.tensorrt.precision = g.precision;
    eo.tensorrt.onnx_sha256 = g.sha256;
    eo.tensorrt.profiles = profile_shapes(name, profile_inputs(g), profile_facts(manifest, g));
    const std::filesystem::path root =
        options.engine_cache.empty() ? manifest.artifact_dir / "engines" : std::filesystem::path(options.engine_cache);
    eo.tensorrt.cache_dir = root / name;
  }
  // The manifest's hashes were checked when it was read; a graph made later (most are made by their first
  // request) is hashed again now, so a file replaced in between is refused rather than run.
  if (options.verify_hashes) {
    const GraphEntry& g = manifest.graph(name);
    const std::string actual = file_sha256(g.path);
    if (actual != g.sha256) {
      throw ArtifactError(manifest.manifest_file.string() + ": graphs." + name + ".sha256: " + g.file +
                          ": sha256 mismatch when its engine was made: the manifest says " + g.sha256 +
                          ", the file has " + actual + " (the file changed after the artifact was loaded)");
    }
  }
  auto made = make_engine(options.backend, manifest.graph(name).path, name, eo);
  // The loop builds each call from the manifest's inputs; a graph that takes others (a file swapped for
  // another graph's, hashes and all) is refused here, naming both lists, not at its first call.
  const GraphEntry& g = manifest.graph(name);
  const auto listed = [](const auto& specs) {
    std::vector<std::string> out;
    for (const auto& s : specs) out.push_back(s.name + ":" + dtype_name(s.dtype));
    std::sort(out.begin(), out.end());
    return out;
  };
  if (listed(made->inputs()) != listed(g.inputs)) {
    const auto text = [](const std::vector<std::string>& names) {
      std::string out;
      for (const std::string& n : names) out += (out.empty() ? "" : ", ") + n;
      return "[" + out + "]";
    };
    throw ArtifactError(manifest.manifest_file.string() + ": graphs." + name + ".inputs: " + g.file + " takes " +
                        text(listed(made->inputs())) + ", the manifest says " + text(listed(g.inputs)));
  }
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

LlmState& Pipeline::Impl::llm() {
  if (llm_state) return *llm_state;
  LlmSetup setup;
  setup.engine = &engine(contract::graph::kLlm);
  setup.hidden = hidden;
  setup.vocab = vocab;
  setup.embed_dtype = embed_dtype;
  setup.token_table = {token_rows, {vocab, hidden}};
  setup.query_tables = &query_tables;
  setup.device_id = options.device_id;
#ifdef VLE_WITH_CUDA
  // The device path needs all three: this build's kernels, a GPU, and a session that binds device memory
  // (the CUDA or TensorRT provider). The arena has held nothing yet, so it moves to the GPU empty.
  if (setup.engine->device_io() && cuda::cuda_available(nullptr, options.device_id)) {
    arena = std::make_unique<KVArena>(arena->num_layers(), arena->capacity(), arena->kv_heads(), arena->head_dim(),
                                      arena->dtype(), cuda::device_allocator(options.device_id));
    setup.arena = arena.get();
    llm_state = cuda::make_device_llm(setup);
    return *llm_state;
  }
#endif
  setup.arena = arena.get();
  llm_state = std::make_unique<HostLlm>(setup);
  return *llm_state;
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

  Tensor hidden_states;
  {
    StageTimer t(result, "prefill");
    LlmState& state = llm();  // the first request's makes the llm engine, as part of its prefill
    result.stats["llm_device"] = state.on_device() ? 1.0 : 0.0;
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
    std::vector<int64_t> out_rows;
    for (int64_t r : needed) out_rows.push_back(r - reuse);
    out_rows.push_back(n - 1 - reuse);
    hidden_states = state.prefill(in, out_rows);
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
  return out;
}

std::string Pipeline::Impl::decode(Sequence& seq, const RunOptions& o, Result& result, const TextCallback& on_text) {
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
  LlmState& state = llm();
  state.start_decode(penalized);
  const size_t stream_start = ids.size();
  std::string streamed;
  std::string stop = "length";
  int64_t steps = 0;
  double engine_ms = 0;
  std::vector<double> overheads_us;
  {
    StageTimer t(result, "decode");
    for (int64_t generated = 1; generated <= o.max_new_tokens; ++generated) {
      interruption_point(o, ("at decoding step " + std::to_string(generated)).c_str());
      const auto step_start = Clock::now();
      double step_engine_ms = 0;
      const int64_t token = state.next_token(sampler, params, penalized);
      const StepPlan plan = router->plan(token, arena->length(), arena->capacity(), generated == o.max_new_tokens);
      ids.insert(ids.end(), plan.ids.begin(), plan.ids.end());  // empty when the step does not fit
      if (on_text && !plan.ids.empty()) stream_text(ids, stream_start, streamed, on_text, false);
      if (plan.feed) {
        state.step(plan, *router);
        step_engine_ms = state.last_engine_ms();
        engine_ms += step_engine_ms;
        ++steps;
        if (params.repetition_penalty != 1.0 && penalized_set.insert(token).second) {
          penalized.assign(penalized_set.begin(), penalized_set.end());
          state.penalize(token);
        }
      }
      if (plan.feed) overheads_us.push_back((ms_since(step_start) - step_engine_ms) * 1000.0);
      if (plan.stop != StopReason::kNone) {
        stop = stop_reason_name(plan.stop);
        break;
      }
    }
  }
  if (on_text) stream_text(ids, stream_start, streamed, on_text, true);
  {
    // The super-link hand-off starts here: the device path's link rows come to the host in one copy (the
    // host path observed them at each routing step). Timed as "link" when the answer has links.
    const auto link_start = Clock::now();
    state.finish_decode(*router);
    if (!router->links().empty()) add_timing(result, "link", ms_since(link_start));
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

void Pipeline::Impl::stream_text(const std::vector<int64_t>& ids, size_t start, std::string& streamed,
                                 const TextCallback& on_text, bool last) const {
  const std::string text = answer_text(ids, start);
  // A character that byte-fallback tokens spell over several steps decodes as U+FFFD until its last byte
  // comes: it is held back until then (or the answer ends), else the pieces would keep the U+FFFD that the
  // answer's text no longer has (found by benchmarks/soak.py on tiny-random).
  static const std::string kReplacement = "\xEF\xBF\xBD";
  if (!last && text.size() >= kReplacement.size() &&
      text.compare(text.size() - kReplacement.size(), kReplacement.size(), kReplacement) == 0) {
    return;
  }
  if (text.size() > streamed.size() && text.compare(0, streamed.size(), streamed) == 0) {
    on_text(std::string_view(text).substr(streamed.size()));
  }
  streamed = text;
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
  return std::string(utf8::rstrip(utf8::lstrip(text)));
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

// --- requests -------------------------------------------------------------------------------------------------

namespace {

// Text a user typed (the prompt, the user turns of the history, an instruction): C0 control characters other
// than tab, newline and carriage return, and DEL, are refused; nothing in a chat needs them and the tokenizer
// would make tokens of them. Invalid UTF-8 is the tokenizer's refusal. Answers are not checked: they are the
// model's own text, which a small model fills with anything.
void check_user_text(const std::string& text, const std::string& what) {
  for (size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if ((c < 0x20 && c != '\t' && c != '\n' && c != '\r') || c == 0x7f) {
      throw InputError(what + ": the control character " + utf8::python_repr(std::string(1, text[i])) +
                       " at byte " + std::to_string(i) + " (only tab, newline and carriage return are allowed)");
    }
  }
}

}  // namespace

void Pipeline::Impl::interruption_point(const RunOptions& o, const char* where) {
  if (o.interrupted && o.interrupted()) throw InterruptedError("the request was interrupted " + std::string(where));
}

Result Pipeline::Impl::run(const Image& image, const std::string& prompt, const RunOptions& o,
                           const TextCallback& on_text) {
  check_user_text(prompt, "prompt");
  for (size_t i = 0; i < o.history.size(); ++i) check_user_text(o.history[i].first, "history[" + std::to_string(i) + "]");
  if (o.instruction) check_user_text(*o.instruction, "instruction");
  if (o.max_new_tokens <= 0) throw InputError("max_new_tokens must be positive, got " + std::to_string(o.max_new_tokens));
  if (o.do_sample && o.temperature <= 0) {
    throw InputError("temperature must be positive when sampling, got " + std::to_string(o.temperature));
  }
  const auto start = Clock::now();
  Result result;
  interruption_point(o, "before it started");
  Frame& f = frame_for(image, o, result);
  interruption_point(o, "after its image was encoded");
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
  interruption_point(o, "after prefill");
  std::string stop = seq.forced ? "eos" : "length";
  if (!seq.forced) stop = decode(seq, o, result, on_text);
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
  interruption_point(o, "after decoding");
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

void Pipeline::forget_frame() {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->frame.reset();  // the next frame_for makes a new frame and trims the cached ids to its rule
}

int64_t Pipeline::context_capacity() const { return impl_->arena->capacity(); }
int64_t Pipeline::context_length() const { return impl_->arena->length(); }

std::map<std::string, std::string> Pipeline::end_profiling() {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  std::map<std::string, std::string> files;
  for (auto& [name, engine] : impl_->engines) {
    std::string file = engine->end_profiling();
    if (!file.empty()) files.emplace(name, std::move(file));
  }
  return files;
}

int64_t Pipeline::arena_bytes() const {
  return impl_->arena->total_bytes();
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

std::vector<std::pair<std::string, std::string>> Chat::history() const {
  std::lock_guard<std::mutex> lock(*mutex_);
  return history_;
}

Result Chat::ask(const std::string& prompt, const RunOptions& options, const TextCallback& on_text) {
  std::lock_guard<std::mutex> lock(*mutex_);
  RunOptions o = options;
  o.history = history_;
  Result r = pipeline_->run(image_, prompt, o, on_text);
  history_.emplace_back(prompt, r.text);
  return r;
}

}  // namespace vle
