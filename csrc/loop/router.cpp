#include "loop/router.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string_view>
#include <unordered_set>

namespace vle {

// --- routes and the step planner ---------------------------------------------------------------------------

Route::Route(int64_t token_id_, std::string kind_, std::string decoder_,
             std::vector<int64_t> placeholder_ids_, const FloatArrayRef& table)
    : token_id(token_id_),
      kind(std::move(kind_)),
      decoder(std::move(decoder_)),
      placeholder_ids(std::move(placeholder_ids_)),
      num_queries(static_cast<int64_t>(placeholder_ids.size())),
      hidden(0) {
  if (token_id < 0) {
    throw std::invalid_argument("Route: token_id must be non-negative, got " + std::to_string(token_id));
  }
  if (kind.empty() || decoder.empty()) {
    throw std::invalid_argument("Route " + std::to_string(token_id) + ": kind and decoder must be non-empty");
  }
  if (placeholder_ids.empty()) {
    throw std::invalid_argument("Route '" + kind + "': placeholder_ids is empty (N must be positive)");
  }
  require_matrix(table, "Route '" + kind + "': query_table");
  if (table.shape[0] != num_queries || table.shape[1] <= 0) {
    throw std::invalid_argument("Route '" + kind + "': query_table has shape " + format_shape(table.shape) +
                                " for " + std::to_string(num_queries) + " placeholder ids");
  }
  hidden = table.shape[1];
  query_table = std::make_shared<const std::vector<float>>(table.data, table.data + num_queries * hidden);
}

const char* stop_reason_name(StopReason reason) {
  switch (reason) {
    case StopReason::kEos:
      return "eos";
    case StopReason::kLength:
      return "length";
    case StopReason::kNone:
      break;
  }
  return "";
}

SuperLinkRouter::SuperLinkRouter(std::vector<Route> routes, int64_t eos_id)
    : routes_(std::move(routes)), eos_id_(eos_id) {
  if (routes_.empty()) {
    throw std::invalid_argument("SuperLinkRouter: no routes given");
  }
  hidden_ = routes_.front().hidden;
  std::unordered_set<int64_t> routing_ids;
  for (const Route& r : routes_) {
    if (!routing_ids.insert(r.token_id).second) {
      throw std::invalid_argument("SuperLinkRouter: token id " + std::to_string(r.token_id) +
                                  " has more than one route");
    }
    if (r.hidden != hidden_) {
      throw std::invalid_argument("SuperLinkRouter: route '" + r.kind + "' has hidden size " +
                                  std::to_string(r.hidden) + ", route '" + routes_.front().kind + "' has " +
                                  std::to_string(hidden_));
    }
    placeholder_ids_.insert(placeholder_ids_.end(), r.placeholder_ids.begin(), r.placeholder_ids.end());
  }
  if (routing_ids.count(eos_id_)) {
    throw std::invalid_argument("SuperLinkRouter: eos_id " + std::to_string(eos_id_) + " is a routing token");
  }
  std::sort(placeholder_ids_.begin(), placeholder_ids_.end());
  placeholder_ids_.erase(std::unique(placeholder_ids_.begin(), placeholder_ids_.end()),
                         placeholder_ids_.end());
  for (int64_t id : placeholder_ids_) {
    if (routing_ids.count(id) || id == eos_id_) {
      throw std::invalid_argument("SuperLinkRouter: placeholder id " + std::to_string(id) +
                                  " is also a routing token or EOS");
    }
  }
}

int SuperLinkRouter::route_of(int64_t token) const {
  for (size_t i = 0; i < routes_.size(); ++i) {
    if (routes_[i].token_id == token) return static_cast<int>(i);
  }
  return -1;
}

StepPlan SuperLinkRouter::plan(int64_t token, int64_t past_length, int64_t capacity, bool last) const {
  if (past_length < 0 || capacity < past_length) {
    throw std::invalid_argument("SuperLinkRouter.plan: need 0 <= past_length <= capacity, got past_length " +
                                std::to_string(past_length) + ", capacity " + std::to_string(capacity));
  }
  StepPlan p;
  p.token = token;
  p.position = past_length;
  p.hidden = hidden_;
  p.route = route_of(token);
  if (p.route >= 0) {
    const Route& r = routes_[static_cast<size_t>(p.route)];
    p.kind = r.kind;
    p.num_queries = r.num_queries;
    p.query_table = r.query_table;
  }
  if (token == eos_id_) {
    p.ids = {token};
    p.stop = StopReason::kEos;
    return p;
  }
  if (p.route < 0 && last) {
    p.ids = {token};
    p.stop = StopReason::kLength;
    return p;
  }
  const int64_t rows = 1 + p.num_queries;
  if (rows > capacity - past_length) {
    p.stop = StopReason::kLength;
    return p;
  }
  p.feed = true;
  p.rows = rows;
  p.ids.push_back(token);
  if (p.route >= 0) {
    const Route& r = routes_[static_cast<size_t>(p.route)];
    p.ids.insert(p.ids.end(), r.placeholder_ids.begin(), r.placeholder_ids.end());
    for (int64_t i = 1; i <= r.num_queries; ++i) p.output_rows.push_back(i);
  } else {
    p.output_rows.push_back(0);
  }
  if (last) p.stop = StopReason::kLength;
  return p;
}

std::vector<float> SuperLinkRouter::step_embeddings(const StepPlan& plan,
                                                    const FloatArrayRef& token_table) const {
  if (!plan.feed) {
    throw std::invalid_argument("step_embeddings: the plan for token " + std::to_string(plan.token) +
                                " feeds no rows");
  }
  require_matrix(token_table, "token_table", hidden_);
  std::vector<float> out(static_cast<size_t>(plan.rows * hidden_));
  gather_row(token_table, plan.token, out.data(), "token");
  if (plan.query_table) {
    std::memcpy(out.data() + hidden_, plan.query_table->data(), plan.query_table->size() * sizeof(float));
  }
  return out;
}

void SuperLinkRouter::record(const Route& route, int64_t position, const float* states) {
  if (!links_.empty() && position <= links_.back().position) {
    throw std::invalid_argument("observe: a link at position " + std::to_string(position) +
                                " after one at position " + std::to_string(links_.back().position) +
                                "; links are observed in answer order, each once");
  }
  LinkGroup g;
  g.kind = route.kind;
  g.decoder = route.decoder;
  g.position = position;
  g.num_queries = route.num_queries;
  g.hidden = route.hidden;
  g.states = std::make_shared<const std::vector<float>>(states, states + route.num_queries * route.hidden);
  links_.push_back(std::move(g));
}

bool SuperLinkRouter::observe(const StepPlan& plan, const FloatArrayRef& hidden) {
  if (plan.route < 0) return false;
  if (static_cast<size_t>(plan.route) >= routes_.size() ||
      routes_[static_cast<size_t>(plan.route)].token_id != plan.token) {
    throw std::invalid_argument("observe: the plan for token " + std::to_string(plan.token) +
                                " was made by another router");
  }
  if (!plan.feed) {
    throw std::invalid_argument("observe: the plan for routing token " + std::to_string(plan.token) +
                                " was not fed (it did not fit), so it has no query rows");
  }
  const Route& route = routes_[static_cast<size_t>(plan.route)];
  require_matrix(hidden, "hidden", hidden_);
  int64_t offset = 0;
  if (hidden.shape[0] == plan.rows) {
    offset = 1;
  } else if (hidden.shape[0] != route.num_queries) {
    throw std::invalid_argument("observe: hidden must have " + std::to_string(plan.rows) +
                                " rows (the whole step) or " + std::to_string(route.num_queries) +
                                " (its query rows), got shape " + format_shape(hidden.shape));
  }
  record(route, plan.position, hidden.data + offset * hidden_);
  return true;
}

std::vector<int64_t> SuperLinkRouter::prefill_query_rows(const int64_t* ids, int64_t num_ids,
                                                         int64_t start) const {
  std::vector<int64_t> rows;
  for (int64_t pos = std::max<int64_t>(start, 0); pos < num_ids; ++pos) {
    const int r = route_of(ids[pos]);
    if (r < 0) continue;
    const int64_t n = routes_[static_cast<size_t>(r)].num_queries;
    bool followed = pos + n < num_ids;
    for (int64_t i = pos + 1; followed && i <= pos + n; ++i) {
      followed = std::binary_search(placeholder_ids_.begin(), placeholder_ids_.end(), ids[i]);
    }
    if (!followed) {
      throw std::invalid_argument("routing token " + std::to_string(ids[pos]) + " at position " +
                                  std::to_string(pos) + " is not followed by its " + std::to_string(n) +
                                  " placeholder ids");
    }
    for (int64_t i = pos + 1; i <= pos + n; ++i) rows.push_back(i);
  }
  return rows;
}

void SuperLinkRouter::observe_prefill(const int64_t* ids, int64_t num_ids, int64_t start,
                                      const FloatArrayRef& hidden) {
  const std::vector<int64_t> rows = prefill_query_rows(ids, num_ids, start);
  require_matrix(hidden, "hidden", hidden_);
  const bool whole = hidden.shape[0] == num_ids;
  if (!whole && hidden.shape[0] != static_cast<int64_t>(rows.size())) {
    throw std::invalid_argument("observe_prefill: hidden must have " + std::to_string(num_ids) +
                                " rows (the whole sequence) or " + std::to_string(rows.size()) +
                                " (the query rows), got shape " + format_shape(hidden.shape));
  }
  int64_t query_row = 0;
  for (int64_t pos = std::max<int64_t>(start, 0); pos < num_ids; ++pos) {
    const int r = route_of(ids[pos]);
    if (r < 0) continue;
    const Route& route = routes_[static_cast<size_t>(r)];
    const int64_t first = whole ? pos + 1 : query_row;
    record(route, pos, hidden.data + first * hidden_);
    query_row += route.num_queries;
  }
}

DecoderGroups SuperLinkRouter::groups_for(const std::string& decoder) const {
  bool known = false;
  std::string names;
  for (const Route& r : routes_) {
    known = known || r.decoder == decoder;
    const std::string quoted = "'" + r.decoder + "'";
    if (names.find(quoted) == std::string::npos) names += (names.empty() ? "" : ", ") + quoted;
  }
  if (!known) {
    throw std::invalid_argument("groups_for: unknown decoder '" + decoder + "'; the routes name " + names);
  }
  auto collect = [this](auto&& keep) {
    std::vector<DecoderGroup> out;
    for (const LinkGroup& g : links_) {
      if (keep(g)) out.push_back({static_cast<int64_t>(out.size()), g});
    }
    return out;
  };
  // The keypoint decoder attaches its keypoint groups to the answer's [DET] groups (DESIGN.md §3.7, as the
  // reference does); it needs both, so the caller skips it when either list is empty.
  if (decoder == "pose") {
    return {{"objects", collect([](const LinkGroup& g) { return g.kind == "det"; })},
            {"keypoints", collect([&](const LinkGroup& g) { return g.decoder == decoder; })}};
  }
  return {{"groups", collect([&](const LinkGroup& g) { return g.decoder == decoder; })}};
}

// --- labels ------------------------------------------------------------------------------------------------

const std::vector<std::pair<std::string, std::string>>& routing_token_kinds() {
  static const std::vector<std::pair<std::string, std::string>> table = {
      {"[DET]", "det"},   {"[GRD]", "grd"}, {"[SEG]", "seg"},
      {"[POSE]", "pose"}, {"[GEN]", "gen"}, {"[EDIT]", "edit"}};
  return table;
}

const std::vector<std::string>& label_delimiters() {
  static const std::vector<std::string> delimiters = {", ", ". ", ": ", " for ", " and ", " of "};
  return delimiters;
}

const std::vector<std::string>& placeholder_tokens() {
  static const std::vector<std::string> tokens = {"[EMB]",  "[EMB2]", "[EMB3]", "[EMB4]",
                                                  "[EMB5]", "[EMB6]", "[EMB7]", "[EMB8]"};
  return tokens;
}

namespace {

// Python's str.isspace() (the same set as `\s` in a str pattern).
bool py_isspace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// Code points of `s` and the byte offset of each (plus the end), so matches map back to UTF-8 substrings.
// An invalid byte becomes one U+FFFD code point: the input comes from Python str and is valid in practice.
std::u32string decode_utf8(std::string_view s, std::vector<size_t>& offsets) {
  std::u32string out;
  offsets.clear();
  size_t i = 0;
  while (i < s.size()) {
    const auto b = static_cast<unsigned char>(s[i]);
    size_t len = b < 0x80 ? 1 : (b >> 5) == 0x6 ? 2 : (b >> 4) == 0xE ? 3 : (b >> 3) == 0x1E ? 4 : 0;
    char32_t cp = len == 1 ? b : len == 2 ? (b & 0x1F) : len == 3 ? (b & 0x0F) : (b & 0x07);
    bool ok = len > 0 && i + len <= s.size();
    for (size_t k = 1; ok && k < len; ++k) {
      const auto c = static_cast<unsigned char>(s[i + k]);
      ok = (c & 0xC0) == 0x80;
      cp = (cp << 6) | (c & 0x3F);
    }
    offsets.push_back(i);
    out.push_back(ok ? cp : 0xFFFD);
    i += ok ? len : 1;
  }
  offsets.push_back(s.size());
  return out;
}

// str.strip(): Unicode whitespace off both ends.
std::string py_strip(std::string_view s) {
  std::vector<size_t> offsets;
  const std::u32string cps = decode_utf8(s, offsets);
  size_t b = 0, e = cps.size();
  while (b < e && py_isspace(cps[b])) ++b;
  while (e > b && py_isspace(cps[e - 1])) --e;
  return std::string(s.substr(offsets[b], offsets[e] - offsets[b]));
}

// str.strip(chars) for ASCII `chars` (a UTF-8 continuation byte never equals an ASCII byte).
std::string strip_chars(std::string_view s, std::string_view chars) {
  const size_t b = s.find_first_not_of(chars);
  if (b == std::string_view::npos) return "";
  const size_t e = s.find_last_not_of(chars);
  return std::string(s.substr(b, e - b + 1));
}

bool starts_with_at(std::string_view s, size_t pos, std::string_view word) {
  return s.size() - pos >= word.size() && s.compare(pos, word.size(), word) == 0;
}

// A backtracking matcher for the three patterns of the reference's label rule, trying alternatives in the
// order Python's `re` does (greedy runs longest first, lazy runs shortest first, alternation left to right),
// so the first success is the match `re` reports, capture group included.
struct MatchState {
  const std::u32string& text;
  size_t group_begin = 0;
  size_t group_end = 0;
};
using Continuation = std::function<bool(size_t)>;

class Node {
 public:
  virtual ~Node() = default;
  // Tries every way to match at `pos`, in priority order, calling `next` with the end of each; true as
  // soon as `next` accepts one.
  virtual bool match(MatchState& st, size_t pos, const Continuation& next) const = 0;
};
using NodePtr = std::shared_ptr<const Node>;

// One pattern character against one code point; with `ignore_case`, Python's IGNORECASE for str patterns,
// which also lets U+0130/U+0131 match i, U+212A (Kelvin) match k and U+017F (long s) match s.
bool char_matches(char pattern, char32_t c, bool ignore_case) {
  if (!ignore_case || !((pattern >= 'a' && pattern <= 'z') || (pattern >= 'A' && pattern <= 'Z'))) {
    return c == static_cast<char32_t>(static_cast<unsigned char>(pattern));
  }
  const char lower = static_cast<char>(pattern | 0x20);
  if (c < 0x80) return static_cast<char>(c | 0x20) == lower && ((c | 0x20) >= 'a' && (c | 0x20) <= 'z');
  return (lower == 'i' && (c == 0x130 || c == 0x131)) || (lower == 'k' && c == 0x212A) ||
         (lower == 's' && c == 0x17F);
}

class Literal : public Node {
 public:
  Literal(std::string word, bool ignore_case) : word_(std::move(word)), ignore_case_(ignore_case) {}
  bool match(MatchState& st, size_t pos, const Continuation& next) const override {
    if (st.text.size() - pos < word_.size()) return false;
    for (size_t i = 0; i < word_.size(); ++i) {
      if (!char_matches(word_[i], st.text[pos + i], ignore_case_)) return false;
    }
    return next(pos + word_.size());
  }

