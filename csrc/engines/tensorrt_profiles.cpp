// The profile planner (tensorrt_profiles.h). Each graph kind has its plan: per profile, a range and the reason
// for it for each symbol the kind knows; profile_shapes then fills the graph's inputs from the plan.
#include "engines/tensorrt_profiles.h"

#include <algorithm>
#include <optional>
#include <set>
#include <tuple>
#include <utility>

#include "artifact/contract.h"
#include "artifact/manifest.h"
#include "text/utf8.h"
#include "visionllm_edge/errors.h"

namespace vle {
namespace {

using json = nlohmann::json;

struct Range {
  int64_t min, opt, max;
  std::string why;
};
using Plan = std::map<std::string, Range>;             // symbol -> range
using Plans = std::vector<std::pair<std::string, Plan>>;  // profile name -> plan

// A numeric fact that is present and not zero (a fact of 0 bounds nothing), as an integer; absent otherwise.
std::optional<int64_t> fact(const json& facts, const char* key) {
  if (!facts.is_object()) return std::nullopt;
  auto it = facts.find(key);
  if (it == facts.end() || !(it->is_number() || it->is_boolean())) return std::nullopt;
  const int64_t v = it->is_boolean() ? int64_t{it->get<bool>()} : it->is_number_float()
                                                                      ? static_cast<int64_t>(it->get<double>())
                                                                      : it->get<int64_t>();
  if (v == 0) return std::nullopt;
  return v;
}

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

bool ends_with(const std::string& s, const char* suffix) {
  const std::string t = suffix;
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}

std::string text(int64_t v) { return std::to_string(v); }

// A JSON list the way Python prints it in a message: ['uncond', 'cond'].
std::string list_repr(const json& list) {
  std::string s = "[";
  for (size_t i = 0; i < list.size(); ++i) {
    if (i) s += ", ";
    s += list[i].is_string() ? utf8::python_repr(list[i].get<std::string>()) : list[i].dump();
  }
  return s + "]";
}

// height / width of the decoders' padded image from facts["image_size"]: a static [h, w], or a range
// {min_side, max_side, size_divisibility} whose opt is a 4:3 photo resized the way the detection
// preprocessing does (short side det_short_side, long side capped at det_max_long_side), padded.
std::optional<Plan> image_side_ranges(const json& f) {
  auto size = f.find("image_size");
  if (size == f.end()) return std::nullopt;
  if (size->is_array() && size->size() == 2 && (*size)[0].is_number() && (*size)[1].is_number()) {
    const int64_t h = (*size)[0].get<int64_t>(), w = (*size)[1].get<int64_t>();
    return Plan{{"height", {h, h, h, "static image_size fact"}}, {"width", {w, w, w, "static image_size fact"}}};
  }
  if (!size->is_object() || !size->contains("max_side")) return std::nullopt;
  // A divisibility given as 0 is taken as given (it bounds the minimum side), unlike the facts above.
  const int64_t div = size->contains("size_divisibility")  ? (*size)["size_divisibility"].get<int64_t>()
                      : f.contains("size_divisibility") ? f["size_divisibility"].get<int64_t>()
                                                          : 32;
  const int64_t lo = size->contains("min_side") ? (*size)["min_side"].get<int64_t>() : div;
  const int64_t hi = (*size)["max_side"].get<int64_t>();
  const std::optional<int64_t> short_side = fact(f, "det_short_side");
  const std::optional<int64_t> long_cap = fact(f, "det_max_long_side");
  int64_t opt_h = hi, opt_w = hi;
  std::string why = "image_size " + text(lo) + ".." + text(hi);
  if (short_side) {
    if (div <= 0) {
      throw ArtifactError("facts.image_size: size_divisibility must be positive to pad the image, got " +
                          text(div));
    }
    const int64_t s = *short_side;
    const int64_t long_side = std::min(long_cap.value_or(hi), (s * 4 + 2) / 3);  // ceil(s * 4 / 3)
    opt_h = std::min(hi, std::max(lo, round_up(s, div)));
    opt_w = std::min(hi, std::max(lo, round_up(long_side, div)));
    why += "; opt: a 4:3 image at short side " + text(s) + ", padded to /" + text(div);
  }
  return Plan{{"height", {lo, opt_h, hi, why}}, {"width", {lo, opt_w, hi, why}}};
}

// Two profiles: decode (S = 1 row, up to the 1+N super-link step, on a long past) and prefill (a long S).
Plans llm_plans(const json& f) {
  const std::optional<int64_t> context = fact(f, "max_context");
  if (!context) return {};
  const int64_t cap = *context;
  const std::optional<int64_t> queries = fact(f, "max_link_queries");
  const int64_t rows = std::max<int64_t>(1, queries.value_or(1));
  // A step of S rows on a past of P rows keeps S + P <= max_context, and a step has at least one row.
  const int64_t past_max = std::max<int64_t>(0, cap - 1);
  int64_t decode_s;
  std::string s_why, r_why;
  if (queries) {
    decode_s = std::min(cap, 1 + rows);
    s_why = "decode is 1 row, up to the 1+N super-link step";
    r_why = "the rows one step asks for: the super-link step asks its N=" + text(rows) + " query rows";
  } else {
    decode_s = cap;
    s_why = "decode is 1 row; no routing facts bound the super-link step";
    r_why = "no routing facts; one row per step assumed";
  }
  int64_t prefill_opt;
  std::string opt_why;
  const std::optional<int64_t> tiles = fact(f, "max_tiles"), patches = fact(f, "patches_per_tile");
  if (tiles && patches) {
    prefill_opt = std::min(cap, (*tiles + 1) * *patches + 64);
    opt_why = "the largest image's rows + 64 text rows";
  } else {
    prefill_opt = std::min(cap, kDefaultPrefillOpt);
    opt_why = "a default prompt length";
  }
  Plan decode{{"S", {1, 1, decode_s, s_why}},
              {"P", {0, std::min(past_max, cap / 2), past_max, "past rows 0..max_context-1 (" + text(cap) + ")"}},
              {"R", {1, 1, rows, r_why}}};
  Plan prefill{{"S", {1, prefill_opt, cap, "a prompt of up to max_context rows; opt: " + opt_why}},
               {"P", {0, 0, past_max, "0 for a fresh prompt; a cached prefix or a later turn adds a past"}},
               {"R", {1, 1, rows, r_why}}};
  return {{"decode", std::move(decode)}, {"prefill", std::move(prefill)}};
}

// UNet: the guidance batch; VAE: one image; latent and image sides up to the artifact's image size.
Plans diffusion_plans(const std::string& graph, const json& f) {
  Plan dims;
  if (ends_with(graph, contract::graph::kUnetSuffix)) {
    const json* guidance = nullptr;
    auto batch = f.find("guidance_batch");
    if (batch != f.end() && batch->is_object()) {
      auto states = batch->find("encoder_hidden_states");
      if (states != batch->end() && states->is_array() && !states->empty()) guidance = &*states;
    }
    const int64_t b = guidance ? static_cast<int64_t>(guidance->size()) : 1;
    dims["batch"] = {1, b, b, guidance ? "the guidance batch " + list_repr(*guidance) : "one row"};
  } else {
    dims["batch"] = {1, 1, 1, "one image per request"};
  }
  if (const std::optional<int64_t> latent = fact(f, "latent_size")) {
    const int64_t multiple = fact(f, "latent_multiple").value_or(1);
    const int64_t lo = std::min(*latent, multiple);
    const std::string why =
        "latent side " + text(lo) + "..latent_size (" + text(*latent) + "), multiples of " + text(multiple);
    dims["latent_height"] = dims["latent_width"] = {lo, *latent, *latent, why};
    const int64_t scale = fact(f, "vae_scale_factor").value_or(fact(f, "size_multiple").value_or(1));
    const int64_t side = fact(f, "image_size").value_or(*latent * scale);
    const std::string side_why = "image side " + text(lo * scale) + "..image_size (" + text(side) + ")";
    dims["height"] = dims["width"] = {lo * scale, side, side, side_why};
  }
  return {{"default", std::move(dims)}};
}

Plans dim_plans(const std::string& graph, const json& f) {
  namespace g = contract::graph;
  if (graph == g::kLlm) return llm_plans(f);
  if (graph == g::kVision) {
    const std::optional<int64_t> tiles = fact(f, "max_tiles");
    if (!tiles) return {};
    const int64_t t = *tiles + 1;
    return {{"default", {{"tiles", {1, t, t, "anyres tiles + thumbnail: 1..max_tiles+1 (" + text(t) + ")"}}}}};
  }
  if (graph == g::kRegion) {
    const std::optional<int64_t> given = fact(f, "max_regions");
    const int64_t r = given.value_or(kDefaultMaxRegions);
    return {{"default",
             {{"regions", {1, 1, r, given ? "max_regions fact" : "no fact bounds it; default " + text(r)}}}}};
  }
  if (graph == g::kDet || graph == g::kPose) {
    Plan dims = image_side_ranges(f).value_or(Plan{});
    if (graph == g::kDet) {
      if (const auto groups = fact(f, "max_groups")) {
        dims["groups"] = {1, 1, *groups, "text groups 1..max_groups; opt: one class"};
      }
      if (const auto masks = fact(f, "num_queries")) {
        dims["mask_queries"] = {1, 1, *masks, "masks asked for 1..num_queries"};
      }
    }
    if (dims.empty()) return {};
    return {{"default", std::move(dims)}};
  }
  if (ends_with(graph, g::kMapperSuffix)) {
    const std::optional<int64_t> given = fact(f, "max_link_groups");
    const int64_t n = given.value_or(kDefaultMaxLinkGroups);
    return {{"default",
             {{"groups", {1, 1, n, given ? "max_link_groups fact" : "no fact bounds it; default " + text(n)}}}}};
  }
  if (ends_with(graph, g::kUnetSuffix) || ends_with(graph, g::kVaeDecoderSuffix) ||
      ends_with(graph, g::kVaeEncoderSuffix)) {
    return diffusion_plans(graph, f);
  }
  return {};
}

}  // namespace

ProfileTable profile_shapes(const std::string& graph, const std::vector<ProfileInput>& inputs,
                            const nlohmann::json& facts) {
  ProfileTable table;
  std::set<std::string> symbols;
  for (const ProfileInput& input : inputs) {
    for (size_t axis = 0; axis < input.dims.size(); ++axis) {
      if (input.dims[axis] > 0) continue;
      const bool named = axis < input.symbols.size() && !input.symbols[axis].empty();
      const std::string symbol = named ? input.symbols[axis] : input.name + ":" + std::to_string(axis);
      table.dynamic_inputs[input.name][static_cast<int>(axis)] = symbol;
      symbols.insert(symbol);
    }
  }
  if (symbols.empty()) return table;
  Plans plans = dim_plans(graph, facts.is_object() ? facts : json::object());
  if (plans.empty()) plans.emplace_back("default", Plan{});
  std::set<std::string> unresolved;
  for (const auto& [name, plan] : plans) {
    Profile profile;
    profile.name = name;
    for (const std::string& symbol : symbols) {
      auto it = plan.find(symbol);
      DimRange d;
      if (it != plan.end()) {
        d = {true, it->second.min, it->second.opt, it->second.max, it->second.why};
      } else {
        d.why = "no fact or default for this dim";
        unresolved.insert(symbol);
      }
      profile.dims.emplace(symbol, std::move(d));
    }
    for (const ProfileInput& input : inputs) {
      auto dynamic = table.dynamic_inputs.find(input.name);
      if (dynamic == table.dynamic_inputs.end()) continue;
      ShapeRange shapes;
      for (size_t axis = 0; axis < input.dims.size(); ++axis) {
        auto symbol = dynamic->second.find(static_cast<int>(axis));
        if (symbol == dynamic->second.end()) {
          shapes.min.push_back(input.dims[axis]);
          shapes.opt.push_back(input.dims[axis]);
          shapes.max.push_back(input.dims[axis]);
          continue;
        }
        const DimRange& d = profile.dims.at(symbol->second);
        shapes.min.push_back(d.resolved ? d.min : -1);
        shapes.opt.push_back(d.resolved ? d.opt : -1);
        shapes.max.push_back(d.resolved ? d.max : -1);
      }
      profile.inputs.emplace_back(input.name, std::move(shapes));
    }
    table.profiles.push_back(std::move(profile));
  }
  table.unresolved.assign(unresolved.begin(), unresolved.end());
  return table;
}

nlohmann::json artifact_profile_facts(const Manifest& manifest) {
  json out = json::object();
  if (manifest.model.max_context) out["max_context"] = manifest.model.max_context;
  if (manifest.clip.max_tiles) out["max_tiles"] = manifest.clip.max_tiles;
  if (manifest.clip.patches_per_tile) out["patches_per_tile"] = manifest.clip.patches_per_tile;
  if (!manifest.routing.empty()) {
    int64_t queries = 0;
    for (const auto& [kind, entry] : manifest.routing) queries = std::max(queries, entry.queries);
    out["max_link_queries"] = queries;
  }
  if (manifest.detection.short_side) out["det_short_side"] = manifest.detection.short_side;
  if (manifest.detection.max_long_side) out["det_max_long_side"] = manifest.detection.max_long_side;
  return out;
}

nlohmann::json profile_facts(const Manifest& manifest, const GraphEntry& graph) {
  json out = artifact_profile_facts(manifest);
  if (graph.facts.is_object()) {
    for (auto it = graph.facts.begin(); it != graph.facts.end(); ++it) out[it.key()] = it.value();
  }
  return out;
}

std::vector<ProfileInput> profile_inputs(const GraphEntry& graph) {
  std::vector<ProfileInput> out;
  for (const TensorSpec& spec : graph.inputs) out.push_back({spec.name, spec.dims, spec.symbols});
  return out;
}

nlohmann::json profile_table_json(const ProfileTable& table) {
  json out = {{"dynamic_inputs", json::object()}, {"dims", json::object()}, {"profiles", json::array()},
              {"unresolved", table.unresolved}};
  if (table.profiles.empty()) return out;
  for (const auto& [input, axes] : table.dynamic_inputs) {
    json a = json::object();
    for (const auto& [axis, symbol] : axes) a[std::to_string(axis)] = symbol;
    out["dynamic_inputs"][input] = std::move(a);
  }
  auto size = [](int64_t v) { return v < 0 ? json(nullptr) : json(v); };
  for (const Profile& p : table.profiles) {
    json dims = json::object();
    for (const auto& [symbol, d] : p.dims) {
      dims[symbol] = {{"min", d.resolved ? json(d.min) : json(nullptr)},
                      {"opt", d.resolved ? json(d.opt) : json(nullptr)},
                      {"max", d.resolved ? json(d.max) : json(nullptr)},
                      {"why", d.why}};
    }
    out["dims"][p.name] = std::move(dims);
    json inputs = json::object();
    for (const auto& [name, s] : p.inputs) {
      json shapes = json::object();
      for (const auto& [which, values] : {std::pair<const char*, const std::vector<int64_t>*>{"min", &s.min},
                                          {"opt", &s.opt}, {"max", &s.max}}) {
        json v = json::array();
        for (int64_t x : *values) v.push_back(size(x));
        shapes[which] = std::move(v);
      }
      inputs[name] = std::move(shapes);
    }
    out["profiles"].push_back({{"name", p.name}, {"inputs", std::move(inputs)}});
  }
  return out;
}

}  // namespace vle
