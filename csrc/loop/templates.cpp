// The task shortcuts' templates (see templates.h).
#include "loop/templates.h"

#include <cstdio>

#include "visionllm_edge/errors.h"

namespace vle {
namespace templates {
namespace {

// One UTF-8 code point at `i` (advancing it), or -1 for a byte that does not start a valid sequence.
long next_code_point(const std::string& s, size_t& i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) {
    ++i;
    return c;
  }
  const int len = c >= 0xf0 && c < 0xf5 ? 4 : c >= 0xe0 && c < 0xf0 ? 3 : c >= 0xc2 && c < 0xe0 ? 2 : 0;
  if (len == 0 || i + len > s.size()) {
    ++i;
    return -1;
  }
  long code = len == 4 ? c & 0x07 : len == 3 ? c & 0x0f : c & 0x1f;
  for (int k = 1; k < len; ++k) {
    const unsigned char cc = static_cast<unsigned char>(s[i + k]);
    if ((cc & 0xc0) != 0x80) {
      ++i;
      return -1;
    }
    code = (code << 6) | (cc & 0x3f);
  }
  i += len;
  return code;
}

// Python's str.isspace().
bool is_space(long c) {
  return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f ||
         c == 0x3000;
}

// Code points Python's repr() escapes (not str.isprintable()): controls, separators other than the space,
// soft hyphen and the format characters of the general punctuation block and the byte-order mark.
bool is_unprintable(long c) {
  return c < 0x20 || (c >= 0x7f && c <= 0xa0) || c == 0xad || (c > 0x20 && is_space(c)) ||
         (c >= 0x200b && c <= 0x200f) || (c >= 0x202a && c <= 0x202e) || (c >= 0x2060 && c <= 0x206f) ||
         c == 0xfeff || (c >= 0xd800 && c <= 0xdfff);
}

std::string join(const std::vector<std::string>& names, const std::string& sep, const std::string& suffix = "") {
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) out += (i ? sep : "") + names[i] + suffix;
  return out;
}

// The names stripped; an InputError when there are none or one is empty.
std::vector<std::string> checked_names(const std::vector<std::string>& given) {
  std::vector<std::string> names;
  bool ok = !given.empty();
  for (const std::string& n : given) {
    names.push_back(python_strip(n));
    ok = ok && !names.back().empty();
  }
  if (!ok) {
    std::vector<std::string> quoted;
    for (const std::string& n : names) quoted.push_back(python_repr(n));
    throw InputError("expected one or more non-empty names, got [" + join(quoted, ", ") + "]");
  }
  return names;
}

std::string without_trailing_dots(std::string s) {
  while (!s.empty() && s.back() == '.') s.pop_back();
  return s;
}

}  // namespace

std::string python_strip(const std::string& text) {
  // Code point boundaries: the first and one past the last code point that is not whitespace.
  size_t begin = text.size(), end = 0;
  for (size_t i = 0; i < text.size();) {
    const size_t at = i;
    const long c = next_code_point(text, i);
    if (!is_space(c)) {
      if (begin == text.size()) begin = at;
      end = i;
    }
  }
  return begin >= end ? std::string() : text.substr(begin, end - begin);
}

std::string python_repr(const std::string& text) {
  const bool has_single = text.find('\'') != std::string::npos;
  const bool has_double = text.find('"') != std::string::npos;
  const char quote = has_single && !has_double ? '"' : '\'';
  std::string out(1, quote);
  for (size_t i = 0; i < text.size();) {
    const size_t at = i;
    const long c = next_code_point(text, i);
    char buf[16];
    if (c == quote || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0) {  // not UTF-8: the byte, as Python shows a surrogate escape
      std::snprintf(buf, sizeof buf, "\\udc%02x", static_cast<unsigned char>(text[at]));
      out += buf;
    } else if (is_unprintable(c)) {
      std::snprintf(buf, sizeof buf, c < 0x100 ? "\\x%02lx" : "\\u%04lx", c);
      out += buf;
    } else {
      out += text.substr(at, i - at);
    }
  }
  return out + quote;
}

TaskTemplate detection(const std::vector<std::string>& classes) {
  const std::vector<std::string> names = checked_names(classes);
  return {{},
          "Can you analyze the image and identify the " + join(names, ", ") + " present?",
          "Yes, here are the results for " + join(names, ", ", "[DET]") + " in the image."};
}

TaskTemplate grounding(const std::string& phrase) {
  const std::string p = checked_names({phrase})[0];
  return {{}, "Where can we locate the " + p + " in the image?", "Yes, it is [GRD]."};
}

TaskTemplate segmentation(const std::vector<std::string>& classes) {
  const std::vector<std::string> names = checked_names(classes);
  return {{},
          "Could you aid me in generating unique masks for every category present in " + join(names, ", ") +
              " in this image?",
          "Yes, here are the results for " + join(names, ", ", "[SEG]") + " in the image."};
}

TaskTemplate pose(const std::vector<std::string>& keypoint_names, const std::vector<std::string>& objects) {
  const std::vector<std::string> names = checked_names(keypoint_names);
  const TaskTemplate det = detection(checked_names(objects));
  return {{{det.question, det.answer}},
          "Can you examine the image and pinpoint the keypoint locations of the " + join(names, ", ") + "?",
          "Utilizing keypoints detection, the image analysis reveals the location of " +
              join(names, ", ", "[POSE]") + "."};
}

TaskTemplate generation(const std::string& caption) {
  const std::string c = checked_names({caption})[0];
  return {{}, "Generate image with caption: " + without_trailing_dots(c) + ".", "Here it is [GEN]."};
}

TaskTemplate editing(const std::string& instruction) {
  const std::string i = checked_names({instruction})[0];
  return {{}, without_trailing_dots(i) + ".", "Here it is [EDIT]."};
}

}  // namespace templates
}  // namespace vle
