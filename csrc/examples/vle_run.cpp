// vle-run: one request on an exported artifact, printed as `visionllm-edge run` prints it. A program on the
// public C++ API alone (no Python):
//   vle-run ARTIFACT --image FILE --prompt TEXT [--region x0,y0,x1,y1 | x,y]... [--answer-prefix TEXT]
//           [--max-new-tokens N] [--threads N] [--providers A,B] [--max-context N] [--backend NAME]
//           [--fp16] [--engine-cache DIR] [--device-id N]
//           [--seed S] [--sample] [--temperature T] [--top-k K] [--top-p P] [--repetition-penalty R]
//           [--json OUT] [--timings] [--save-images DIR]
//           [--bench [--warmup W] [--repeat N] [--bench-json OUT]]
// --json writes the same document as `visionllm-edge run --json`; --save-images writes the generated
// images of [GEN] / [EDIT] as DIR/image_<i>.png. --bench runs the request W + N times, each on a fresh frame,
// and prints min / median / p90 / max of every stage of the N measured runs, decode ms/token, peak RSS and
// the KV arena's bytes; --bench-json writes them as one record with the figures named as
// `visionllm-edge bench` names its per-stage summaries. Ctrl-C stops a request at its next step with a
// message and exit status 130.
#include <sys/resource.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#define STB_IMAGE_WRITE_IMPLEMENTATION
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wunused-function"
#include <stb/stb_image_write.h>
#pragma GCC diagnostic pop

#include <nlohmann/json.hpp>
#include <visionllm_edge/pipeline.h>

// The private helpers vle-run shares with the library: Python's repr of a label, so that the output matches
// `visionllm-edge run` character for character; and for --bench the summary statistic the loop's own stats
// use (numpy's), the manifest's model name and sha256, and the ONNX Runtime version.
#include "artifact/files.h"
#include "artifact/manifest.h"
#include "engines/onnxruntime.h"
#include "loop/summary.h"
#include "text/utf8.h"

#ifndef VLE_VERSION
#define VLE_VERSION "unknown"
#endif

namespace {

constexpr const char* kUsage =
    "usage: vle-run ARTIFACT --image FILE --prompt TEXT [--region x0,y0,x1,y1 | x,y]... [--answer-prefix TEXT]\n"
    "               [--max-new-tokens N] [--threads N] [--providers A,B] [--max-context N] [--backend NAME]\n"
    "               [--fp16] [--engine-cache DIR] [--device-id N]\n"
    "               [--seed S] [--sample] [--temperature T] [--top-k K] [--top-p P] [--repetition-penalty R]\n"
    "               [--json OUT] [--timings] [--save-images DIR]\n"
    "               [--bench [--warmup W] [--repeat N] [--bench-json OUT]]\n";

// Detections and poses listed per request; the rest are counted (all of them are in --json).
constexpr size_t kListLimit = 25;

// A command-line mistake: the usage and the message, exit status 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Args {
  std::string artifact, image, prompt;
  std::optional<std::string> json, save_images;
  vle::LoadOptions load;
  vle::RunOptions run;
  bool timings = false;
  bool bench = false;
  long long warmup = 1, repeat = 5;
  std::optional<std::string> bench_json;
};

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t\n\r\f\v");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t\n\r\f\v") - b + 1);
}

double parse_double(const std::string& flag, const std::string& text) {
  const std::string t = trim(text);
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(t.c_str(), &end);
  if (t.empty() || *end != '\0') throw UsageError("argument " + flag + ": invalid float value: '" + text + "'");
  return v;
}

long long parse_int(const std::string& flag, const std::string& text) {
  const std::string t = trim(text);
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(t.c_str(), &end, 10);
  if (t.empty() || *end != '\0' || errno == ERANGE) {
    throw UsageError("argument " + flag + ": invalid int value: '" + text + "'");
  }
  return v;
}

