// vle::Array and vle::Result: allocation, timings and the JSON document of a result.
//
// The document is built as an ordered nlohmann::json (keys in the order Python's Result.to_dict() writes
// them) and written by a small writer that reproduces Python's json.dumps: ASCII only (\uXXXX escapes,
// surrogate pairs above U+FFFF), floats as Python's repr writes them (the shortest digits that read back to
// the same double, "1e-05" / "1e+16" exponents, "2.0" for whole numbers, NaN and Infinity), "," + newline
// between items when indented and ", " / ": " on one line otherwise. nlohmann's own dump differs in each
// of those, so it is not used for the text.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

#include "visionllm_edge/result.h"

#include "artifact/json_text.h"

namespace vle {

size_t element_size(Array::Type type) {
  switch (type) {
    case Array::Type::kFloat32:
    case Array::Type::kInt32:
      return 4;
    case Array::Type::kInt64:
      return 8;
    case Array::Type::kUInt8:
    case Array::Type::kBool:
      return 1;
  }
  throw std::invalid_argument("element_size: unknown array type " + std::to_string(static_cast<int>(type)));
}

int64_t Array::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

size_t Array::bytes() const { return static_cast<size_t>(numel()) * element_size(type); }

Array Array::make(Type type, std::vector<int64_t> shape) {
  for (int64_t d : shape) {
    if (d < 0) throw std::invalid_argument("Array::make: dimensions must be >= 0, got " + std::to_string(d));
  }
  Array a;
  a.type = type;
  a.shape = std::move(shape);
  // 64-byte aligned, zero-filled; at least one byte so that an array with a zero dimension is not empty().
  const size_t n = std::max<size_t>(a.bytes(), 1);
  constexpr std::align_val_t kAlign{64};
  void* p = ::operator new(n, kAlign);
  std::memset(p, 0, n);
  a.data = std::shared_ptr<void>(p, [](void* q) { ::operator delete(q, kAlign); });
  return a;
}

double Result::timing(const std::string& stage) const {
  double total = 0;
  for (const auto& [name, ms] : timings_ms) {
    if (name == stage) total += ms;
  }
  return total;
}

namespace {

using Json = nlohmann::ordered_json;

// Python's round(x, 3): the correctly rounded decimal (printf rounds the exact binary value, ties to even,
// as Python's dtoa does) read back.
double round_decimal3(double x) {
  if (!std::isfinite(x)) return x;
  char buf[400];
  std::snprintf(buf, sizeof buf, "%.3f", x);
  return std::strtod(buf, nullptr);
}

// NumPy's ndarray.round(3): rint(x * 1000) / 1000 in double.
double round_numpy3(double x) { return std::nearbyint(x * 1000.0) / 1000.0; }

// `a` (any rank) as nested lists of `leaf(value)`.
template <typename T, typename Leaf>
Json nested(const T* data, const std::vector<int64_t>& shape, size_t dim, Leaf leaf) {
  if (dim == shape.size()) return leaf(*data);
  Json list = Json::array();
  int64_t stride = 1;
  for (size_t i = dim + 1; i < shape.size(); ++i) stride *= shape[i];
  for (int64_t i = 0; i < shape[dim]; ++i) list.push_back(nested(data + i * stride, shape, dim + 1, leaf));
  return list;
}

Json keypoints_json(const Array& kp) {
  auto leaf = [](auto v) { return Json(round_numpy3(static_cast<double>(v))); };
  if (kp.empty()) return Json::array();
  switch (kp.type) {
    case Array::Type::kFloat32: return nested(kp.as<float>(), kp.shape, 0, leaf);
    case Array::Type::kInt32: return nested(kp.as<int32_t>(), kp.shape, 0, leaf);
    case Array::Type::kInt64: return nested(kp.as<int64_t>(), kp.shape, 0, leaf);
    case Array::Type::kUInt8: return nested(kp.as<uint8_t>(), kp.shape, 0, leaf);
    case Array::Type::kBool: return nested(kp.as<bool>(), kp.shape, 0, leaf);
  }
  return Json::array();
}

int64_t count_nonzero(const Array& a) {
  const int64_t n = a.numel();
  const auto* bytes = static_cast<const unsigned char*>(a.data.get());
  const size_t size = element_size(a.type);
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    bool set = false;
    for (size_t b = 0; b < size; ++b) set = set || bytes[i * size + b] != 0;
    count += set;
  }
  return count;
}

Json box_json(const std::array<double, 4>& box) { return Json::array({box[0], box[1], box[2], box[3]}); }

Json document(const Result& r) {
  Json links = Json::array();
  for (const Link& lk : r.links) links.push_back({{"kind", lk.kind}, {"label", lk.label}, {"position", lk.position}});
  Json detections = Json::array();
  for (const Detection& d : r.detections) {
    Json j = {{"label", d.label}, {"kind", d.kind}, {"score", d.score}, {"box_xyxy", box_json(d.box_xyxy)},
              {"query_index", d.query_index}};
    if (!d.mask.empty()) j["mask_area"] = count_nonzero(d.mask);
    detections.push_back(std::move(j));
  }
  Json segmentation = nullptr;
  if (r.has_segmentation) {
    const SemanticMap& s = r.segmentation;
    // A label listed twice keeps its first place and the count of its last index, as a Python dict does.
    Json counts = Json::object();
    const int32_t* map = s.label_map.as<int32_t>();
    const int64_t pixels = s.label_map.empty() ? 0 : s.label_map.numel();
    for (size_t i = 0; i < s.labels.size(); ++i) {
      int64_t n = 0;
      for (int64_t p = 0; p < pixels; ++p) n += map[p] == static_cast<int32_t>(i);
      counts[s.labels[i]] = n;
    }
    segmentation = {{"labels", s.labels}, {"pixels_per_label", counts}};
  }
  Json poses = Json::array();
  for (const Pose& p : r.poses) {
    poses.push_back({{"label", p.label}, {"score", p.score}, {"box_xyxy", box_json(p.box_xyxy)},
                     {"keypoints", keypoints_json(p.keypoints)}, {"keypoint_names", p.keypoint_names}});
  }
  Json images = Json::array();
  for (const Array& im : r.images) images.push_back(im.shape);
  // A stage listed twice is one key with the sum of its times.
  Json timings = Json::object();
  for (const auto& [stage, ms] : r.timings_ms) timings[stage] = timings.contains(stage) ? timings[stage].get<double>() + ms : ms;
  for (auto& [stage, ms] : timings.items()) ms = round_decimal3(ms.get<double>());
  return {{"text", r.text},
          {"token_ids", r.token_ids},
          {"stop_reason", r.stop_reason},
          {"links", links},
          {"detections", detections},
          {"segmentation", segmentation},
          {"poses", poses},
          {"images", images},
          {"timings_ms", timings}};
}

// --- the writer ---------------------------------------------------------------------------------------

// A float as Python's json.dumps writes it (NaN and Infinity spelled as JSON extensions).
void write_float(std::string& out, double x) {
  if (std::isnan(x)) {
    out += "NaN";
    return;
  }
  if (std::isinf(x)) {
    out += x < 0 ? "-Infinity" : "Infinity";
    return;
  }
  out += number_text(x);  // Python's repr of a finite float, as json.dumps writes it
}

void write_u_escape(std::string& out, unsigned code) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "\\u%04x", code);
  out += buf;
}

