// The KV arena: rows land where the engine will read them, commits and rollbacks move the length only, a
// bad append leaves the arena as it was, and its memory comes from the allocator it is given.
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
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

// An allocator that records what the arena asks of it; `kind` lets a host buffer stand in for device memory.
class RecordingAllocator final : public vle::Allocator {
 public:
  explicit RecordingAllocator(vle::MemoryKind kind) : kind_(kind) {}
  void* allocate(size_t bytes) override {
    sizes.push_back(bytes);
    return vle::host_allocator().allocate(bytes);
  }
  void deallocate(void* p) noexcept override {
    ++freed;
    vle::host_allocator().deallocate(p);
  }
  vle::MemoryKind kind() const override { return kind_; }
  std::vector<size_t> sizes;
  int freed = 0;

 private:
  vle::MemoryKind kind_;
};

TEST(KVArena, TakesEveryBufferFromItsAllocatorAndGivesThemBack) {
  RecordingAllocator allocator(vle::MemoryKind::kHost);
  {
    vle::KVArena arena(3, 5, 2, 4, vle::KVDType::kFloat16, allocator);
    EXPECT_EQ(arena.memory(), vle::MemoryKind::kHost);
    ASSERT_EQ(allocator.sizes.size(), 6u);  // one K and one V buffer per layer
    for (size_t bytes : allocator.sizes) EXPECT_EQ(bytes, 5u * 2 * 4 * 2);
    EXPECT_EQ(static_cast<const std::byte*>(arena.key_row(1, 2)) - static_cast<const std::byte*>(arena.key_row(1, 0)),
              2 * static_cast<std::ptrdiff_t>(arena.row_bytes()));
  }
  EXPECT_EQ(allocator.freed, 6);
}

TEST(KVArena, DeviceArenaRefusesHostAppendNamingWhy) {
  RecordingAllocator allocator(vle::MemoryKind::kDevice);
  vle::KVArena arena(1, 4, 1, 2, vle::KVDType::kFloat32, allocator);
  EXPECT_EQ(arena.memory(), vle::MemoryKind::kDevice);
  const std::vector<float> row = rows(1, 2, 0.f);
  try {
    arena.append({{row.data(), {1, 1, 2}}}, {{row.data(), {1, 1, 2}}});
    FAIL() << "append into a device arena was accepted";
  } catch (const std::logic_error& e) {
    EXPECT_NE(std::string(e.what()).find("device memory"), std::string::npos) << e.what();
  }
  EXPECT_EQ(arena.length(), 0);
  arena.commit(2);  // rows written in place by an engine
  EXPECT_EQ(arena.length(), 2);
}

// Sizes whose byte count wraps int64 (the earlier hostile pass: a manifest context that passed validation
// made capacity x row bytes wrap, the allocation small, and the first rows written past it) are refused
// before anything is allocated, naming the product.
TEST(KVArena, SizesWhoseBytesOverflowAreRefusedBeforeAllocating) {
  struct Case {
    int64_t layers, capacity, heads, head_dim;
    const char* names;
  };
  const int64_t big = int64_t{1} << 40;
  for (const Case& c : {Case{1, big, 1 << 20, 64, "KVArena bytes per layer"},
                        Case{1, 4, big, big, "KVArena row bytes"},
                        Case{big, big, 1, 1, "KVArena total bytes"}}) {
    RecordingAllocator allocator(vle::MemoryKind::kHost);
    try {
      vle::KVArena arena(c.layers, c.capacity, c.heads, c.head_dim, vle::KVDType::kFloat32, allocator);
      FAIL() << "an arena of " << c.capacity << " rows was accepted";
    } catch (const std::length_error& e) {
      EXPECT_NE(std::string(e.what()).find(std::string(c.names) + ": "), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("overflows int64"), std::string::npos) << e.what();
    }
    EXPECT_TRUE(allocator.sizes.empty()) << c.names;
  }
}

// An allocation the machine cannot give is a length_error naming the arena's sizes, not a bare bad_alloc.
TEST(KVArena, AFailedAllocationNamesTheArenasSizes) {
  struct Refusing final : vle::Allocator {
    void* allocate(size_t) override { throw std::bad_alloc(); }
    void deallocate(void*) noexcept override {}
    vle::MemoryKind kind() const override { return vle::MemoryKind::kHost; }
  } refusing;
  try {
    vle::KVArena arena(2, 1000, 4, 8, vle::KVDType::kFloat16, refusing);
    FAIL() << "the arena was made from a refusing allocator";
  } catch (const std::length_error& e) {
    EXPECT_STREQ(e.what(), "KVArena: cannot allocate 256000 bytes (2 layers x K and V x 1000 rows x 64 bytes a row)");
  }
}

TEST(KVArena, TotalBytesIsEveryLayersKAndV) {
  vle::KVArena arena(3, 10, 2, 4, vle::KVDType::kFloat16);
  EXPECT_EQ(arena.row_bytes(), 2u * 4 * 2);
  EXPECT_EQ(arena.total_bytes(), 2 * 3 * 10 * 16);
}

TEST(HostAllocator, BuffersAreAlignedAndZeroed) {
  vle::Allocator& host = vle::host_allocator();
  for (size_t bytes : {size_t{0}, size_t{1}, size_t{63}, size_t{64}, size_t{1000}, size_t{1} << 22}) {
    auto* p = static_cast<unsigned char*>(host.allocate(bytes));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u) << bytes;
    for (size_t i = 0; i < bytes; i += 4093) EXPECT_EQ(p[i], 0) << bytes << " at " << i;
    if (bytes) EXPECT_EQ(p[bytes - 1], 0) << bytes;
    std::memset(p, 0xab, bytes);  // the whole block is writable
    host.deallocate(p);
  }
}
