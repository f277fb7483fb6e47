// ONNX Runtime's session profile (EngineOptions::profile_prefix), read back: how many host<->device copies
// each run made. The GPU check's bar "no Memcpy on the hot path" is that every decode step's run has none.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace vle {

// One run of a copy node. Its bytes (the profile's args.output_size) tell a copy of a few scalars, which a
// decode step may make, from one that moves a tensor the size of the past, which it must not.
struct CopyNode {
  std::string op;    // "MemcpyToHost" or "MemcpyFromHost"
  std::string node;  // the graph node's name (the event's, less "_kernel_time")
  int64_t bytes = 0;
};

// The copy nodes of one Run: ONNX Runtime inserts MemcpyToHost / MemcpyFromHost where a value crosses
// between a device provider and the CPU. to_host and from_host count `nodes` by op.
struct RunCopies {
  int to_host = 0;
  int from_host = 0;
  std::vector<CopyNode> nodes;  // in the profile's order
};

// One entry per "model_run" event of the profile, in time order: the Memcpy kernels that ran inside it.
// A file that is missing or is not a profile (a JSON array of trace events), or a Memcpy kernel without a
// whole-number output_size, is an ArtifactError naming it.
std::vector<RunCopies> profile_copies(const std::filesystem::path& profile_json);

}  // namespace vle