// x,y (a point) or x0,y0,x1,y1 (a box), in pixels.
vle::Region parse_region(const std::string& text) {
  std::vector<double> v;
  size_t start = 0;
  while (true) {
    const size_t comma = text.find(',', start);
    v.push_back(parse_double("--region", text.substr(start, comma == std::string::npos ? std::string::npos : comma - start)));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  if (v.size() == 2) return vle::Region::point(float(v[0]), float(v[1]));
  if (v.size() == 4) return vle::Region::box(float(v[0]), float(v[1]), float(v[2]), float(v[3]));
  throw UsageError("argument --region: --region takes x,y or x0,y0,x1,y1 in pixels, got '" + text + "'");
}

std::vector<std::string> parse_providers(const std::string& text) {
  std::vector<std::string> names;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t comma = text.find(',', start);
    const std::string name = trim(text.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
    if (!name.empty()) names.push_back(name);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return names;
}

Args parse_args(int argc, char** argv) {
  Args a;
  std::vector<std::string> positional;
  std::vector<std::string> bench_flags;  // the options that only --bench reads, as given
  bool have_image = false, have_prompt = false;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError("argument " + flag + ": expected one argument");
      return argv[++i];
    };
    if (flag == "-h" || flag == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (flag == "--image") {
      a.image = value();
      have_image = true;
    } else if (flag == "--prompt") {
      a.prompt = value();
      have_prompt = true;
    } else if (flag == "--region") {
      a.run.regions.push_back(parse_region(value()));
    } else if (flag == "--answer-prefix") {
      a.run.answer_prefix = value();
    } else if (flag == "--max-new-tokens") {
      a.run.max_new_tokens = parse_int(flag, value());
    } else if (flag == "--threads") {
      a.load.threads = static_cast<int>(parse_int(flag, value()));
    } else if (flag == "--providers") {
      a.load.providers = parse_providers(value());
    } else if (flag == "--max-context") {
      a.load.max_context = parse_int(flag, value());
    } else if (flag == "--backend") {
      a.load.backend = value();
      if (a.load.backend != "onnxruntime" && a.load.backend != "tensorrt") {
        throw UsageError("argument --backend: invalid choice: '" + a.load.backend +
                         "' (choose from 'onnxruntime', 'tensorrt')");
      }
    } else if (flag == "--fp16") {
      a.load.fp16 = true;
    } else if (flag == "--engine-cache") {
      a.load.engine_cache = value();
    } else if (flag == "--device-id") {
      a.load.device_id = static_cast<int>(parse_int(flag, value()));
    } else if (flag == "--seed") {
      a.run.seed = static_cast<uint64_t>(parse_int(flag, value()));
    } else if (flag == "--sample") {
      a.run.do_sample = true;
    } else if (flag == "--temperature") {
      a.run.temperature = parse_double(flag, value());
    } else if (flag == "--top-k") {
      a.run.top_k = parse_int(flag, value());
    } else if (flag == "--top-p") {
      a.run.top_p = parse_double(flag, value());
    } else if (flag == "--repetition-penalty") {
      a.run.repetition_penalty = parse_double(flag, value());
    } else if (flag == "--json") {
      a.json = value();
    } else if (flag == "--timings") {
      a.timings = true;
    } else if (flag == "--save-images") {
      a.save_images = value();
    } else if (flag == "--bench") {
      a.bench = true;
    } else if (flag == "--warmup") {
      a.warmup = parse_int(flag, value());
      bench_flags.push_back(flag);
    } else if (flag == "--repeat") {
      a.repeat = parse_int(flag, value());
      bench_flags.push_back(flag);
    } else if (flag == "--bench-json") {
      a.bench_json = value();
      bench_flags.push_back(flag);
    } else if (flag.size() > 1 && flag[0] == '-') {
      throw UsageError("unrecognized arguments: " + flag);
    } else {
      positional.push_back(flag);
    }
  }
  if (positional.size() > 1) throw UsageError("unrecognized arguments: " + positional[1]);
  std::vector<std::string> missing;
  if (positional.empty()) missing.push_back("artifact");
  if (!have_image) missing.push_back("--image");
  if (!have_prompt) missing.push_back("--prompt");
  if (!missing.empty()) {
    std::string list;
    for (const std::string& m : missing) list += (list.empty() ? "" : ", ") + m;
    throw UsageError("the following arguments are required: " + list);
  }
  a.artifact = positional[0];
  if (!a.bench && !bench_flags.empty()) throw UsageError("argument " + bench_flags[0] + ": only with --bench");
  if (a.warmup < 0) throw UsageError("argument --warmup: must be 0 or more, got " + std::to_string(a.warmup));
  if (a.repeat < 1) throw UsageError("argument --repeat: must be at least 1, got " + std::to_string(a.repeat));
  if (a.bench_json) {
    // Refused before the artifact loads and the runs take their time.
    const std::filesystem::path parent = std::filesystem::absolute(*a.bench_json).parent_path();
    if (!std::filesystem::is_directory(parent)) {
      throw UsageError("argument --bench-json: the folder " + parent.string() + " does not exist");
    }
  }
  return a;
}

// --- printing, as `visionllm-edge run` prints ------------------------------------------------------------

// A label as Python's repr() quotes it (the command's output quotes labels that way).
std::string quoted(const std::string& text) { return vle::utf8::python_repr(text); }

int64_t count_nonzero(const vle::Array& a) {
  const auto* bytes = static_cast<const unsigned char*>(a.data.get());
  const size_t size = vle::element_size(a.type);
  int64_t n = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    bool set = false;
    for (size_t b = 0; b < size; ++b) set = set || bytes[i * size + b] != 0;
    n += set;
  }
  return n;
}

