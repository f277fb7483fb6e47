// Size arithmetic that cannot wrap. Every size an artifact or a caller sets (a context length, a layer count,
// an image side, a query count) reaches a multiplication before it reaches an allocator; a product that
// overflows int64 would hand the allocator a small block that later writes run past. These throw
// std::length_error naming the quantity being sized and the operands instead.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

namespace vle {

// a * b, or std::length_error("<what>: a x b overflows int64"). Operands must be non-negative.
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t out = 0;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &out)) {
    throw std::length_error(std::string(what) + ": " + std::to_string(a) + " x " + std::to_string(b) +
                            " is negative or overflows int64");
  }
  return out;
}

// The product of `factors`, each step checked as checked_mul does; the message names every factor.
inline int64_t checked_product(std::initializer_list<int64_t> factors, const char* what) {
  int64_t out = 1;
  for (const int64_t f : factors) {
    if (f < 0 || __builtin_mul_overflow(out, f, &out)) {
      std::string terms;
      for (const int64_t g : factors) terms += (terms.empty() ? "" : " x ") + std::to_string(g);
      throw std::length_error(std::string(what) + ": " + terms + " is negative or overflows int64");
    }
  }
  return out;
}

}  // namespace vle