 private:
  std::string word_;
  bool ignore_case_;
};

// A run of [min, max] code points of one class: `\s+`, `\s*`, `,?`, `[^?.!<>]+?`, `.*?`, `[?.!]`.
class Run : public Node {
 public:
  Run(bool (*member)(char32_t), size_t min, size_t max, bool lazy)
      : member_(member), min_(min), max_(max), lazy_(lazy) {}
  bool match(MatchState& st, size_t pos, const Continuation& next) const override {
    size_t n = 0;
    while (n < max_ && pos + n < st.text.size() && member_(st.text[pos + n])) ++n;
    if (n < min_) return false;
    if (lazy_) {
      for (size_t k = min_; k <= n; ++k) {
        if (next(pos + k)) return true;
      }
    } else {
      for (size_t k = n + 1; k-- > min_;) {
        if (next(pos + k)) return true;
      }
    }
    return false;
  }

 private:
  bool (*member_)(char32_t);
  size_t min_, max_;
  bool lazy_;
};

class Sequence : public Node {
 public:
  explicit Sequence(std::vector<NodePtr> items) : items_(std::move(items)) {}
  bool match(MatchState& st, size_t pos, const Continuation& next) const override {
    return from(0, st, pos, next);
  }

 private:
  bool from(size_t i, MatchState& st, size_t pos, const Continuation& next) const {
    if (i == items_.size()) return next(pos);
    return items_[i]->match(st, pos, [&](size_t p) { return from(i + 1, st, p, next); });
  }
  std::vector<NodePtr> items_;
};

class Alternation : public Node {
 public:
  explicit Alternation(std::vector<NodePtr> options) : options_(std::move(options)) {}
  bool match(MatchState& st, size_t pos, const Continuation& next) const override {
    for (const NodePtr& o : options_) {
      if (o->match(st, pos, next)) return true;
    }
    return false;
  }

