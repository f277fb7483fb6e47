// Embedding assembly (docs/architecture.md §3 step 4): `inputs_embeds = table[ids]`, with the image rows written into the
// `<im_patch>` slots, the region rows into the `<region>` slots and, after every routing token followed by
// its N placeholders, that kind's super-link query rows. Same rule as the reference loop's `_embed`.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace vle {

// A borrowed, C-contiguous float32 array: the bindings hand numpy buffers in without copying, and the
// C++ side checks the shape so that every shape error is raised (and worded) in one place.
struct FloatArrayRef {
  const float* data = nullptr;
  std::vector<int64_t> shape;
};

// "(3, 4)": shapes in errors read as numpy prints them.
std::string format_shape(const std::vector<int64_t>& shape);

// Throws unless `a` is 2-D (and has `cols` columns when cols >= 0); the message names `what`.
void require_matrix(const FloatArrayRef& a, const std::string& what, int64_t cols = -1);

struct AssemblyInputs {
  FloatArrayRef token_table;             // [V, H]
  const int64_t* ids = nullptr;          // [S]
  int64_t num_ids = 0;
  std::optional<FloatArrayRef> image_rows;   // [M, H], one per <im_patch> slot, in order
  int64_t image_token_id = -1;
  std::optional<FloatArrayRef> region_rows;  // [R, H], one per <region> slot, in order
  int64_t region_token_id = -1;
  std::unordered_map<std::string, FloatArrayRef> query_tables;  // routing kind -> [N, H]
  std::unordered_map<int64_t, std::string> routing_kinds;        // routing token id -> kind
  std::unordered_set<int64_t> placeholder_ids;
};

// Writes `[S, H]` row-major into `out` (S * H floats, H = token_table's width). Everything is checked
// before `out` is touched; errors name the argument and the shapes or counts involved: an id outside the
// table (position and id), a slot/row count mismatch (both counts), a routing kind without a table.
// Unlike the reference, image rows given for a sequence without `<im_patch>` slots are also an error
// (pass none for such a sequence): rows that go nowhere are a caller's bug, not a no-op.
void assemble_embeddings(const AssemblyInputs& in, float* out);

// The rule behind `assemble_embeddings`, for writers of the rows in other memory (the CUDA assembly): the
// address of each of the S output rows' source row (in the token table, the image or region rows or a query
// table), after the same checks. The arrays' data is never read, so the addresses may be device memory.
std::vector<const float*> assembly_sources(const AssemblyInputs& in);

// Copies token_table[token] into `out` (H floats) after a range check naming `what`.
void gather_row(const FloatArrayRef& token_table, int64_t token, float* out, const std::string& what);

}  // namespace vle
