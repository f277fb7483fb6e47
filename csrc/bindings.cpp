// Thin pybind11 bindings: conversion and exception translation only; policy lives in Python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>
#include <vector>

#include "preprocess.h"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "visionllm-edge C++ core";
  m.def(
      "choose_anyres_grid",
      [](int64_t width, int64_t height, int64_t tile_size,
         const std::vector<std::pair<int64_t, int64_t>>& candidates) {
        std::vector<vle::Grid> grids;
        grids.reserve(candidates.size());
        for (const auto& c : candidates) grids.push_back({c.first, c.second});
        const vle::Grid g = vle::choose_anyres_grid(width, height, tile_size, grids);
        return std::make_tuple(g.cols, g.rows);
      },
      py::arg("width"), py::arg("height"), py::arg("tile_size"), py::arg("candidates"),
      "Anyres grid (cols, rows) for an image, with the official tie rule; candidates in official order.");
}
