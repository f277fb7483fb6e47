#include "preprocess/preprocess.h"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace vle {

Grid choose_anyres_grid(int64_t width, int64_t height, int64_t tile_size,
                        const std::vector<Grid>& candidates) {
  if (width <= 0 || height <= 0) {
    throw std::invalid_argument("choose_anyres_grid: image size must be positive, got " +
                                std::to_string(width) + "x" + std::to_string(height));
  }
  if (tile_size <= 0) {
    throw std::invalid_argument("choose_anyres_grid: tile_size must be positive, got " +
                                std::to_string(tile_size));
  }
  if (candidates.empty()) {
    throw std::invalid_argument("choose_anyres_grid: candidates is empty");
  }
  const double aspect = static_cast<double>(width) / static_cast<double>(height);
  const double area = static_cast<double>(width) * static_cast<double>(height);
  double best_diff = std::numeric_limits<double>::infinity();
  Grid best{1, 1};
  for (const Grid& g : candidates) {
    if (g.cols <= 0 || g.rows <= 0) {
      throw std::invalid_argument("choose_anyres_grid: candidate grid must be positive, got (" +
                                  std::to_string(g.cols) + ", " + std::to_string(g.rows) + ")");
    }
    const double diff = std::fabs(aspect - static_cast<double>(g.cols) / static_cast<double>(g.rows));
    if (diff < best_diff) {
      best_diff = diff;
      best = g;
    } else if (diff == best_diff) {
      const double grid_area = 0.5 * static_cast<double>(tile_size) * static_cast<double>(tile_size) *
                               static_cast<double>(g.cols) * static_cast<double>(g.rows);
      if (area > grid_area) best = g;
    }
  }
  return best;
}

}  // namespace vle