// A semantic map's pixels per label; a label listed twice keeps its first place and its last index's count.
std::vector<std::pair<std::string, int64_t>> pixels_per_label(const vle::SemanticMap& s) {
  std::vector<std::pair<std::string, int64_t>> counts;
  const int32_t* map = s.label_map.as<int32_t>();
  const int64_t pixels = s.label_map.empty() ? 0 : s.label_map.numel();
  for (size_t i = 0; i < s.labels.size(); ++i) {
    int64_t n = 0;
    for (int64_t p = 0; p < pixels; ++p) n += map[p] == static_cast<int32_t>(i);
    auto it = std::find_if(counts.begin(), counts.end(), [&](const auto& c) { return c.first == s.labels[i]; });
    if (it == counts.end()) counts.emplace_back(s.labels[i], n);
    else it->second = n;
  }
  return counts;
}

void print_box(const std::array<double, 4>& b) {
  std::printf("[%.1f, %.1f, %.1f, %.1f]", b[0], b[1], b[2], b[3]);
}

void print_summary(const vle::Result& r) {
  if (!r.links.empty()) {
    std::string groups;
    for (const vle::Link& lk : r.links) groups += (groups.empty() ? "" : ", ") + lk.kind + " " + quoted(lk.label);
    std::printf("groups: %s\n", groups.c_str());
  }
  if (!r.detections.empty()) {
    std::printf("detections: %zu\n", r.detections.size());
    for (size_t i = 0; i < r.detections.size() && i < kListLimit; ++i) {
      const vle::Detection& d = r.detections[i];
      std::printf("  %s %s %.3f ", d.kind.c_str(), quoted(d.label).c_str(), d.score);
      print_box(d.box_xyxy);
      if (!d.mask.empty()) std::printf("  mask %lld px", static_cast<long long>(count_nonzero(d.mask)));
      std::printf("\n");
    }
    if (r.detections.size() > kListLimit) std::printf("  ... %zu more\n", r.detections.size() - kListLimit);
  }
  if (r.has_segmentation) {
    std::string line;
    for (const auto& [label, n] : pixels_per_label(r.segmentation)) {
      line += (line.empty() ? "" : ", ") + quoted(label) + " " + std::to_string(n) + " px";
    }
    std::printf("segmentation: %s\n", line.c_str());
  }
  if (!r.poses.empty()) {
    std::printf("poses: %zu\n", r.poses.size());
    for (size_t i = 0; i < r.poses.size() && i < kListLimit; ++i) {
      const vle::Pose& p = r.poses[i];
      std::printf("  %s %.3f ", quoted(p.label).c_str(), p.score);
      print_box(p.box_xyxy);
      std::printf("  %zu keypoints\n", p.keypoint_names.size());
    }
    if (r.poses.size() > kListLimit) std::printf("  ... %zu more\n", r.poses.size() - kListLimit);
  }
  for (size_t i = 0; i < r.images.size(); ++i) {
    std::printf("image %zu: %lldx%lld\n", i, static_cast<long long>(r.images[i].shape[1]),
                static_cast<long long>(r.images[i].shape[0]));
  }
}

