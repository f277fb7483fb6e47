// A request's visual prompts (vle::Region, the caller's boxes, points and masks) rasterised into the
// thumbnail frame that the region encoder reads. Every region a caller can build is either rasterised or
// refused with an InputError naming it (its index, kind and what is wrong): the rasterisers of image_ops.h
// state their preconditions as std::invalid_argument, which is not part of the C++ API's error hierarchy.
#pragma once

#include <cstddef>
#include <cstdint>

#include "visionllm_edge/pipeline.h"

namespace vle {

// Region `index` of a request on an image_width x image_height image into `out`, thumb_size x thumb_size
// floats of 0 and 1. Mask bytes count as set when non-zero (any byte value, as numpy's astype(bool)).
void rasterise_region(const Region& region, size_t index, int64_t image_width, int64_t image_height,
                      int64_t thumb_size, float* out);

}  // namespace vle
