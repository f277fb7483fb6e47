// Bindings of preprocess.h: conversion only.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>
#include <vector>

#include "bindings/bind_registry.h"
#include "preprocess/preprocess.h"

namespace py = pybind11;

namespace {

void bind_preprocess(py::module_& m) {
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

const vle::BindRegistration registration(&bind_preprocess);

}  // namespace