void print_timings(const vle::Result& r) {
  // One line per stage, in the order the stages first ran (a stage that ran twice is summed).
  std::vector<std::string> stages;
  for (const auto& [stage, ms] : r.timings_ms) {
    if (std::find(stages.begin(), stages.end(), stage) == stages.end()) stages.push_back(stage);
  }
  std::printf("timings (ms):\n");
  for (const std::string& stage : stages) std::printf("  %-16s %10.1f\n", stage.c_str(), r.timing(stage));
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  out.close();
  if (!out) throw vle::InputError("cannot write " + path + ": " + std::strerror(errno));
}

// Prints a result as `visionllm-edge run` does, with what --json and --save-images ask for.
void report(const Args& a, const vle::Result& result) {
  // The text may hold a NUL (a byte token): written whole, as Python's print writes it.
  std::fwrite(result.text.data(), 1, result.text.size(), stdout);
  std::fputc('\n', stdout);
  std::printf("stop: %s, %zu tokens\n", result.stop_reason.c_str(), result.token_ids.size());
  print_summary(result);
  if (a.timings) print_timings(result);
  if (a.json) {
    write_file(*a.json, result.to_json());
    std::printf("wrote %s\n", a.json->c_str());
  }
  if (a.save_images) {
    std::filesystem::create_directories(*a.save_images);
    for (size_t i = 0; i < result.images.size(); ++i) {
      const vle::Array& im = result.images[i];
      const std::string path = (std::filesystem::path(*a.save_images) / ("image_" + std::to_string(i) + ".png")).string();
      const int w = static_cast<int>(im.shape[1]), h = static_cast<int>(im.shape[0]);
      if (!stbi_write_png(path.c_str(), w, h, 3, im.as<uint8_t>(), w * 3)) {
        throw vle::InputError("cannot write " + path);
      }
      std::printf("wrote %s\n", path.c_str());
    }
  }
}

int run(const Args& a) {
  // The image is read (and refused) before any graph is loaded.
  const vle::Image image = vle::Image::load(a.image);
  vle::Pipeline pipe = vle::Pipeline::load(a.artifact, a.load);
  report(a, pipe.run(image, a.prompt, a.run));
  return 0;
}

// --- --bench ----------------------------------------------------------------------------------------------

using Clock = std::chrono::steady_clock;
using Json = nlohmann::ordered_json;

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// The process's peak resident set in bytes and where it was read: VmHWM in /proc/self/status where there
// is one, else getrusage's ru_maxrss (KiB on Linux).
std::pair<int64_t, std::string> peak_rss() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return {std::stoll(line.substr(6)) * 1024, "VmHWM"};
  }
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return {static_cast<int64_t>(usage.ru_maxrss) * 1024, "getrusage"};
}

std::string cpu_model() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    const size_t colon = line.find(':');
    if (line.rfind("model name", 0) == 0 && colon != std::string::npos) return trim(line.substr(colon + 1));
  }
  return "unknown";
}

// Measured values by name, the names in the order they first appeared.
struct Series {
  std::vector<std::string> names;
  std::map<std::string, std::vector<double>> values;
  void add(const std::string& name, double v) {
    if (!values.count(name)) names.push_back(name);
    values[name].push_back(v);
  }
};

