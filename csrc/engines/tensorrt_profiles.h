// TensorRT optimization profiles of a graph: the min / opt / max shapes of its dynamic inputs, planned from the
// manifest's symbolic axes and facts (docs/architecture.md §5). The one planner: the TensorRT backend builds
// its provider options from it, and export/trt_report.py reports it (through visionllm_edge._core).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace vle {

struct GraphEntry;
struct Manifest;

// Dimensions no manifest fact bounds get these, and each says so in its `why`.
constexpr int64_t kDefaultMaxRegions = 8;      // regions referred to in one request
constexpr int64_t kDefaultMaxLinkGroups = 4;   // [GEN]/[EDIT] groups one answer sends to a mapper
constexpr int64_t kDefaultPrefillOpt = 512;    // prompt rows to tune prefill for when the image size is unknown

// One graph input as the planner sees it: a dimension is a size (> 0) or dynamic; a dynamic one is named by
// its symbol, or "<input>:<axis>" when it has none (an empty symbol). A size <= 0 counts as dynamic, as the
// ONNX reader gives 0 for an unnamed free dimension.
struct ProfileInput {
  std::string name;
  std::vector<int64_t> dims;
  std::vector<std::string> symbols;  // parallel to dims; empty or "" where there is no symbol
};

// One symbol's range in one profile; `resolved` false when no fact or default bounds it.
struct DimRange {
  bool resolved = false;
  int64_t min = 0, opt = 0, max = 0;
  std::string why;
};

// One input's shapes in one profile; -1 where the dimension's symbol is unresolved.
struct ShapeRange {
  std::vector<int64_t> min, opt, max;
};

struct Profile {
  std::string name;                                         // "default", "decode", "prefill"
  std::map<std::string, DimRange> dims;                     // every symbol of the graph
  std::vector<std::pair<std::string, ShapeRange>> inputs;   // the dynamic inputs, in graph order
};

struct ProfileTable {
  std::map<std::string, std::map<int, std::string>> dynamic_inputs;  // input -> axis -> symbol
  std::vector<Profile> profiles;                                      // none when every input is static
  std::vector<std::string> unresolved;                                // sorted
};

// The profiles of graph `graph` (a contract graph name; another name gets one "default" profile of unresolved
// symbols) over `inputs`, from `facts`: the graph's manifest facts plus the artifact-level numbers
// (max_context, max_tiles, patches_per_tile, max_link_queries, det_short_side, det_max_long_side) that
// profile_facts gathers. The LLM gets two profiles, decode then prefill; every other graph at most one.
ProfileTable profile_shapes(const std::string& graph, const std::vector<ProfileInput>& inputs,
                            const nlohmann::json& facts);

// The artifact-level numbers of a manifest, under the keys profile_shapes reads.
nlohmann::json artifact_profile_facts(const Manifest& manifest);
// A graph's facts for profile_shapes: the artifact-level numbers with the graph's own facts over them.
nlohmann::json profile_facts(const Manifest& manifest, const GraphEntry& graph);
// A manifest graph's inputs for profile_shapes.
std::vector<ProfileInput> profile_inputs(const GraphEntry& graph);

// The table as export/trt_report.py writes it: {"dynamic_inputs": {input: {"axis": symbol}}, "dims":
// {profile: {symbol: {min, opt, max, why}}}, "profiles": [{"name", "inputs": {input: {min, opt, max}}}],
// "unresolved": [...]}, with null for an unresolved size.
nlohmann::json profile_table_json(const ProfileTable& table);

}  // namespace vle
