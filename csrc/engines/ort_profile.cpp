// Reading an ONNX Runtime profile (ort_profile.h). The file is a Chrome trace: a JSON array of events with
// "cat" ("Session" or "Node"), "name", "ts" and "dur" in microseconds, and for nodes "args.op_name" and
// "args.output_size" (the bytes of its outputs, which ONNX Runtime writes as a decimal string). A node's kernel
// is the event named "<node>_kernel_time" (the "_fence_before" / "_fence_after" events are not runs of it); it
// belongs to the model_run whose span holds its start.
#include "engines/ort_profile.h"

#include <algorithm>
#include <charconv>
#include <fstream>
#include <utility>

#include <nlohmann/json.hpp>

#include "visionllm_edge/errors.h"

namespace vle {

std::vector<RunCopies> profile_copies(const std::filesystem::path& profile_json) {
  std::ifstream in(profile_json);
  if (!in) throw ArtifactError(profile_json.string() + ": cannot read the ONNX Runtime profile");
  const nlohmann::json events = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!events.is_array()) {
    throw ArtifactError(profile_json.string() + ": not an ONNX Runtime profile (a JSON array of trace events)");
  }
  auto number = [](const nlohmann::json& e, const char* key) {
    auto it = e.find(key);
    return it != e.end() && it->is_number() ? it->get<int64_t>() : int64_t{-1};
  };
  std::vector<std::pair<int64_t, int64_t>> runs;  // [start, end] of each model_run
  for (const auto& e : events) {
    if (e.is_object() && e.value("cat", "") == "Session" && e.value("name", "") == "model_run") {
      runs.emplace_back(number(e, "ts"), number(e, "ts") + number(e, "dur"));
    }
  }
  std::sort(runs.begin(), runs.end());
  std::vector<RunCopies> out(runs.size());
  const std::string kernel = "_kernel_time";
  for (const auto& e : events) {
    if (!e.is_object() || e.value("cat", "") != "Node") continue;
    const std::string name = e.value("name", "");
    if (name.size() < kernel.size() || name.compare(name.size() - kernel.size(), kernel.size(), kernel) != 0) {
      continue;
    }
    const auto args = e.find("args");
    const std::string op = args != e.end() && args->is_object() ? args->value("op_name", "") : "";
    if (op != "MemcpyToHost" && op != "MemcpyFromHost") continue;
    const std::string node = name.substr(0, name.size() - kernel.size());
    const int64_t ts = number(e, "ts");
    for (size_t r = 0; r < runs.size(); ++r) {
      if (ts >= runs[r].first && ts <= runs[r].second) {
        (op == "MemcpyToHost" ? out[r].to_host : out[r].from_host) += 1;
        // A size that cannot be read would pass the bar on bytes unseen, so it is an error, not 0.
        const auto size = args->find("output_size");
        int64_t bytes = -1;
        if (size != args->end() && size->is_number_integer()) {
          bytes = size->get<int64_t>();
        } else if (size != args->end() && size->is_string()) {
          const std::string& text = size->get_ref<const std::string&>();
          const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), bytes);
          if (ec != std::errc() || end != text.data() + text.size()) bytes = -1;
        }
        if (bytes < 0) {
          throw ArtifactError(profile_json.string() + ": " + op + " node '" + node +
                              "' has no output_size (a whole number of bytes) in its args");
        }
        out[r].nodes.push_back({op, node, bytes});
        break;
      }
    }
  }
  return out;
}

}  // namespace vle
