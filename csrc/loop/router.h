// The super link: the decode-step planner that turns a routing token into the 1 + N row step
// `[E(token); Q_kind]`, the buffer of link states its N query rows produce, and the grouping of those links
// per decoder. The rule that names each group is in loop/labels.h.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "loop/assemble.h"

namespace vle {

// One routing token of the super-link table: its kind (`det grd seg pose gen edit`), the decoder its
// groups go to, the N placeholder ids a step feeds after it, and its N x H query table (copied once, and
// shared by every plan and view that uses it).
struct Route {
  Route(int64_t token_id, std::string kind, std::string decoder, std::vector<int64_t> placeholder_ids,
        const FloatArrayRef& query_table);

  int64_t token_id;
  std::string kind;
  std::string decoder;
  std::vector<int64_t> placeholder_ids;
  int64_t num_queries;
  int64_t hidden;
  std::shared_ptr<const std::vector<float>> query_table;  // [num_queries, hidden]
};

enum class StopReason { kNone, kEos, kLength };
const char* stop_reason_name(StopReason reason);  // "", "eos", "length"

// What the decode loop does with one sampled token. Checked in the reference loop's order: EOS stops
// (the token is kept); a plain token on the last allowed step is kept but not fed (its logits would be
// unused); a step whose rows do not fit the capacity stops with "length" and drops the token, so no
// partial step is ever fed; otherwise the rows are fed, and a routing token on the last allowed step is
// still fed (its query rows carry the group's link) and then stops with "length".
struct StepPlan {
  int64_t token = -1;
  std::vector<int64_t> ids;          // ids this step adds to the sequence ([token] or [token, placeholders])
  bool feed = false;                 // run `ids` through the LLM
  int64_t rows = 0;                  // rows fed (0 when not feeding, else ids.size())
  int64_t position = 0;              // position of the first fed row = the arena length when planned
  StopReason stop = StopReason::kNone;  // stop the loop after this plan
  int route = -1;                    // index of the token's route, -1 for a plain token
  std::string kind;                  // routing kind, "" for a plain token
  int64_t num_queries = 0;
  std::shared_ptr<const std::vector<float>> query_table;  // [num_queries, hidden] or null
  int64_t hidden = 0;
  // Rows of the step whose outputs the loop needs: [0] for a plain step; the N query rows for a routing
  // step (their hidden states are the link; the last one's logits give the next token).
  std::vector<int64_t> output_rows;
};

// One super-link group: a routing token's kind, its position and its query rows' hidden states.
struct LinkGroup {
  std::string kind;
  std::string decoder;
  int64_t position = 0;
  int64_t num_queries = 0;
  int64_t hidden = 0;
  std::shared_ptr<const std::vector<float>> states;  // [num_queries, hidden], post-final-norm
};

// A group as a decoder sees it: `index` is its slot in that decoder call (class k of the object decoder).
struct DecoderGroup {
  int64_t index = 0;
  LinkGroup link;
};

// A decoder's inputs by role: "groups" for object/gen/edit, "objects" and "keypoints" for pose.
using DecoderGroups = std::vector<std::pair<std::string, std::vector<DecoderGroup>>>;

class SuperLinkRouter {
 public:
  SuperLinkRouter(std::vector<Route> routes, int64_t eos_id);

  const std::vector<Route>& routes() const { return routes_; }
  int64_t eos_id() const { return eos_id_; }
  int64_t hidden_size() const { return hidden_; }
  // Index of the route of `token`, or -1.
  int route_of(int64_t token) const;

  // Plans the step for a sampled token. `past_length` and `capacity` are the arena's; `last` says this is
  // the last token the caller's max_new_tokens allows.
  StepPlan plan(int64_t token, int64_t past_length, int64_t capacity, bool last) const;
  // `[rows, H]` inputs of a fed step: E(token), then the query rows for a routing step.
  std::vector<float> step_embeddings(const StepPlan& plan, const FloatArrayRef& token_table) const;

  // Records the link of a fed routing step from its hidden states, given either for all `1 + N` rows of
  // the step or for its N `output_rows`. Returns false (and records nothing) for a plain step.
  bool observe(const StepPlan& plan, const FloatArrayRef& hidden);

  // Positions of the query rows of routing tokens at positions >= `start` in a prefilled sequence (an
  // answer prefix that already holds groups): the rows whose hidden states the prefill must return.
  std::vector<int64_t> prefill_query_rows(const int64_t* ids, int64_t num_ids, int64_t start) const;
  // Records those groups' links from the prefill's hidden states: `[S, H]` for the whole sequence or
  // `[Q, H]` for exactly the rows `prefill_query_rows` lists, in that order.
  void observe_prefill(const int64_t* ids, int64_t num_ids, int64_t start, const FloatArrayRef& hidden);

  // Links in answer order (= position order; observing out of order is an error).
  const std::vector<LinkGroup>& links() const { return links_; }
  // The groups a decoder gets, in answer order. Unknown decoder -> error naming it.
  DecoderGroups groups_for(const std::string& decoder) const;
  void reset() { links_.clear(); }

 private:
  void record(const Route& route, int64_t position, const float* states);

  std::vector<Route> routes_;
  int64_t eos_id_;
  int64_t hidden_ = 0;
  std::vector<int64_t> placeholder_ids_;  // union over routes, sorted
  std::vector<LinkGroup> links_;
};

}  // namespace vle
