#include "text/utf8.h"

#include <cstdio>

namespace vle::utf8 {

namespace {

bool continuation(unsigned char b) { return (b & 0xC0) == 0x80; }

}  // namespace

size_t char_length(std::string_view s, size_t pos, char32_t* cp) {
  if (pos >= s.size()) return 0;
  const auto at = [&](size_t i) { return static_cast<unsigned char>(s[pos + i]); };
  const unsigned char b0 = at(0);
  size_t n = 0;
  char32_t value = 0;
  // The second byte's allowed range depends on the first byte: that rules out overlong forms, the
  // surrogates U+D800..U+DFFF and code points past U+10FFFF.
  unsigned char lo = 0x80, hi = 0xBF;
  if (b0 < 0x80) {
    if (cp) *cp = b0;
    return 1;
  } else if (b0 >= 0xC2 && b0 <= 0xDF) {
    n = 2;
    value = b0 & 0x1F;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    n = 3;
    value = b0 & 0x0F;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    n = 4;
    value = b0 & 0x07;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (pos + n > s.size()) return 0;
  const unsigned char b1 = at(1);
  if (b1 < lo || b1 > hi) return 0;
  value = (value << 6) | (b1 & 0x3F);
  for (size_t i = 2; i < n; ++i) {
    if (!continuation(at(i))) return 0;
    value = (value << 6) | (at(i) & 0x3F);
  }
  if (cp) *cp = value;
  return n;
}

std::optional<size_t> first_invalid(std::string_view s) {
  size_t pos = 0;
  while (pos < s.size()) {
    const size_t n = char_length(s, pos);
    if (n == 0) return pos;
    pos += n;
  }
  return std::nullopt;
}

bool is_python_space(char32_t cp) {
  switch (cp) {
    case 0x09: case 0x0A: case 0x0B: case 0x0C: case 0x0D:
    case 0x1C: case 0x1D: case 0x1E: case 0x1F: case 0x20:
    case 0x85: case 0xA0: case 0x1680:
    case 0x2028: case 0x2029: case 0x202F: case 0x205F: case 0x3000:
      return true;
    default:
      return cp >= 0x2000 && cp <= 0x200A;
  }
}

std::string_view lstrip(std::string_view s) {
  size_t pos = 0;
  while (pos < s.size()) {
    char32_t cp = 0;
    const size_t n = char_length(s, pos, &cp);
    if (n == 0 || !is_python_space(cp)) break;
    pos += n;
  }
  return s.substr(pos);
}

std::string_view rstrip(std::string_view s) {
  // Walk forward (UTF-8 is decoded left to right) and remember where the last non-space character ends.
  size_t pos = 0, keep = 0;
  while (pos < s.size()) {
    char32_t cp = 0;
    size_t n = char_length(s, pos, &cp);
    if (n == 0) {  // not reached for valid input; keep such a byte as text
      n = 1;
      keep = pos + 1;
    } else if (!is_python_space(cp)) {
      keep = pos + n;
    }
    pos += n;
  }
  return s.substr(0, keep);
}

std::vector<size_t> char_offsets(std::string_view s) {
  std::vector<size_t> out;
  out.reserve(s.size() + 1);
  size_t pos = 0;
  while (pos < s.size()) {
    out.push_back(pos);
    const size_t n = char_length(s, pos);
    pos += n == 0 ? 1 : n;
  }
  out.push_back(s.size());
  return out;
}

size_t count_chars(std::string_view s, size_t byte_offset) {
  size_t count = 0, pos = 0;
  while (pos < byte_offset && pos < s.size()) {
    const size_t n = char_length(s, pos);
    pos += n == 0 ? 1 : n;
    ++count;
  }
  return count;
}

namespace {

// Code points Python's repr() escapes (not str.isprintable()): controls, separators other than the space,
// soft hyphen and the format characters of the general punctuation block and the byte-order mark.
bool is_unprintable(char32_t c) {
  return c < 0x20 || (c >= 0x7f && c <= 0xa0) || c == 0xad || (c > 0x20 && is_python_space(c)) ||
         (c >= 0x200b && c <= 0x200f) || (c >= 0x202a && c <= 0x202e) || (c >= 0x2060 && c <= 0x206f) ||
         c == 0xfeff || (c >= 0xd800 && c <= 0xdfff);
}

}  // namespace

std::string python_repr(std::string_view text) {
  const bool has_single = text.find('\'') != std::string_view::npos;
  const bool has_double = text.find('"') != std::string_view::npos;
  const char quote = has_single && !has_double ? '"' : '\'';
  std::string out(1, quote);
  for (size_t i = 0; i < text.size();) {
    char32_t c = 0;
    const size_t n = char_length(text, i, &c);
    char buf[16];
    if (n == 0) {  // not UTF-8: the byte, as Python shows a surrogate escape
      std::snprintf(buf, sizeof buf, "\\udc%02x", static_cast<unsigned char>(text[i]));
      out += buf;
      ++i;
      continue;
    }
    if (c == static_cast<char32_t>(quote) || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (is_unprintable(c)) {
      std::snprintf(buf, sizeof buf, c < 0x100 ? "\\x%02lx" : "\\u%04lx", static_cast<unsigned long>(c));
      out += buf;
    } else {
      out += text.substr(i, n);
    }
    i += n;
  }
  return out + quote;
}

}  // namespace vle::utf8
