#include "loop/labels.h"

#include "artifact/contract.h"
#include "text/utf8.h"

#include <cstddef>
#include <string_view>

namespace vle {

namespace {

// --- text as code points ---------------------------------------------------------------------------------


// The UTF-8 bytes of a string as code points, with the byte offset of each (and of the end), so positions
// found on code points map back to UTF-8 substrings. An invalid byte reads as one U+FFFD: the text comes
// from Python str and is valid in practice, and U+FFFD is neither a space nor a letter of any rule.
class Text {
 public:
  explicit Text(std::string_view bytes) : bytes_(bytes) {
    size_t i = 0;
    while (i < bytes.size()) {
      char32_t cp = 0;
      const size_t len = utf8::char_length(bytes, i, &cp);
      const bool valid = len > 0;
      offsets_.push_back(i);
      points_.push_back(valid ? cp : 0xFFFD);
      i += valid ? len : 1;
    }
    offsets_.push_back(bytes.size());
  }

  size_t size() const { return points_.size(); }
  char32_t operator[](size_t i) const { return points_[i]; }
  // Code points [begin, end) as UTF-8.
  std::string_view slice(size_t begin, size_t end) const {
    return bytes_.substr(offsets_[begin], offsets_[end] - offsets_[begin]);
  }

  // The position after the run of spaces starting at `pos` (`pos` itself when there is none).
  size_t skip_spaces(size_t pos, size_t end) const {
    while (pos < end && utf8::is_python_space(points_[pos])) ++pos;
    return pos;
  }

  // Whether `word` (ASCII) is at `pos`, ending by `end`, letters compared as Python's re.IGNORECASE
  // compares them and every other character exactly.
  bool word_at(size_t pos, size_t end, std::string_view word) const {
    if (pos > end || end - pos < word.size()) return false;
    for (size_t i = 0; i < word.size(); ++i) {
      if (!same_letter(word[i], points_[pos + i])) return false;
    }
    return true;
  }

 private:
  static bool same_letter(char pattern, char32_t c) {
    const bool letter = (pattern >= 'a' && pattern <= 'z') || (pattern >= 'A' && pattern <= 'Z');
    if (!letter) return c == static_cast<char32_t>(static_cast<unsigned char>(pattern));
    const char32_t lower = static_cast<char32_t>(pattern | 0x20);
    if (c == lower || c == lower - 0x20) return true;
    // The non-ASCII code points Python's case-insensitive matching takes for ASCII letters.
    return (lower == U'i' && (c == 0x130 || c == 0x131)) || (lower == U's' && c == 0x17F) ||
           (lower == U'k' && c == 0x212A);
  }

