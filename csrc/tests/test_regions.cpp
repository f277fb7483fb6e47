// vle::rasterise_region, the request's visual prompts into the thumbnail frame: every region a caller can
// build is rasterised or refused with an InputError naming it. The inputs are those fuzz/cpp/fuzz_region.cpp
// reached (docs/limits.md, "Fuzzing").
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "preprocess/regions.h"
#include "test_util.h"

namespace {

using vle::Region;
using vle::test_util::message_of;

constexpr int64_t kThumb = 8;

std::vector<float> rasterised(const Region& r, int64_t width, int64_t height) {
  std::vector<float> out(kThumb * kThumb, -1.f);
  vle::rasterise_region(r, 0, width, height, kThumb, out.data());
  return out;
}

std::string refusal(const Region& r, size_t index, int64_t width, int64_t height) {
  std::vector<float> out(kThumb * kThumb);
  return message_of<vle::InputError>([&] { vle::rasterise_region(r, index, width, height, kThumb, out.data()); });
}

// The fuzzer's finding: mask bytes other than 0 and 1 were read as bool (undefined behaviour, UBSan:
// "load of value 255, which is not a valid value for type 'bool'"). Any non-zero byte is a set pixel.
TEST(Regions, MaskBytesOtherThanOneAreSetPixels) {
  std::vector<uint8_t> ones(6 * 4, 0), bytes(6 * 4, 0);
  for (int i : {5, 6, 9, 10}) {
    ones[i] = 1;
    bytes[i] = static_cast<uint8_t>(i == 5 ? 255 : 2 + i);
  }
  const std::vector<float> want = rasterised(Region::from_mask(ones, 6, 4), 6, 4);
  EXPECT_EQ(rasterised(Region::from_mask(bytes, 6, 4), 6, 4), want);
  float set = 0;
  for (float v : want) set += v;
  EXPECT_GT(set, 0.f);
}

TEST(Regions, ThumbnailMaskBytesOtherThanOneAreSetCells) {
  Region r{Region::Kind::kThumbnailMask, {}, std::vector<uint8_t>(kThumb * kThumb, 0), kThumb, kThumb};
  r.mask[3] = 200;
  r.mask[9] = 1;
  const std::vector<float> out = rasterised(r, 30, 20);
  for (int64_t c = 0; c < kThumb * kThumb; ++c) EXPECT_EQ(out[c], (c == 3 || c == 9) ? 1.f : 0.f) << c;
}

TEST(Regions, BadBoxesAndPointsAreInputErrorsNamingTheRegion) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(refusal(Region::box(nan, 1, 9, 9), 2, 64, 48),
            "region 2: region_mask_box: box (nan, 1, 9, 9) is empty or outside the 64x48 image");
  EXPECT_EQ(refusal(Region::box(0, 0, inf, 9), 0, 64, 48),
            "region 0: region_mask_box: box (0, 0, inf, 9) is empty or outside the 64x48 image");
  EXPECT_EQ(refusal(Region::box(5, 5, 5, 9), 1, 64, 48),
            "region 1: region_mask_box: box (5, 5, 5, 9) is empty or outside the 64x48 image");
  EXPECT_EQ(refusal(Region::point(-inf, 3), 3, 64, 48),
            "region 3: region_mask_point: point (-inf, 3) is outside the 64x48 image");
  Region three = Region::box(1, 1, 2, 2);
  three.coords.pop_back();
  EXPECT_EQ(refusal(three, 0, 64, 48), "region 0: a box has 4 numbers, got 3");
  Region none = Region::point(1, 1);
  none.coords.clear();
  EXPECT_EQ(refusal(none, 4, 64, 48), "region 4: a point has 2 numbers, got 0");
}

TEST(Regions, MisshapenMasksAreInputErrorsNamingTheRegion) {
  // Negative sides whose product matches the bytes (-1 x -1 = 1 byte) are refused, not read.
  EXPECT_EQ(refusal(Region::from_mask({1}, -1, -1), 0, 4, 4), "region 0: the mask has 1 bytes for -1x-1");
  EXPECT_EQ(refusal(Region::from_mask(std::vector<uint8_t>(11, 1), 4, 3), 1, 4, 3),
            "region 1: the mask has 11 bytes for 3x4");
  EXPECT_EQ(refusal(Region::from_mask(std::vector<uint8_t>(12, 1), 4, 3), 0, 5, 3),
            "region 0: region_mask_mask: mask: expected shape (3, 5) (the image), got (3, 4)");
  EXPECT_EQ(refusal(Region::from_mask(std::vector<uint8_t>(12, 0), 4, 3), 0, 4, 3),
            "region 0: region_mask_mask: region mask is empty");
  Region thumb{Region::Kind::kThumbnailMask, {}, std::vector<uint8_t>(7 * 8, 1), 7, 8};
  EXPECT_EQ(refusal(thumb, 0, 4, 3), "region 0: thumbnail-frame regions must be 8x8, got 8x7 (56 bytes)");
}

}  // namespace
