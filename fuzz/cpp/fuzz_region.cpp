// Region inputs (preprocess/regions.cpp over the rasterisers of preprocess/image_ops.cpp): boxes and points
// of any float value (NaN, inf, negative, out of frame, inverted, zero area) and any number of coordinates,
// masks of any shape and byte values, thumbnail-frame masks of any size, on an image of any size the
// pipeline accepts and a thumbnail of the manifest's tile size (small here, for speed). Each region is
// rasterised or refused with an InputError naming it.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "preprocess/regions.h"
#include "visionllm_edge/errors.h"
#include "visionllm_edge/pipeline.h"

namespace {

float next_float(FuzzedDataProvider& in) {
  // Mostly a coordinate near the image, sometimes any float.
  if (in.ConsumeIntegralInRange<int>(0, 3) == 0) {
    const uint32_t bits = in.ConsumeIntegral<uint32_t>();
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  }
  return static_cast<float>(in.ConsumeIntegralInRange<int32_t>(-8, 80)) + in.ConsumeProbability<float>();
}

vle::Region next_region(FuzzedDataProvider& in, int64_t width, int64_t height, int64_t thumb) {
  vle::Region r;
  r.kind = static_cast<vle::Region::Kind>(in.ConsumeIntegralInRange<int>(0, 3));
  if (r.kind == vle::Region::Kind::kBox || r.kind == vle::Region::Kind::kPoint) {
    const size_t wanted = r.kind == vle::Region::Kind::kBox ? 4 : 2;
    const size_t n = in.ConsumeIntegralInRange<int>(0, 7) == 0 ? in.ConsumeIntegralInRange<size_t>(0, 6) : wanted;
    for (size_t i = 0; i < n; ++i) r.coords.push_back(next_float(in));
    return r;
  }
  // A mask of the image's (or the thumbnail's) size mostly, sometimes another.
  const int64_t want_w = r.kind == vle::Region::Kind::kMask ? width : thumb;
  const int64_t want_h = r.kind == vle::Region::Kind::kMask ? height : thumb;
  const bool other = in.ConsumeIntegralInRange<int>(0, 7) == 0;
  r.mask_width = other ? in.ConsumeIntegralInRange<int64_t>(-2, 70) : want_w;
  r.mask_height = other ? in.ConsumeIntegralInRange<int64_t>(-2, 70) : want_h;
  const int64_t cells = r.mask_width > 0 && r.mask_height > 0 ? r.mask_width * r.mask_height : 0;
  const size_t bytes = static_cast<size_t>(cells) + (in.ConsumeIntegralInRange<int>(0, 15) == 0 ? 1 : 0);
  // A few bytes from the input, repeated over the mask, so that masks are sparse, dense or any byte value.
  std::vector<uint8_t> pattern = in.ConsumeBytes<uint8_t>(in.ConsumeIntegralInRange<size_t>(1, 32));
  if (pattern.empty()) pattern.push_back(0);
  r.mask.resize(bytes);
  for (size_t i = 0; i < bytes; ++i) r.mask[i] = pattern[i % pattern.size()];
  return r;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const int64_t width = in.ConsumeIntegralInRange<int64_t>(1, 64);
  const int64_t height = in.ConsumeIntegralInRange<int64_t>(1, 64);
  const int64_t thumb = in.ConsumeIntegralInRange<int64_t>(1, 48);
  std::vector<float> out(static_cast<size_t>(thumb * thumb));
  for (size_t index = 0; in.remaining_bytes() > 0 && index < 8; ++index) {
    const vle::Region region = next_region(in, width, height, thumb);
    try {
      vle::rasterise_region(region, index, width, height, thumb, out.data());
      for (float v : out) {
        if (v != 0.f && v != 1.f) __builtin_trap();  // a mask of 0 and 1, nothing else
      }
    } catch (const vle::InputError&) {
      // A refusal naming the region: the answer to a region that is empty, outside the image or misshapen.
    }
  }
  return 0;
}