  std::string_view bytes_;
  std::u32string points_;
  std::vector<size_t> offsets_;
};

// str.strip(): Unicode whitespace off both ends.
std::string_view strip_spaces(std::string_view s) {
  const Text t(s);
  size_t begin = t.skip_spaces(0, t.size());
  size_t end = t.size();
  while (end > begin && utf8::is_python_space(t[end - 1])) --end;
  return t.slice(begin, end);
}

// str.rstrip(): Unicode whitespace off the end.
std::string_view rstrip_spaces(std::string_view s) {
  const Text t(s);
  size_t end = t.size();
  while (end > 0 && utf8::is_python_space(t[end - 1])) --end;
  return t.slice(0, end);
}

// str.strip(chars) for ASCII `chars` (a byte of a multi-byte UTF-8 sequence is never ASCII).
std::string_view strip_chars(std::string_view s, std::string_view chars) {
  const size_t begin = s.find_first_not_of(chars);
  if (begin == std::string_view::npos) return {};
  return s.substr(begin, s.find_last_not_of(chars) - begin + 1);
}

bool starts_with_at(std::string_view s, size_t pos, std::string_view word) {
  return s.size() - pos >= word.size() && s.compare(pos, word.size(), word) == 0;
}

// The first of `words` at byte `pos` of `s`, or null.
const std::string* one_of_at(std::string_view s, size_t pos, const std::vector<std::string>& words) {
  for (const std::string& w : words) {
    if (starts_with_at(s, pos, w)) return &w;
  }
  return nullptr;
}

// `s` with every placeholder token removed in one left-to-right pass (as re.sub does: text that forms a
// placeholder only once another is removed stays).
std::string remove_placeholders(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    if (const std::string* token = one_of_at(s, i, contract::placeholders())) {
      i += token->size();
    } else {
      out.push_back(s[i++]);
    }
  }
  return out;
}

// --- the three parts of the rule -------------------------------------------------------------------------

// The text after the last delimiter that a left-to-right scan for non-overlapping delimiters finds (in
// " for and x" the scan takes " for " and leaves "and x": not simply the last occurrence of one).
std::string_view after_last_delimiter(std::string_view segment) {
  size_t piece = 0;
  size_t i = 0;
  while (i < segment.size()) {
    if (const std::string* d = one_of_at(segment, i, contract::label_delimiters())) {
      i += d->size();
      piece = i;
    } else {
      ++i;
    }
  }
  return segment.substr(piece);
}

// `<det>phrase</det>` closing the segment (only whitespace after it): the phrase, from the first `<det>`
// on the line of that closing `</det>`, so a phrase may itself hold `</det>` or `<det>` but never a newline.
// Nothing when the segment does not close so.
std::optional<std::string_view> tagged_phrase(std::string_view segment) {
  static constexpr std::string_view kOpen = "<det>";
  static constexpr std::string_view kClose = "</det>";
  const std::string_view body = rstrip_spaces(segment);
  if (body.size() < kClose.size() || body.substr(body.size() - kClose.size()) != kClose) return std::nullopt;
  const size_t close = body.size() - kClose.size();
  const size_t newline = segment.rfind('\n', close);
  const size_t line = newline == std::string_view::npos ? 0 : newline + 1;
  const size_t open = segment.find(kOpen, line);
  if (open == std::string_view::npos || open + kOpen.size() > close) return std::nullopt;
  return segment.substr(open + kOpen.size(), close - open - kOpen.size());
}

// Whether t[begin, end) is exactly "[it|this|that|here][ ws+ it][ ws+ is]" (each part optional; case is
// ignored). At most one reading exists: a word can only begin where the text does not start with a space,
// and "it" and "is" differ, so every part is taken when it is there.
bool is_pointing_words(const Text& t, size_t begin, size_t end) {
  size_t pos = begin;
  if (pos < end && !utf8::is_python_space(t[pos])) {
    bool found = false;
    for (std::string_view w : {"it", "this", "that", "here"}) {
      if (t.word_at(pos, end, w)) {
        pos += w.size();
        found = true;
        break;
      }
    }
    if (!found) return false;
  }
  for (std::string_view w : {"it", "is"}) {
    const size_t word = t.skip_spaces(pos, end);
    if (word > pos && t.word_at(word, end, w)) pos = word + w.size();
  }
  return pos == end;
}

// Whether t[0, end) is a label that points at an object without naming it: an optional "yes", "sure", "ok"
// or "okay" with spaces and at most one comma after it, then pointing words ("", "it", "this is", "here",
// "that it is", ...). The prefix may end anywhere in its run of spaces and comma, so each end is tried.
bool is_pointer_exactly(const Text& t, size_t end) {
  if (is_pointing_words(t, 0, end)) return true;
  for (std::string_view w : {"yes", "sure", "ok", "okay"}) {
    if (!t.word_at(0, end, w)) continue;
    bool comma = false;
    for (size_t pos = w.size();; ++pos) {
      if (is_pointing_words(t, pos, end)) return true;
      if (pos == end) break;
      if (utf8::is_python_space(t[pos])) continue;
      if (t[pos] != U',' || comma) break;
      comma = true;
    }
  }
  return false;
}

// The whole label points rather than names. As Python's `$` does, a final newline may be left over.
bool is_pointer(std::string_view label) {
  const Text t(label);
  const size_t n = t.size();
  return is_pointer_exactly(t, n) || (n > 0 && t[n - 1] == U'\n' && is_pointer_exactly(t, n - 1));
}

bool ends_sentence(char32_t c) { return c == U'?' || c == U'.' || c == U'!'; }
bool ends_phrase(char32_t c) { return ends_sentence(c) || c == U'<' || c == U'>'; }

// The phrase a grounding question asks for: after "locate", "find", "ground", "detect", "where is",
// "where are", "where's", "point to", "segment" or "see" (case ignored), spaces and an optional "the ",
// the shortest run without ?.!<> that is followed by an optional " in the image" clause (" is in",
// "within", "on"; "the", "this"; "image", "picture", "photo"), spaces, and a ?.! or the end. Among the
// readings the first verb of the question wins, then the most spaces after the verb, then taking "the "
// (with the most spaces after it), then the shortest phrase: the order Python's `re.search` tries them in,
// so the result is that of the reference's pattern. Stripped; empty when there is none.
std::string grounding_phrase(std::string_view question) {
  const Text t(question);
  const size_t n = t.size();

  // closes[e]: spaces and then ?.! or the end follow position e.
  std::vector<bool> closes(n + 1);
  for (size_t e = 0; e <= n; ++e) {
    const size_t w = t.skip_spaces(e, n);
    closes[e] = w == n || ends_sentence(t[w]);
  }
  // After the word at `pos` (one of `words`), a run of at least one space: the position after it, or 0.
  auto word_then_spaces = [&](size_t pos, std::initializer_list<std::string_view> words) -> size_t {
    for (std::string_view w : words) {
      if (!t.word_at(pos, n, w)) continue;
      const size_t next = t.skip_spaces(pos + w.size(), n);
      return next > pos + w.size() ? next : 0;
    }
    return 0;
  };
  // The phrase may end at e: closes[e], or the " in the image" clause and then closes.
  auto phrase_may_end = [&](size_t e) -> bool {
    if (closes[e]) return true;
    size_t pos = t.skip_spaces(e, n);
    if (pos == e) return false;
    if (size_t after_is = word_then_spaces(pos, {"is"})) pos = after_is;
    pos = word_then_spaces(pos, {"in", "within", "on"});
    if (pos) pos = word_then_spaces(pos, {"the", "this"});
    if (!pos) return false;
    for (std::string_view w : {"image", "picture", "photo"}) {
      if (t.word_at(pos, n, w)) return closes[pos + w.size()];
    }
    return false;
  };
  // first_end[i]: the smallest e >= i where the phrase may end; stop[i]: the first ?.!<> at or after i.
  std::vector<size_t> first_end(n + 2, n + 1), stop(n + 1, n);
  for (size_t i = n + 1; i-- > 0;) {
    first_end[i] = phrase_may_end(i) ? i : first_end[i + 1];
    if (i < n) stop[i] = ends_phrase(t[i]) ? i : stop[i + 1];
  }
  // The phrase starting at g: the shortest non-empty run without ?.!<> that may end there.
  auto phrase_from = [&](size_t g) -> std::optional<std::string_view> {
    if (g >= n) return std::nullopt;
    const size_t e = first_end[g + 1];
    if (e > stop[g]) return std::nullopt;
    return t.slice(g, e);
  };

  for (size_t start = 0; start < n; ++start) {
    size_t verb_end = 0;
    for (std::string_view v : {"locate", "find", "ground", "detect", "where is", "where are", "where's",
                               "point to", "segment", "see"}) {
      if (t.word_at(start, n, v)) {
        verb_end = start + v.size();
        break;
      }
    }
    if (verb_end == 0) continue;
    const size_t spaces_end = t.skip_spaces(verb_end, n);
    for (size_t p = spaces_end; p > verb_end; --p) {
      if (t.word_at(p, n, "the")) {
        const size_t the_end = p + 3;
        for (size_t g = t.skip_spaces(the_end, n); g > the_end; --g) {
          if (auto phrase = phrase_from(g)) return std::string(strip_spaces(*phrase));
        }
      }
      if (auto phrase = phrase_from(p)) return std::string(strip_spaces(*phrase));
    }
  }
  return {};
}

}  // namespace