 private:
  std::vector<NodePtr> options_;
};

// `(?:x)?`: greedy, so the group is tried before skipping it.
class Optional : public Node {
 public:
  explicit Optional(NodePtr item) : item_(std::move(item)) {}
  bool match(MatchState& st, size_t pos, const Continuation& next) const override {
    return item_->match(st, pos, next) || next(pos);
  }

 private:
  NodePtr item_;
};

class Capture : public Node {
 public:
  explicit Capture(NodePtr item) : item_(std::move(item)) {}
  bool match(MatchState& st, size_t pos, const Continuation& next) const override {
    return item_->match(st, pos, [&](size_t end) {
      st.group_begin = pos;
      st.group_end = end;
      return next(end);
    });
  }

 private:
  NodePtr item_;
};

// `$` without MULTILINE: the end, or just before a final newline.
class EndAnchor : public Node {
 public:
  bool match(MatchState& st, size_t pos, const Continuation& next) const override {
    const size_t n = st.text.size();
    return (pos == n || (pos + 1 == n && st.text[pos] == U'\n')) && next(pos);
  }
};

NodePtr lit(const char* w) { return std::make_shared<Literal>(w, true); }
NodePtr lit_exact(const char* w) { return std::make_shared<Literal>(w, false); }
NodePtr seq(std::vector<NodePtr> items) { return std::make_shared<Sequence>(std::move(items)); }
NodePtr alt(std::vector<NodePtr> options) { return std::make_shared<Alternation>(std::move(options)); }
NodePtr opt(NodePtr item) { return std::make_shared<Optional>(std::move(item)); }
NodePtr capture(NodePtr item) { return std::make_shared<Capture>(std::move(item)); }
NodePtr end_anchor() { return std::make_shared<EndAnchor>(); }
constexpr size_t kUnbounded = std::numeric_limits<size_t>::max();
NodePtr spaces(size_t min) { return std::make_shared<Run>(py_isspace, min, kUnbounded, false); }

bool is_comma(char32_t c) { return c == U','; }
bool not_newline(char32_t c) { return c != U'\n'; }
bool sentence_end(char32_t c) { return c == U'?' || c == U'.' || c == U'!'; }
bool phrase_char(char32_t c) { return !(sentence_end(c) || c == U'<' || c == U'>'); }

// `_NOT_A_PHRASE` (IGNORECASE):
//   ^(?:(?:yes|sure|ok|okay)\s*,?\s*)?(?:it|this|that|here)?(?:\s+it)?(?:\s+is)?$
const NodePtr& not_a_phrase_pattern() {
  static const NodePtr p = seq({
      opt(seq({alt({lit("yes"), lit("sure"), lit("ok"), lit("okay")}), spaces(0),
               std::make_shared<Run>(is_comma, 0, 1, false), spaces(0)})),
      opt(alt({lit("it"), lit("this"), lit("that"), lit("here")})),
      opt(seq({spaces(1), lit("it")})),
      opt(seq({spaces(1), lit("is")})),
      end_anchor(),
  });
  return p;
}

// `_GROUNDING_QUESTION` (IGNORECASE):
//   (?:locate|find|ground|detect|where is|where are|where's|point to|segment|see)\s+(?:the\s+)?([^?.!<>]+?)
//   (?:\s+(?:is\s+)?(?:in|within|on)\s+(?:the|this)\s+(?:image|picture|photo))?\s*(?:[?.!]|$)
const NodePtr& grounding_question_pattern() {
  static const NodePtr p = seq({
      alt({lit("locate"), lit("find"), lit("ground"), lit("detect"), lit("where is"), lit("where are"),
           lit("where's"), lit("point to"), lit("segment"), lit("see")}),
      spaces(1),
      opt(seq({lit("the"), spaces(1)})),
      capture(std::make_shared<Run>(phrase_char, 1, kUnbounded, true)),
      opt(seq({spaces(1), opt(seq({lit("is"), spaces(1)})), alt({lit("in"), lit("within"), lit("on")}),
               spaces(1), alt({lit("the"), lit("this")}), spaces(1),
               alt({lit("image"), lit("picture"), lit("photo")})})),
      spaces(0),
      alt({std::make_shared<Run>(sentence_end, 1, 1, false), end_anchor()}),
  });
  return p;
}

// `<det>(.*?)</det>\s*$` (case-sensitive)
const NodePtr& det_phrase_pattern() {
  static const NodePtr p = seq({
      lit_exact("<det>"),
      capture(std::make_shared<Run>(not_newline, 0, kUnbounded, true)),
      lit_exact("</det>"),
      spaces(0),
      end_anchor(),
  });
  return p;
}

bool accept_any(size_t) { return true; }

// re.match: anchored at the start.
bool matches_at_start(const NodePtr& pattern, const std::u32string& text) {
  MatchState st{text};
  return pattern->match(st, 0, accept_any);
}

// re.search(...).group(1) as a UTF-8 substring of `s`, or nothing.
std::optional<std::string> search_group(const NodePtr& pattern, std::string_view s) {
  std::vector<size_t> offsets;
  const std::u32string text = decode_utf8(s, offsets);
  MatchState st{text};
  for (size_t start = 0; start <= text.size(); ++start) {
    if (pattern->match(st, start, accept_any)) {
      return std::string(s.substr(offsets[st.group_begin], offsets[st.group_end] - offsets[st.group_begin]));
    }
  }
  return std::nullopt;
}

bool is_not_a_phrase(std::string_view s) {
  std::vector<size_t> offsets;
  return matches_at_start(not_a_phrase_pattern(), decode_utf8(s, offsets));
}

// `_DELIMITERS.split(segment)[-1]`: the text after the last delimiter of a left-to-right, non-overlapping
// scan (not simply the last occurrence: in " for and x" the scan takes " for " and leaves "and x").
std::string_view after_last_delimiter(std::string_view segment) {
  size_t piece_start = 0;
  size_t i = 0;
  while (i < segment.size()) {
    size_t matched = 0;
    for (const std::string& d : label_delimiters()) {
      if (starts_with_at(segment, i, d)) {
        matched = d.size();
        break;
      }
    }
    if (matched) {
      i += matched;
      piece_start = i;
    } else {
      ++i;
    }
  }
  return segment.substr(piece_start);
}

std::string replace_all(std::string s, std::string_view from, std::string_view to) {
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) {
    s.replace(at, from.size(), to);
  }
  return s;
}

// One left-to-right pass, as re.sub does (text that forms a placeholder only after a removal stays).
std::string remove_placeholders(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    size_t matched = 0;
    for (const std::string& t : placeholder_tokens()) {
      if (starts_with_at(s, i, t)) {
        matched = t.size();
        break;
      }
    }
    if (matched) {
      i += matched;
    } else {
      out.push_back(s[i++]);
    }
  }
  return out;
}

}  // namespace

