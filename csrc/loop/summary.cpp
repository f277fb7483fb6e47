#include "loop/summary.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "artifact/json_text.h"
#include "visionllm_edge/errors.h"

namespace vle {

namespace {

// Sorted, after the checks every statistic shares.
std::vector<double> sorted_values(std::vector<double> values, const char* what) {
  if (values.empty()) throw InputError(std::string(what) + ": no values to summarise");
  if (std::any_of(values.begin(), values.end(), [](double v) { return std::isnan(v); })) {
    throw InputError(std::string(what) + ": a value is NaN");
  }
  std::sort(values.begin(), values.end());
  return values;
}

}  // namespace

double percentile(std::vector<double> values, double q) {
  if (!(q >= 0.0 && q <= 100.0)) {
    throw InputError("percentile: q must be in [0, 100], got " + number_text(q));
  }
  const std::vector<double> v = sorted_values(std::move(values), "percentile");
  const size_t n = v.size();
  // numpy: q / 100 as a float64 division, the virtual index (n - 1) * q, its floor and the fraction above it.
  const double index = static_cast<double>(n - 1) * (q / 100.0);
  if (index >= static_cast<double>(n - 1)) return v.back();
  const double below = std::floor(index);
  const double t = index - below;
  const double a = v[static_cast<size_t>(below)];
  const double b = v[static_cast<size_t>(below) + 1];
  const double diff = b - a;
  return t >= 0.5 ? b - diff * (1.0 - t) : a + diff * t;
}

double median(std::vector<double> values) {
  const std::vector<double> v = sorted_values(std::move(values), "median");
  const size_t n = v.size();
  if (n % 2 == 1) return v[n / 2];
  return (v[n / 2 - 1] + v[n / 2]) / 2.0;
}

Summary summarize(const std::vector<double>& values) {
  const std::vector<double> v = sorted_values(values, "summary");
  Summary s;
  s.min = v.front();
  s.max = v.back();
  s.median = median(v);
  s.p90 = percentile(v, 90.0);
  s.n = static_cast<int64_t>(v.size());
  return s;
}

}  // namespace vle
