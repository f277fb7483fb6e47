// Image decoding and preprocessing (preprocess/image.cpp, image_ops.cpp, preprocess.cpp, node/perception_node.cpp):
// bytes as an image file (PNG, JPEG, BMP through stb_image; any size in the header, any mode: gray, gray +
// alpha, RGB, RGBA, palette, 16-bit, CMYK) or as a camera frame (sensor_msgs/Image: any encoding string,
// width, height, step and data length), then the request's preprocessing of the decoded image: the anyres
// grid, the CLIP tiles and the decoders' resized, normalised and padded input.
//
// Layout of an input: the first kParamBytes bytes choose the path and the preprocessing sizes (the manifest's,
// kept small so that each input runs fast; the caps on them are the manifest parser's), the rest is the file
// or the frame's data.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <stb/stb_image.h>  // declarations only: the implementation is in preprocess/image.cpp

#include "artifact/limits.h"
#include "fuzz_common.h"
#include "preprocess/image_ops.h"
#include "preprocess/preprocess.h"
#include "visionllm_edge/errors.h"
#include "visionllm_edge/perception_node.h"
#include "visionllm_edge/pipeline.h"

namespace {

constexpr size_t kParamBytes = 16;
// A file whose header claims more pixels than this, but not more than the cap, is not decoded: a 100-byte
// file may claim 88 million pixels (under the 179 million cap, as a decompression bomb within Pillow's limit
// may), and stb decodes them all from zeros past the end, which under ASan and coverage takes longer than
// the -timeout, a hang to libFuzzer. Decoding costs in proportion to the pixels and each row is the same
// code, so small images reach the decoders' paths; the header checks (over the cap: refused before any pixel
// is decoded) run for every size.
constexpr int64_t kMaxDecodedPixels = int64_t{1} << 22;
// Preprocessing costs in proportion to the pixels; larger images are decoded (and their header caps
// checked) but not preprocessed, so the fuzzer spends its time on many inputs instead of a few big ones.
constexpr int64_t kMaxPreprocessedPixels = int64_t{1} << 20;

const vle::Channels kClipMean{0.48145466f, 0.4578275f, 0.40821073f};
const vle::Channels kClipStd{0.26862954f, 0.26130258f, 0.27577711f};
const vle::Channels kImageNetMean{0.485f, 0.456f, 0.406f};
const vle::Channels kImageNetStd{0.229f, 0.224f, 0.225f};

void preprocess(const vle::Image& image, FuzzedDataProvider& params) {
  const int64_t tile = params.ConsumeIntegralInRange<int64_t>(1, 48);
  std::vector<vle::Grid> grids(params.ConsumeIntegralInRange<size_t>(1, 3));
  for (vle::Grid& g : grids) {
    g.cols = params.ConsumeIntegralInRange<int64_t>(1, 4);
    g.rows = params.ConsumeIntegralInRange<int64_t>(1, 4);
  }
  const int64_t short_side = params.ConsumeIntegralInRange<int64_t>(1, 96);
  const int64_t max_long_side = params.ConsumeIntegralInRange<int64_t>(1, 160);
  const int64_t divisibility = params.ConsumeIntegralInRange<int64_t>(1, 64);
  std::optional<vle::Size2> pad_to;
  if (params.ConsumeBool()) {
    pad_to = vle::Size2{params.ConsumeIntegralInRange<int64_t>(1, 192), params.ConsumeIntegralInRange<int64_t>(1, 192)};
  }

  const vle::ImageView view{image.data(), image.height(), image.width(), image.width() * 3, 3, 1};
  const vle::Grid grid = vle::choose_anyres_grid(image.width(), image.height(), tile, grids);
  const int64_t tiles = vle::clip_tile_count(grid.cols, grid.rows);
  std::vector<float> clip(static_cast<size_t>(tiles * 3 * tile * tile));
  vle::clip_tiles(view, grid.cols, grid.rows, tile, kClipMean, kClipStd, clip.data());

  const vle::Size2 resized = vle::detection_resized_size(image.width(), image.height(), short_side, max_long_side);
  const vle::Size2 padded = vle::detection_padded_size(resized, divisibility, pad_to);
  std::vector<float> pixels(static_cast<size_t>(3 * padded.height * padded.width));
  std::vector<uint8_t> mask(static_cast<size_t>(padded.height * padded.width));
  vle::detection_input(view, resized, padded, kImageNetMean, kImageNetStd, pixels.data(),
                       reinterpret_cast<bool*>(mask.data()));
}

struct Header {
  int64_t width = 0;
  int64_t height = 0;
};

// The size a file's header claims. Not stbi_info for a JPEG (a file starting with 0xFF): it builds the
// Huffman tables that Image::load checks first (see preprocess/image.cpp), so it would run into the very
// bug that check keeps out; there the first SOF segment's size is read instead.
Header claimed_size(const std::string& path, const uint8_t* bytes, size_t size) {
  Header h;
  if (size > 0 && bytes[0] == 0xFF) {
    for (size_t i = 0; i + 9 <= size; ++i) {
      const uint8_t m = bytes[i + 1];
      if (bytes[i] == 0xFF && m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC) {
        h.height = bytes[i + 5] << 8 | bytes[i + 6];
        h.width = bytes[i + 7] << 8 | bytes[i + 8];
        break;
      }
    }
    return h;
  }
  int width = 0, height = 0, channels = 0;
  if (stbi_info(path.c_str(), &width, &height, &channels)) h = {width, height};
  return h;
}

vle::Image camera_frame(FuzzedDataProvider& params, const uint8_t* data, size_t size) {
  vle::CameraFrame frame;
  const std::vector<std::string>& encodings = vle::camera_encodings();
  const size_t pick = params.ConsumeIntegralInRange<size_t>(0, encodings.size());
  frame.encoding = pick < encodings.size() ? encodings[pick] : params.ConsumeRandomLengthString(8);
  // Mostly sizes that fit the data, sometimes any uint32.
  const bool any = params.ConsumeIntegralInRange<int>(0, 7) == 0;
  frame.width = any ? params.ConsumeIntegral<uint32_t>() : params.ConsumeIntegralInRange<uint32_t>(0, 64);
  frame.height = any ? params.ConsumeIntegral<uint32_t>() : params.ConsumeIntegralInRange<uint32_t>(0, 64);
  frame.step = any ? params.ConsumeIntegral<uint32_t>() : frame.width * params.ConsumeIntegralInRange<uint32_t>(0, 5);
  frame.is_bigendian = params.ConsumeIntegral<uint8_t>();
  frame.data.assign(data, data + size);
  return vle::camera_frame_rgb(frame);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static vle::fuzz::MemoryFile file("image");
  if (size < kParamBytes) return 0;
  FuzzedDataProvider params(data, kParamBytes);
  const bool frame = params.ConsumeIntegralInRange<int>(0, 3) == 0;
  try {
    vle::Image image;
    if (frame) {
      image = camera_frame(params, data + kParamBytes, size - kParamBytes);
    } else {
      const std::string& path = file.write(data + kParamBytes, size - kParamBytes);
      const Header header = claimed_size(path, data + kParamBytes, size - kParamBytes);
      const int64_t pixels = header.width * header.height;
      if (pixels > kMaxDecodedPixels && pixels <= vle::limits::kMaxImagePixels &&
          header.width <= vle::limits::kMaxImageSide && header.height <= vle::limits::kMaxImageSide) {
        return 0;
      }
      image = vle::Image::load(path);
    }
    if (image.empty() || image.width() <= 0 || image.height() <= 0) __builtin_trap();  // decoded means pixels
    if (image.width() * image.height() <= kMaxPreprocessedPixels) preprocess(image, params);
  } catch (const vle::Error&) {
    // A refusal naming the file or frame: the decoder's answer to a bad image.
  } catch (const std::invalid_argument&) {
    // The preprocessing helpers' refusal of sizes they cannot serve (a padded size below the resized one).
  }
  return 0;
}
