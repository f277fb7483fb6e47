// IEEE half conversions (memory/half.h): every half survives the round trip through float, and float to half
// rounds to nearest even as numpy's astype(float16) does.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "memory/half.h"

namespace {

TEST(Half, EveryHalfRoundTripsThroughFloat) {
  for (uint32_t h = 0; h <= 0xffffu; ++h) {
    const auto bits = static_cast<uint16_t>(h);
    const float f = vle::half_to_float(bits);
    const bool nan = ((h >> 10) & 0x1fu) == 0x1fu && (h & 0x3ffu) != 0;
    if (nan) {
      EXPECT_TRUE(std::isnan(f)) << h;
      EXPECT_EQ(vle::float_to_half(f) & 0x7c00u, 0x7c00u) << h;
    } else {
      EXPECT_EQ(vle::float_to_half(f), bits) << h;
    }
  }
}

TEST(Half, KnownValuesAndRounding) {
  EXPECT_EQ(vle::half_to_float(0x3c00), 1.0f);
  EXPECT_EQ(vle::half_to_float(0xc000), -2.0f);
  EXPECT_EQ(vle::half_to_float(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(vle::half_to_float(0x7bff), 65504.0f);                // largest finite
  EXPECT_EQ(vle::float_to_half(65520.0f), 0x7c00);                // halfway to 65536 rounds to inf
  EXPECT_EQ(vle::float_to_half(65519.0f), 0x7bff);
  // 1 + 2^-11 is halfway between 1 and the next half: ties go to the even mantissa (1.0).
  EXPECT_EQ(vle::float_to_half(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  EXPECT_EQ(vle::float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  EXPECT_EQ(vle::float_to_half(std::ldexp(1.0f, -25)), 0x0000);       // halfway to the smallest: even (0)
  EXPECT_EQ(vle::float_to_half(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(vle::float_to_half(-std::numeric_limits<float>::infinity()), 0xfc00);
}

}  // namespace
