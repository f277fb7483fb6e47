#include "artifact/json_text.h"

#include "text/utf8.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string_view>

#include "visionllm_edge/errors.h"

namespace vle {

namespace {

bool is_identifier(const std::string& key) {
  if (key.empty()) return false;
  auto alpha = [](char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_'; };
  if (!alpha(key[0])) return false;
  for (char c : key) {
    if (!alpha(c) && !(c >= '0' && c <= '9')) return false;
  }
  return true;
}

// JSON text of a string with every non-ASCII character escaped (as Python's json.dumps writes it).
std::string json_string(const std::string& text) { return OrderedJson(text).dump(-1, ' ', true); }

// The key path of each open object or array while the parser walks the document, so that a repeated key
// is reported where it is.
struct Frame {
  bool object = false;
  std::set<std::string> keys;
  std::string key;   // the key whose value is being read (objects)
  size_t index = 0;  // the item being read (arrays)
  std::string path;  // of this object or array
};

std::string child_path(const std::vector<Frame>& stack) {
  if (stack.empty()) return "";
  const Frame& top = stack.back();
  return top.object ? key_child(top.path, top.key) : key_child(top.path, top.index);
}

void finish_item(std::vector<Frame>& stack) {
  if (!stack.empty() && !stack.back().object) ++stack.back().index;
}

struct RepeatedKey {
  std::string path;
  std::string key;
};

// The word around byte `at` of `text` (letters, signs), to tell NaN and Infinity from other bad literals.
std::string word_at(const std::string& text, size_t at) {
  auto part = [](char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '-' || c == '+'; };
  if (at >= text.size()) return "";
  size_t begin = at, end = at;
  while (begin > 0 && part(text[begin - 1])) --begin;
  while (end < text.size() && part(text[end])) ++end;
  return text.substr(begin, end - begin);
}

}  // namespace

std::string key_child(const std::string& path, const std::string& key) {
  if (!is_identifier(key)) return path + "[" + json_string(key) + "]";
  return path.empty() ? key : path + "." + key;
}

std::string key_child(const std::string& path, size_t index) {
  return path + "[" + std::to_string(index) + "]";
}

std::string number_text(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  // The shortest round-trip digits, in scientific form: [-]d[.ddd]e[+-]x.
  char buf[64];
  const auto result = std::to_chars(buf, buf + sizeof buf, value, std::chars_format::scientific);
  std::string sci(buf, result.ptr);
  std::string sign;
  if (!sci.empty() && sci[0] == '-') {
    sign = "-";
    sci.erase(0, 1);
  }
  const size_t e = sci.find('e');
  std::string digits = sci.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  const int exponent = std::atoi(sci.c_str() + e + 1);
  // Python switches to the exponent form when the decimal point would sit before -4 or after 16 digits.
  if (exponent < -4 || exponent >= 16) {
    std::string out = sign + digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char exp[16];
    std::snprintf(exp, sizeof exp, "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
    return out + exp;
  }
  std::string out;
  if (exponent < 0) {
    out = "0." + std::string(static_cast<size_t>(-exponent - 1), '0') + digits;
  } else if (static_cast<size_t>(exponent) + 1 >= digits.size()) {
    out = digits + std::string(static_cast<size_t>(exponent) + 1 - digits.size(), '0') + ".0";
  } else {
    out = digits.substr(0, static_cast<size_t>(exponent) + 1) + "." +
          digits.substr(static_cast<size_t>(exponent) + 1);
  }
  return sign + out;
}

std::string describe(const OrderedJson& value) {
  std::string kind, text;
  switch (value.type()) {
    case OrderedJson::value_t::null:
      return "null";
    case OrderedJson::value_t::object:
      return "an object";
    case OrderedJson::value_t::array:
      return "an array";
    case OrderedJson::value_t::boolean:
      kind = "a boolean";
      text = value.get<bool>() ? "true" : "false";
      break;
    case OrderedJson::value_t::number_integer:
    case OrderedJson::value_t::number_unsigned:
      kind = "an integer";
      text = value.dump();
      break;
    case OrderedJson::value_t::number_float:
      kind = "a number";
      text = number_text(value.get<double>());
      break;
    case OrderedJson::value_t::string:
      kind = "a string";
      text = value.dump(-1, ' ', true);
      break;
    default:
      return "a binary value";
  }
  if (text.size() > 40) text = text.substr(0, 37) + "...";
  return text + " (" + kind + ")";
}

std::string short_list(const std::vector<std::string>& names, size_t limit) {
  std::string out = "[";
  for (size_t i = 0; i < names.size() && i < limit; ++i) {
    if (i) out += ", ";
    out += utf8::python_repr(names[i]);
  }
  if (names.size() > limit) out += ", ... " + std::to_string(names.size() - limit) + " more";
  return out + "]";
}

std::string joined(const std::vector<std::string>& names, const char* separator) {
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) {
    if (i) out += separator;
    out += names[i];
  }
  return out;
}

OrderedJson parse_json_strictly(const std::string& text, const std::string& source) {
  std::vector<Frame> stack;
  auto callback = [&stack](int /*depth*/, OrderedJson::parse_event_t event, OrderedJson& parsed) {
    switch (event) {
      case OrderedJson::parse_event_t::object_start:
      case OrderedJson::parse_event_t::array_start: {
        Frame frame;
        frame.object = event == OrderedJson::parse_event_t::object_start;
        frame.path = child_path(stack);
        stack.push_back(std::move(frame));
        break;
      }
      case OrderedJson::parse_event_t::key: {
        Frame& top = stack.back();
        const std::string key = parsed.get<std::string>();
        if (!top.keys.insert(key).second) throw RepeatedKey{top.path, key};
        top.key = key;
        break;
      }
      case OrderedJson::parse_event_t::object_end:
      case OrderedJson::parse_event_t::array_end:
        stack.pop_back();
        finish_item(stack);
        break;
      case OrderedJson::parse_event_t::value:
        finish_item(stack);
        break;
    }
    return true;
  };
  try {
    return OrderedJson::parse(text, callback, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const RepeatedKey& repeated) {
    const std::string where = repeated.path.empty() ? "" : repeated.path + ": ";
    throw ArtifactError(source + ": " + where + "invalid JSON: key " + utf8::python_repr(repeated.key) +
                        " appears twice in one object");
  } catch (const OrderedJson::parse_error& e) {
    // nlohmann's text reads "[json.exception.parse_error.101] parse error at line 3, column 16: ...".
    std::string what = e.what();
    const std::string marker = "parse error at ";
    const size_t at = what.find(marker);
    std::string detail = at == std::string::npos ? what : what.substr(at + marker.size());
    std::string position;
    const size_t colon = detail.find(": ");
    if (detail.rfind("line ", 0) == 0 && colon != std::string::npos) {
      position = " at " + detail.substr(0, colon);
      detail = detail.substr(colon + 2);
    }
    const std::string word = e.byte > 0 ? word_at(text, e.byte - 1) : "";
    for (const char* constant : {"NaN", "Infinity", "-Infinity", "+Infinity", "nan", "inf", "-inf"}) {
      if (word == constant) detail = word + " is not a JSON number";
    }
    throw ArtifactError(source + ": invalid JSON" + position + ": " + detail);
  } catch (const OrderedJson::exception& e) {
    // A number too large for a double ("number overflow parsing '1e400'").
    std::string what = e.what();
    const size_t at = what.find("] ");
    throw ArtifactError(source + ": invalid JSON: " + (at == std::string::npos ? what : what.substr(at + 2)));
  }
}

}  // namespace vle