// A JSON string with Python's ensure_ascii escapes; invalid UTF-8 bytes become U+FFFD.
void write_string(std::string& out, const std::string& s) {
  out += '"';
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        default:
          if (c < 0x20 || c == 0x7f) write_u_escape(out, c);
          else out += static_cast<char>(c);
      }
      continue;
    }
    int len = c >= 0xf0 && c < 0xf5 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 && c < 0xe0 ? 2 : 0;
    unsigned code = len == 4 ? c & 0x07 : len == 3 ? c & 0x0f : c & 0x1f;
    bool ok = len > 0 && i + len <= s.size();
    for (int k = 1; ok && k < len; ++k) {
      const unsigned char cc = static_cast<unsigned char>(s[i + k]);
      ok = (cc & 0xc0) == 0x80;
      code = (code << 6) | (cc & 0x3f);
    }
    ok = ok && !(len == 3 && (code < 0x800 || (code >= 0xd800 && code < 0xe000))) &&
         !(len == 4 && (code < 0x10000 || code > 0x10ffff));
    if (!ok) {
      write_u_escape(out, 0xfffd);
      ++i;
      continue;
    }
    i += len;
    if (code >= 0x10000) {
      code -= 0x10000;
      write_u_escape(out, 0xd800 + (code >> 10));
      write_u_escape(out, 0xdc00 + (code & 0x3ff));
    } else {
      write_u_escape(out, code);
    }
  }
  out += '"';
}

void write(std::string& out, const Json& j, int indent, int level) {
  const auto newline = [&](int lvl) {
    out += '\n';
    out.append(static_cast<size_t>(indent) * lvl, ' ');
  };
  switch (j.type()) {
    case Json::value_t::null: out += "null"; return;
    case Json::value_t::boolean: out += j.get<bool>() ? "true" : "false"; return;
    case Json::value_t::number_integer: out += std::to_string(j.get<int64_t>()); return;
    case Json::value_t::number_unsigned: out += std::to_string(j.get<uint64_t>()); return;
    case Json::value_t::number_float: write_float(out, j.get<double>()); return;
    case Json::value_t::string: write_string(out, j.get_ref<const std::string&>()); return;
    case Json::value_t::array:
    case Json::value_t::object: {
      const bool is_object = j.is_object();
      if (j.empty()) {
        out += is_object ? "{}" : "[]";
        return;
      }
      out += is_object ? '{' : '[';
      bool first = true;
      for (auto it = j.begin(); it != j.end(); ++it) {
        if (!first) out += indent >= 0 ? "," : ", ";
        first = false;
        if (indent >= 0) newline(level + 1);
        if (is_object) {
          write_string(out, it.key());
          out += ": ";
        }
        write(out, it.value(), indent, level + 1);
      }
      if (indent >= 0) newline(level);
      out += is_object ? '}' : ']';
      return;
    }
    default:
      throw std::logic_error("Result::to_json: a value of an unexpected JSON type");
  }
}

}  // namespace

std::string Result::to_json(int indent) const {
  std::string out;
  write(out, document(*this), indent, 0);
  return out;
}

}  // namespace vle
