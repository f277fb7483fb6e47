// Image preprocessing that the runtime does without Python: the anyres tiling decision.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace vle {

// A tiling grid: `cols` tiles across, `rows` tiles down.
struct Grid {
  int64_t cols;
  int64_t rows;
};

// Chooses the anyres grid for an image of `width` x `height` pixels exactly as the official
// `find_closest_aspect_ratio` does: the candidate whose cols/rows is closest to the image's aspect
// ratio wins; on an exact tie a later candidate replaces the current one when the image area exceeds
// half the candidate grid's pixel area. `candidates` must be in the official iteration order (the
// manifest stores it), because that order decides ties.
Grid choose_anyres_grid(int64_t width, int64_t height, int64_t tile_size,
                        const std::vector<Grid>& candidates);

}  // namespace vle