std::vector<std::pair<std::string, std::string>> label_groups(const std::string& answer_text,
                                                              const std::string& question,
                                                              const std::optional<std::string>& instruction) {
  const std::string answer = remove_placeholders(answer_text);
  const std::string question_text = py_strip(replace_all(question, "<image>", " "));
  std::vector<std::pair<std::string, std::string>> out;
  const std::string_view view(answer);
  size_t start = 0;
  size_t i = 0;
  while (i < answer.size()) {
    const std::pair<std::string, std::string>* token = nullptr;
    for (const auto& t : routing_token_kinds()) {
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
      out.emplace_back(kind, py_strip(instruction ? *instruction : question_text));
      continue;
    }
    const std::optional<std::string> det = search_group(det_phrase_pattern(), segment);
    std::string label = py_strip(det ? std::string_view(*det) : after_last_delimiter(segment));
    if (kind == "grd" && is_not_a_phrase(strip_chars(label, " ,.:"))) {
      const std::optional<std::string> asked = search_group(grounding_question_pattern(), question_text);
      const std::string phrase = asked ? py_strip(*asked) : std::string();
      label = phrase.empty() ? question_text : phrase;
    }
    out.emplace_back(kind, strip_chars(label, " ,.:"));
  }
  return out;
}

}  // namespace vle
