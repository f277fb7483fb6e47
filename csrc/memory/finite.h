// The one scan for non-finite floats. NaN and inf do not stop arithmetic: an embedding row, an initial noise
// or a decoder output holding them still yields a plausible-looking answer (a token, a box, an image), so
// the loop checks data where it crosses a boundary (a table at load, a caller's noise, a graph's output
// before post-processing) and names where the value was found.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

namespace vle {

// The index of the first NaN or +-inf in data[0:n], or nullopt. With `allow_neg_inf` (logits, where -inf is
// a masked entry) only NaN and +inf count.
inline std::optional<int64_t> first_non_finite(const float* data, int64_t n, bool allow_neg_inf = false) {
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(data[i]) && !(allow_neg_inf && data[i] < 0)) return i;
  }
  return std::nullopt;
}

// "NaN at element 12 of 40" / "+inf at ..." for a value first_non_finite found.
inline std::string non_finite_text(const float* data, int64_t at, int64_t n) {
  const float v = data[at];
  return std::string(std::isnan(v) ? "NaN" : (v > 0 ? "+inf" : "-inf")) + " at element " + std::to_string(at) +
         " of " + std::to_string(n);
}

}  // namespace vle
