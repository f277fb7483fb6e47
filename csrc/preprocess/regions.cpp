#include "preprocess/regions.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "preprocess/image_ops.h"

namespace vle {

void rasterise_region(const Region& r, size_t index, int64_t image_width, int64_t image_height,
                      int64_t thumb_size, float* out) {
  const std::string name = "region " + std::to_string(index);
  const int64_t cells = thumb_size * thumb_size;
  try {
    switch (r.kind) {
      case Region::Kind::kThumbnailMask:
        if (r.mask_width != thumb_size || r.mask_height != thumb_size || static_cast<int64_t>(r.mask.size()) != cells) {
          throw InputError(name + ": thumbnail-frame regions must be " + std::to_string(thumb_size) + "x" +
                           std::to_string(thumb_size) + ", got " + std::to_string(r.mask_height) + "x" +
                           std::to_string(r.mask_width) + " (" + std::to_string(r.mask.size()) + " bytes)");
        }
        for (int64_t c = 0; c < cells; ++c) out[c] = r.mask[static_cast<size_t>(c)] ? 1.f : 0.f;
        return;
      case Region::Kind::kMask: {
        if (r.mask_width < 0 || r.mask_height < 0 ||
            static_cast<uint64_t>(r.mask.size()) != static_cast<uint64_t>(r.mask_width) * static_cast<uint64_t>(r.mask_height)) {
          throw InputError(name + ": the mask has " + std::to_string(r.mask.size()) + " bytes for " +
                           std::to_string(r.mask_height) + "x" + std::to_string(r.mask_width));
        }
        // The rasteriser reads bools, and a byte other than 0 or 1 is not a valid bool (undefined behaviour,
        // found by fuzz/cpp/fuzz_region.cpp): such a mask is read through a 0/1 copy.
        const uint8_t* bytes = r.mask.data();
        std::vector<uint8_t> bits;
        if (std::any_of(r.mask.begin(), r.mask.end(), [](uint8_t b) { return b > 1; })) {
          bits.resize(r.mask.size());
          for (size_t i = 0; i < bits.size(); ++i) bits[i] = r.mask[i] != 0;
          bytes = bits.data();
        }
        const BoolMaskView view{reinterpret_cast<const bool*>(bytes), r.mask_height, r.mask_width, r.mask_width, 1};
        region_mask_from_mask(view, image_width, image_height, thumb_size, out);
        return;
      }
      case Region::Kind::kBox:
        if (r.coords.size() != 4) {
          throw InputError(name + ": a box has 4 numbers, got " + std::to_string(r.coords.size()));
        }
        region_mask_box({r.coords[0], r.coords[1], r.coords[2], r.coords[3]}, image_width, image_height, thumb_size, out);
        return;
      case Region::Kind::kPoint:
        if (r.coords.size() != 2) {
          throw InputError(name + ": a point has 2 numbers, got " + std::to_string(r.coords.size()));
        }
        region_mask_point({r.coords[0], r.coords[1]}, image_width, image_height, thumb_size, out);
        return;
    }
  } catch (const std::invalid_argument& e) {
    throw InputError(name + ": " + e.what());
  }
  throw InputError(name + ": unknown kind " + std::to_string(static_cast<int>(r.kind)));
}

}  // namespace vle
