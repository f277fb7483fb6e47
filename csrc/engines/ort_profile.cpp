// Reading an ONNX Runtime profile (ort_profile.h). The file is a Chrome trace: a JSON array of events with
// "cat" ("Session" or "Node"), "name", "ts" and "dur" in microseconds, and for nodes "args.op_name" and
// "args.output_size" (the bytes of its outputs, which ONNX Runtime writes as a decimal string). A node's kernel
// is the event named "<node>_kernel_time" (the "_fence_before" / "_fence_after" events are not runs of it); it
// belongs to the model_run whose span holds its start.
#include "engines/ort_profile.h"

#include <algorithm>
#include <charconv>
#include <fstream>
#include <set>
#include <utility>

#include <nlohmann/json.hpp>

#include "visionllm_edge/errors.h"

namespace vle {
namespace {

struct Profile {
  nlohmann::json events;
  std::vector<std::pair<int64_t, int64_t>> runs;  // [start, end] of each model_run, in time order

  // The model_run whose span holds `ts`, or -1.
  int run_of(int64_t ts) const {
    for (size_t r = 0; r < runs.size(); ++r) {
      if (ts >= runs[r].first && ts <= runs[r].second) return static_cast<int>(r);
    }
    return -1;
  }
};

int64_t number(const nlohmann::json& e, const char* key) {
  auto it = e.find(key);
  return it != e.end() && it->is_number() ? it->get<int64_t>() : int64_t{-1};
}

Profile read_profile(const std::filesystem::path& profile_json) {
  std::ifstream in(profile_json);
  if (!in) throw ArtifactError(profile_json.string() + ": cannot read the ONNX Runtime profile");
  Profile p;
  p.events = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!p.events.is_array()) {
    throw ArtifactError(profile_json.string() + ": not an ONNX Runtime profile (a JSON array of trace events)");
  }
  for (const auto& e : p.events) {
    if (e.is_object() && e.value("cat", "") == "Session" && e.value("name", "") == "model_run") {
      p.runs.emplace_back(number(e, "ts"), number(e, "ts") + number(e, "dur"));
    }
  }
  std::sort(p.runs.begin(), p.runs.end());
  return p;
}

const std::string kKernel = "_kernel_time";

// A kernel event's node name (less "_kernel_time"), or "" for any other event.
std::string kernel_node(const nlohmann::json& e) {
  if (!e.is_object() || e.value("cat", "") != "Node") return "";
  const std::string name = e.value("name", "");
  if (name.size() <= kKernel.size() || name.compare(name.size() - kKernel.size(), kKernel.size(), kKernel) != 0) {
    return "";
  }
  return name.substr(0, name.size() - kKernel.size());
}

}  // namespace

std::vector<RunCopies> profile_copies(const std::filesystem::path& profile_json) {
  const Profile profile = read_profile(profile_json);
  const nlohmann::json& events = profile.events;
  std::vector<RunCopies> out(profile.runs.size());
  for (const auto& e : events) {
    const std::string node = kernel_node(e);
    if (node.empty()) continue;
    const auto args = e.find("args");
    const std::string op = args != e.end() && args->is_object() ? args->value("op_name", "") : "";
    if (op != "MemcpyToHost" && op != "MemcpyFromHost") continue;
    const int r = profile.run_of(number(e, "ts"));
    if (r < 0) continue;
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
  }
  return out;
}

