// vle-run: one request on an exported artifact, printed as `visionllm-edge run` prints it. A program on the
// public C++ API alone (no Python):
//   vle-run ARTIFACT --image FILE --prompt TEXT [--region x0,y0,x1,y1 | x,y]... [--answer-prefix TEXT]
//           [--max-new-tokens N] [--threads N] [--providers A,B] [--max-context N] [--backend NAME]
//           [--fp16] [--engine-cache DIR] [--device-id N]
//           [--seed S] [--sample] [--temperature T] [--top-k K] [--top-p P] [--repetition-penalty R]
//           [--json OUT] [--timings] [--save-images DIR]
// --json writes the same document as `visionllm-edge run --json`; --save-images writes the generated
// images of [GEN] / [EDIT] as DIR/image_<i>.png.
#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#define STB_IMAGE_WRITE_IMPLEMENTATION
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wunused-function"
#include <stb/stb_image_write.h>
#pragma GCC diagnostic pop

#include <visionllm_edge/pipeline.h>

// The one private helper vle-run shares with the library: Python's repr of a label, so that the output
// matches `visionllm-edge run` character for character.
#include "text/utf8.h"

namespace {

constexpr const char* kUsage =
    "usage: vle-run ARTIFACT --image FILE --prompt TEXT [--region x0,y0,x1,y1 | x,y]... [--answer-prefix TEXT]\n"
    "               [--max-new-tokens N] [--threads N] [--providers A,B] [--max-context N] [--backend NAME]\n"
    "               [--fp16] [--engine-cache DIR] [--device-id N]\n"
    "               [--seed S] [--sample] [--temperature T] [--top-k K] [--top-p P] [--repetition-penalty R]\n"
    "               [--json OUT] [--timings] [--save-images DIR]\n";

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

int run(const Args& a) {
  // The image is read (and refused) before any graph is loaded.
  const vle::Image image = vle::Image::load(a.image);
  vle::Pipeline pipe = vle::Pipeline::load(a.artifact, a.load);
  const vle::Result result = pipe.run(image, a.prompt, a.run);
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
  return 0;
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
  try {
    return run(args);
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
