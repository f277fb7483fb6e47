// ONNX Runtime's session profile (EngineOptions::profile_prefix), read back: how many host<->device copies
// each run made. The GPU check's bar "no Memcpy on the hot path" is that every decode step's run has none.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace vle {

// The copy nodes of one Run: ONNX Runtime inserts MemcpyToHost / MemcpyFromHost where a value crosses
// between a device provider and the CPU.
struct RunCopies {
  int to_host = 0;
  int from_host = 0;
};

// One entry per "model_run" event of the profile, in time order: the Memcpy kernels that ran inside it.
// A file that is missing or is not a profile (a JSON array of trace events) is an ArtifactError naming it.
std::vector<RunCopies> profile_copies(const std::filesystem::path& profile_json);

}  // namespace vle