Json summary_json(const std::vector<double>& values) {
  const vle::Summary s = vle::summarize(values);
  return {{"min", s.min}, {"median", s.median}, {"p90", s.p90}, {"max", s.max}, {"n", s.n}};
}

void print_row(const std::string& name, const std::vector<double>& values, const std::string& note = "") {
  const vle::Summary s = vle::summarize(values);
  std::printf("  %-22s %10.2f %10.2f %10.2f %10.2f%s\n", name.c_str(), s.min, s.median, s.p90, s.max, note.c_str());
}

Json options_json(const Args& a) {
  std::string providers;
  for (const std::string& p : a.load.providers) providers += (providers.empty() ? "" : ",") + p;
  return {{"image", std::filesystem::absolute(a.image).string()},
          {"prompt", a.prompt},
          {"regions", a.run.regions.size()},
          {"answer_prefix", a.run.answer_prefix ? Json(*a.run.answer_prefix) : Json(nullptr)},
          {"max_new_tokens", a.run.max_new_tokens},
          {"seed", a.run.seed},
          {"sample", a.run.do_sample},
          {"temperature", a.run.temperature},
          {"top_k", a.run.top_k},
          {"top_p", a.run.top_p},
          {"repetition_penalty", a.run.repetition_penalty},
          {"backend", a.load.backend},
          {"providers", a.load.providers},
          {"threads", a.load.threads},
          {"max_context", a.load.max_context},
          {"warmup", a.warmup},
          {"repeat", a.repeat},
          {"fresh_frame_each_run", true}};
}

int bench(const Args& a) {
  const vle::Image image = vle::Image::load(a.image);
  const auto load_start = Clock::now();
  vle::Pipeline pipe = vle::Pipeline::load(a.artifact, a.load);
  const double load_ms = ms_since(load_start);

  Series stages, stats;
  std::vector<double> wall, ms_per_token, engine_ms_per_token;
  Json repetitions = Json::array();
  vle::Result last;
  for (long long i = 0; i < a.warmup + a.repeat; ++i) {
    // A fresh frame each time, so that every run encodes the image (as `visionllm-edge bench` does with a
    // new picture per repetition); the system prompt's KV rows stay, as they do in use.
    pipe.forget_frame();
    const auto start = Clock::now();
    vle::Result r = pipe.run(image, a.prompt, a.run);
    const double ms = ms_since(start);
    if (i >= a.warmup) {
      Json timings = Json::object();
      for (const auto& [stage, unused] : r.timings_ms) {
        if (timings.contains(stage)) continue;  // a stage listed twice is summed by timing()
        timings[stage] = r.timing(stage);
        stages.add(stage, r.timing(stage));
      }
      Json run_stats = Json::object();
      for (const auto& [name, v] : r.stats) {
        run_stats[name] = v;
        stats.add(name, v);
      }
      wall.push_back(ms);
      const auto steps = r.stats.find("decode_steps");
      if (steps != r.stats.end() && steps->second > 0) {
        ms_per_token.push_back(r.timing("decode") / steps->second);
        engine_ms_per_token.push_back(r.stats.at("decode_engine_ms") / steps->second);
      }
      repetitions.push_back({{"wall_ms", ms}, {"timings_ms", timings}, {"stats", run_stats}});
    }
    last = std::move(r);
  }
  report(a, last);

  std::printf("bench: %lld runs after %lld warm-up, each on a fresh frame (ms)\n", a.repeat, a.warmup);
  std::printf("  %-22s %10s %10s %10s %10s\n", "stage", "min", "median", "p90", "max");
  for (const std::string& stage : stages.names) {
    const std::vector<double>& v = stages.values.at(stage);
    const bool every_run = static_cast<long long>(v.size()) == a.repeat;
    print_row(stage, v, every_run ? "" : "  (in " + std::to_string(v.size()) + " runs)");
  }
  print_row("end to end", wall);
  if (!ms_per_token.empty()) {
    print_row("decode ms/token", ms_per_token, "  (decode / decode_steps)");
  } else {
    std::printf("  %-22s no decode step (a forced or one-token answer)\n", "decode ms/token");
  }
  if (stats.values.count("diffusion_step_ms_median")) {
    print_row("diffusion step", stats.values.at("diffusion_step_ms_median"), "  (each run's median step)");
  }
  const auto [rss, rss_source] = peak_rss();
  std::printf("peak RSS %.1f MiB (%s), KV arena %.1f MiB (%lld rows)\n", rss / 1048576.0, rss_source.c_str(),
              pipe.arena_bytes() / 1048576.0, static_cast<long long>(pipe.context_capacity()));

  if (a.bench_json) {
    const vle::Manifest manifest = vle::load_manifest(pipe.artifact_dir(), /*verify_hashes=*/false);
    char date[32];
    const std::time_t now = std::time(nullptr);
    std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
    Json stages_json = Json::object(), stats_json = Json::object();
    for (const std::string& stage : stages.names) stages_json[stage] = summary_json(stages.values.at(stage));
    for (const std::string& name : stats.names) stats_json[name] = summary_json(stats.values.at(name));
    Json decode = nullptr;
    if (!ms_per_token.empty()) {
      decode = {{"ms_per_token", summary_json(ms_per_token)},
                {"engine_ms_per_token", summary_json(engine_ms_per_token)}};
    }
    const Json record = {
        {"kind", "vle-run --bench"},
        {"date", date},
        {"versions",
         {{"visionllm_edge", VLE_VERSION}, {"onnxruntime", vle::onnxruntime_version(a.load.onnxruntime_library)}}},
        {"machine",
         {{"cpu_model", cpu_model()}, {"cores", std::thread::hardware_concurrency()}, {"threads", a.load.threads}}},
        {"artifact",
         {{"path", pipe.artifact_dir()},
          {"model", manifest.model.name},
          {"manifest_sha256", vle::file_sha256(manifest.manifest_file)},
          {"components", pipe.components()}}},
        {"options", options_json(a)},
        {"load_ms", load_ms},
        {"stages_ms", stages_json},
        {"end_to_end_ms", summary_json(wall)},
        {"decode", decode},
        {"stats", stats_json},
        {"memory", {{"peak_rss_bytes", rss}, {"peak_rss_source", rss_source}, {"arena_bytes", pipe.arena_bytes()},
                    {"context_capacity", pipe.context_capacity()}}},
        {"repetitions", repetitions}};
    write_file(*a.bench_json, record.dump(1, ' ', false, Json::error_handler_t::replace) + "\n");
    std::printf("wrote %s\n", a.bench_json->c_str());
  }
  return 0;
}

}  // namespace