std::vector<std::pair<std::string, std::string>> label_groups(const std::string& answer_text,
                                                              const std::string& question,
                                                              const std::optional<std::string>& instruction) {
  const std::string answer = remove_placeholders(answer_text);
  std::string question_spaced = question;
  static constexpr std::string_view kImage = "<image>";
  for (size_t at = question_spaced.find(kImage); at != std::string::npos;
       at = question_spaced.find(kImage, at + 1)) {
    question_spaced.replace(at, kImage.size(), " ");
  }
  const std::string question_text(strip_spaces(question_spaced));

  std::vector<std::pair<std::string, std::string>> out;
  const std::string_view view(answer);
  size_t start = 0;  // end of the previous group
  size_t i = 0;
  while (i < view.size()) {
    const std::pair<std::string, std::string>* token = nullptr;
    for (const auto& t : contract::routing_tokens()) {
      if (starts_with_at(view, i, t.first)) {
        token = &t;
        break;
      }
    }
    if (token == nullptr) {
      ++i;
      continue;
    }
    const std::string_view segment = view.substr(start, i - start);
    start = i = i + token->first.size();
    const std::string& kind = token->second;
    if (kind == "gen" || kind == "edit") {
      out.emplace_back(kind, std::string(strip_spaces(instruction ? *instruction : question_text)));
      continue;
    }
    const std::optional<std::string_view> tagged = tagged_phrase(segment);
    std::string label(strip_spaces(tagged ? *tagged : after_last_delimiter(segment)));
    if (kind == "grd" && is_pointer(strip_chars(label, " ,.:"))) {
      const std::string asked = grounding_phrase(question_text);
      label = asked.empty() ? question_text : asked;
    }
    out.emplace_back(kind, std::string(strip_chars(label, " ,.:")));
  }
  return out;
}

}  // namespace vle
