// Order statistics of repeated measurements, computed as numpy computes them, so that the C++ benchmark
// (`vle-run --bench`) and the per-request diffusion-step stats give the same figures as
// `visionllm-edge bench`, whose summaries are numpy's (python/visionllm_edge/bench.py, `summary`).
#pragma once

#include <cstdint>
#include <vector>

namespace vle {

// numpy.percentile(values, q) with its default method, "linear": the order statistic at index
// (n - 1) * q / 100, interpolated between its two neighbours as numpy interpolates (a + (b - a) t below
// t = 0.5, b - (b - a)(1 - t) from it). InputError on no values, a NaN among them, or q outside [0, 100].
double percentile(std::vector<double> values, double q);

// numpy.median: the middle value, or the mean of the two middle ones. InputError as percentile.
double median(std::vector<double> values);

// The figures a benchmark reports for one quantity, named as the Python bench's JSON names them.
struct Summary {
  double min = 0, median = 0, p90 = 0, max = 0;
  int64_t n = 0;
};

// min, median (numpy.median), p90 (numpy.percentile(values, 90)) and max of the values; InputError as
// percentile.
Summary summarize(const std::vector<double>& values);

}  // namespace vle