namespace {

enum class Rule { kMatMul, kConv, kConvTranspose };
enum class RateClass { kFloat, kInt8, kNBits };

struct OpRule {
  Rule rule;
  RateClass rate;
  size_t weight = 1;  // the input holding a convolution's weights
};

const std::map<std::string, OpRule>& op_rules() {
  static const std::map<std::string, OpRule> rules = {
      {"MatMul", {Rule::kMatMul, RateClass::kFloat}},
      {"FusedMatMul", {Rule::kMatMul, RateClass::kFloat}},
      {"Gemm", {Rule::kMatMul, RateClass::kFloat}},
      {"FusedGemm", {Rule::kMatMul, RateClass::kFloat}},
      {"Conv", {Rule::kConv, RateClass::kFloat}},
      {"FusedConv", {Rule::kConv, RateClass::kFloat}},
      {"NhwcFusedConv", {Rule::kConv, RateClass::kFloat}},
      {"ConvTranspose", {Rule::kConvTranspose, RateClass::kFloat}},
      {"MatMulInteger", {Rule::kMatMul, RateClass::kInt8}},
      {"DynamicQuantizeMatMul", {Rule::kMatMul, RateClass::kInt8}},
      {"MatMulIntegerToFloat", {Rule::kMatMul, RateClass::kInt8}},
      {"QLinearMatMul", {Rule::kMatMul, RateClass::kInt8}},
      {"ConvInteger", {Rule::kConv, RateClass::kInt8}},
      {"QLinearConv", {Rule::kConv, RateClass::kInt8, 3}},
      {"MatMulNBits", {Rule::kMatMul, RateClass::kNBits}},
  };
  return rules;
}

// Compute-heavy ops without a rule: reported, so that a floor known to miss work says so.
const std::set<std::string>& uncounted_ops() {
  static const std::set<std::string> ops = {"Einsum", "Attention", "MultiHeadAttention", "GroupQueryAttention",
                                             "DecoderMaskedMultiHeadAttention", "SparseAttention", "LSTM", "GRU",
                                             "RNN"};
  return ops;
}

// args.<key>: [{"<dtype>": [dims]}, ...] as ONNX Runtime writes it; an entry that is not one is empty.
std::vector<std::vector<int64_t>> shapes_of(const nlohmann::json& args, const char* key) {
  std::vector<std::vector<int64_t>> out;
  const auto list = args.find(key);
  if (list == args.end() || !list->is_array()) return out;
  for (const auto& typed : *list) {
    std::vector<int64_t> dims;
    if (typed.is_object() && typed.size() == 1 && typed.begin()->is_array()) {
      for (const auto& d : *typed.begin()) dims.push_back(d.is_number_integer() ? d.get<int64_t>() : -1);
    }
    out.push_back(std::move(dims));
  }
  return out;
}

int64_t product(const std::vector<int64_t>& dims, size_t from = 0) {
  int64_t n = 1;
  for (size_t i = from; i < dims.size(); ++i) n *= dims[i];
  return n;
}

bool known(const std::vector<int64_t>& dims) {
  return !dims.empty() && std::all_of(dims.begin(), dims.end(), [](int64_t d) { return d >= 0; });
}

}  // namespace

std::vector<RunFlops> profile_flops(const std::filesystem::path& profile_json) {
  const Profile profile = read_profile(profile_json);
  std::vector<RunFlops> out(profile.runs.size());
  for (size_t r = 0; r < out.size(); ++r) {
    out[r].ts_us = profile.runs[r].first;
    out[r].dur_us = profile.runs[r].second - profile.runs[r].first;
  }
  for (const auto& e : profile.events) {
    const std::string node = kernel_node(e);
    if (node.empty()) continue;
    const auto args = e.find("args");
    if (args == e.end() || !args->is_object()) continue;
    const std::string op = args->value("op_name", "");
    const int r = profile.run_of(number(e, "ts"));
    if (r < 0) continue;
    const auto rule = op_rules().find(op);
    if (rule == op_rules().end()) {
      if (uncounted_ops().count(op)) out[r].uncounted[op] += 1;
      continue;
    }
    const auto inputs = shapes_of(*args, "input_type_shape");
    const auto outputs = shapes_of(*args, "output_type_shape");
    const OpRule& how = rule->second;
    const size_t need = how.rule == Rule::kMatMul ? 1 : how.weight + 1;
    auto missing = [&](const std::string& what) {
      return ArtifactError(profile_json.string() + ": " + op + " node '" + node + "' has no " + what +
                           " (input_type_shape / output_type_shape with whole dimensions) in its args");
    };
    if (inputs.size() < need || !known(inputs[0]) || (how.rule != Rule::kMatMul && !known(inputs[how.weight]))) {
      throw missing("input shapes");
    }
    if (outputs.empty() || !known(outputs[0])) throw missing("output shape");
    const std::vector<int64_t>& a = inputs[0];
    const std::vector<int64_t>& y = outputs[0];
    int64_t flops = 0;
    if (how.rule == Rule::kMatMul) {
      int64_t k = a.back();
      if (a.size() >= 2 && y.size() >= 2 && a[a.size() - 2] != y[y.size() - 2]) k = a[a.size() - 2];  // A transposed
      flops = 2 * product(y) * k;
    } else {
      const std::vector<int64_t>& w = inputs[how.weight];
      if (w.size() < 2) throw missing("weight shape of rank 2 or more");
      flops = 2 * (how.rule == Rule::kConv ? product(y) : product(a)) * product(w, 1);
    }
    (how.rate == RateClass::kFloat  ? out[r].float_flops
     : how.rate == RateClass::kInt8 ? out[r].int8_flops
                                    : out[r].nbits_flops) += flops;
  }
  return out;
}

}  // namespace vle
