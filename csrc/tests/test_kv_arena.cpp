// The KV arena: rows land where the engine will read them, commits and rollbacks move the length only, and a
// bad append leaves the arena as it was.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "memory/kv_arena.h"

namespace {

std::vector<float> rows(int64_t n, int64_t width, float start) {
  std::vector<float> out(static_cast<size_t>(n * width));
  for (size_t i = 0; i < out.size(); ++i) out[i] = start + static_cast<float>(i);
  return out;
}

TEST(KVArena, AppendWritesAfterThePastAndCommits) {
  vle::KVArena arena(2, 8, 2, 3, vle::KVDType::kFloat32);
  const int64_t width = 2 * 3;
  auto a = rows(3, width, 0.f), b = rows(2, width, 100.f);
  for (auto* block : {&a, &b}) {
    const int64_t n = static_cast<int64_t>(block->size()) / width;
    std::vector<vle::KVRows> keys, values;
    for (int l = 0; l < 2; ++l) {
      keys.push_back({block->data(), {n, 2, 3}});
      values.push_back({block->data(), {n, 2, 3}});
    }
    arena.append(keys, values);
  }
  EXPECT_EQ(arena.length(), 5);
  const auto* k = static_cast<const float*>(arena.key_row(1, 3));
  EXPECT_EQ(k[0], 100.f);
  EXPECT_EQ(k[width - 1], 100.f + width - 1);
  const auto* v0 = static_cast<const float*>(arena.value_row(0, 0));
  EXPECT_EQ(v0[2 * width], 2.f * width);
}

TEST(KVArena, BadAppendLeavesTheArenaUnchanged) {
  vle::KVArena arena(2, 4, 1, 2, vle::KVDType::kFloat32);
  auto good = rows(2, 2, 1.f);
  std::vector<vle::KVRows> keys{{good.data(), {2, 1, 2}}, {good.data(), {2, 1, 3}}};  // layer 1 is wrong
  std::vector<vle::KVRows> values{{good.data(), {2, 1, 2}}, {good.data(), {2, 1, 2}}};
  EXPECT_THROW(arena.append(keys, values), std::invalid_argument);
  EXPECT_EQ(arena.length(), 0);
  EXPECT_EQ(static_cast<const float*>(arena.key_row(0, 0))[0], 0.f);
}

TEST(KVArena, RoomRollbackAndBounds) {
  vle::KVArena arena(1, 4, 1, 1, vle::KVDType::kFloat16);
  EXPECT_EQ(arena.row_bytes(), 2u);
  arena.commit(3);
  EXPECT_THROW(arena.check_room(2), std::length_error);
  EXPECT_NO_THROW(arena.check_room(1));
  arena.rollback(1);
  EXPECT_EQ(arena.length(), 1);
  EXPECT_THROW(arena.rollback(2), std::invalid_argument);
  EXPECT_THROW(arena.key_row(1, 0), std::out_of_range);
  EXPECT_THROW(arena.key_row(0, 5), std::out_of_range);
  EXPECT_THROW(vle::KVArena(1, 0, 1, 1, vle::KVDType::kFloat32), std::invalid_argument);
}

}  // namespace
