#include "loop/assemble.h"

#include <cstring>
#include <stdexcept>

namespace vle {

std::string format_shape(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + (shape.size() == 1 ? ",)" : ")");
}

void require_matrix(const FloatArrayRef& a, const std::string& what, int64_t cols) {
  if (a.shape.size() != 2 || (cols >= 0 && a.shape[1] != cols)) {
    const std::string want = cols >= 0 ? "[n, " + std::to_string(cols) + "]" : "2-D";
    throw std::invalid_argument(what + " must be " + want + ", got shape " + format_shape(a.shape));
  }
}

void gather_row(const FloatArrayRef& token_table, int64_t token, float* out, const std::string& what) {
  const int64_t vocab = token_table.shape[0];
  const int64_t hidden = token_table.shape[1];
  if (token < 0 || token >= vocab) {
    throw std::invalid_argument(what + " = " + std::to_string(token) + " is outside the token table's " +
                                std::to_string(vocab) + " rows");
  }
  std::memcpy(out, token_table.data + token * hidden, static_cast<size_t>(hidden) * sizeof(float));
}

namespace {

// Positions of `slot_id` in the ids, checked against the rows meant for them (the counts must agree).
std::vector<int64_t> check_slots(const AssemblyInputs& in, const std::optional<FloatArrayRef>& rows,
                                 int64_t slot_id, const char* slot_name, const char* rows_name, int64_t hidden) {
  std::vector<int64_t> slots;
  for (int64_t s = 0; s < in.num_ids; ++s) {
    if (in.ids[s] == slot_id) slots.push_back(s);
  }
  const auto n_slots = static_cast<int64_t>(slots.size());
  if (!rows) {
    if (n_slots > 0) {
      throw std::invalid_argument("ids have " + std::to_string(n_slots) + " " + slot_name +
                                  " slot(s) but no " + rows_name + " were given");
    }
    return slots;
  }
  require_matrix(*rows, rows_name, hidden);
  if (n_slots != rows->shape[0]) {
    throw std::invalid_argument("ids have " + std::to_string(n_slots) + " " + slot_name + " slot(s) for " +
                                std::to_string(rows->shape[0]) + " " + rows_name);
  }
  return slots;
}

}  // namespace

std::vector<const float*> assembly_sources(const AssemblyInputs& in) {
  require_matrix(in.token_table, "token_table");
  const int64_t vocab = in.token_table.shape[0];
  const int64_t hidden = in.token_table.shape[1];
  if (in.num_ids < 0 || (in.num_ids > 0 && in.ids == nullptr)) {
    throw std::invalid_argument("ids must be a 1-D array");
  }
  for (int64_t s = 0; s < in.num_ids; ++s) {
    if (in.ids[s] < 0 || in.ids[s] >= vocab) {
      throw std::invalid_argument("ids[" + std::to_string(s) + "] = " + std::to_string(in.ids[s]) +
                                  " is outside the token table's " + std::to_string(vocab) + " rows");
    }
  }
  for (const auto& [kind, table] : in.query_tables) {
    require_matrix(table, "query_tables['" + kind + "']", hidden);
  }
  // Checked up front, not when a token shows up, so a bad table set fails on every input alike.
  for (const auto& [id, kind] : in.routing_kinds) {
    if (in.query_tables.find(kind) == in.query_tables.end()) {
      throw std::invalid_argument("routing kind '" + kind + "' (token id " + std::to_string(id) +
                                  ") has no entry in query_tables");
    }
  }
  const auto image_slots = check_slots(in, in.image_rows, in.image_token_id, "<im_patch>", "image_rows", hidden);
  const auto region_slots =
      check_slots(in, in.region_rows, in.region_token_id, "<region>", "region_rows", hidden);

  std::vector<const float*> sources(static_cast<size_t>(in.num_ids));
  for (int64_t s = 0; s < in.num_ids; ++s) sources[static_cast<size_t>(s)] = in.token_table.data + in.ids[s] * hidden;
  for (size_t i = 0; i < image_slots.size(); ++i) {
    sources[static_cast<size_t>(image_slots[i])] = in.image_rows->data + static_cast<int64_t>(i) * hidden;
  }
  for (size_t i = 0; i < region_slots.size(); ++i) {
    sources[static_cast<size_t>(region_slots[i])] = in.region_rows->data + static_cast<int64_t>(i) * hidden;
  }

  // Query rows replace the placeholder rows only when all N placeholders follow the routing token; a
  // routing token at the end of the ids (or followed by text) keeps its plain rows, as in the reference.
  for (int64_t pos = 0; pos < in.num_ids; ++pos) {
    const auto route = in.routing_kinds.find(in.ids[pos]);
    if (route == in.routing_kinds.end()) continue;
    const FloatArrayRef& table = in.query_tables.at(route->second);
    const int64_t n = table.shape[0];
    if (pos + 1 + n > in.num_ids) continue;
    bool all_placeholders = true;
    for (int64_t i = pos + 1; i <= pos + n; ++i) {
      all_placeholders = all_placeholders && in.placeholder_ids.count(in.ids[i]) > 0;
    }
    if (!all_placeholders) continue;
    for (int64_t i = 0; i < n; ++i) sources[static_cast<size_t>(pos + 1 + i)] = table.data + i * hidden;
  }
  return sources;
}

void assemble_embeddings(const AssemblyInputs& in, float* out) {
  const std::vector<const float*> sources = assembly_sources(in);
  const int64_t hidden = in.token_table.shape[1];
  const size_t row_bytes = static_cast<size_t>(hidden) * sizeof(float);
  for (size_t s = 0; s < sources.size(); ++s) std::memcpy(out + static_cast<int64_t>(s) * hidden, sources[s], row_bytes);
}

}  // namespace vle