namespace {

// SIGINT (Ctrl-C) asks the running request to stop at its next step (RunOptions::interrupted); a second one,
// or one before a request polls (while graphs load), ends the process as SIGINT always does.
std::atomic<bool> g_interrupted{false};

extern "C" void on_sigint(int) {
  if (g_interrupted.exchange(true)) {
    std::signal(SIGINT, SIG_DFL);
    std::raise(SIGINT);
  }
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  try {
    args = parse_args(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "%svle-run: error: %s\n", kUsage, e.what());
    return 2;
  }
  std::signal(SIGINT, on_sigint);
  args.run.interrupted = [] { return g_interrupted.load(); };
  try {
    return args.bench ? bench(args) : run(args);
  } catch (const vle::InterruptedError& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "vle-run: interrupted (SIGINT): %s\n", e.what());
    return 130;  // 128 + SIGINT, as a shell reports a process SIGINT ended
  } catch (const vle::EngineError& e) {  // not the user's doing: said as such
    std::fflush(stdout);
    std::fprintf(stderr, "vle-run: engine error: %s\n", e.what());
    return 1;
  } catch (const vle::Error& e) {  // the artifact, the input or a missing backend: the message says what to fix
    std::fflush(stdout);
    std::fprintf(stderr, "vle-run: error: %s\n", e.what());
    return 2;
  } catch (const std::filesystem::filesystem_error& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "vle-run: error: %s\n", e.what());
    return 2;
  }
}
