#include "loop/router.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
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
  // The keypoint decoder attaches its keypoint groups to the answer's [DET] groups (as the reference
  // does); it needs both, so the caller skips it when either list is empty.
  if (decoder == "pose") {
    return {{"objects", collect([](const LinkGroup& g) { return g.kind == "det"; })},
            {"keypoints", collect([&](const LinkGroup& g) { return g.decoder == decoder; })}};
  }
  return {{"groups", collect([&](const LinkGroup& g) { return g.decoder == decoder; })}};
}

}  // namespace vle
