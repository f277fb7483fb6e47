// Half conversions on the device, bit for bit those of memory/half.h (the kernels' tests check every half
// and random floats against it).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace vle {
namespace cuda {

// The CPU's float_to_half (memory/half.h) with the hardware conversion for the common case. cvt.rn.f16.f32
// rounds finite values and infinities exactly as the CPU code does; NaNs are spelled as the CPU spells
// them (sign, all-ones exponent, the quiet bit) rather than as the hardware's canonical NaN.
__device__ __forceinline__ uint16_t to_half_bits(float f) {
  const uint32_t bits = __float_as_uint(f);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(((bits >> 16) & 0x8000u) | 0x7e00u);
  return __half_as_ushort(__float2half_rn(f));
}

// half_to_float: exact for every half; NaN payloads are kept (shifted into the float's mantissa) as on the CPU.
__device__ __forceinline__ float from_half_bits(uint16_t h) {
  if ((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0) {
    return __uint_as_float((static_cast<uint32_t>(h & 0x8000u) << 16) | 0x7f800000u |
                           (static_cast<uint32_t>(h & 0x3ffu) << 13));
  }
  return __half2float(__ushort_as_half(h));
}

}  // namespace cuda
}  // namespace vle
