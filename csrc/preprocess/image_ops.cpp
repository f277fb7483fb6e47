#include "preprocess/image_ops.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace vle {

namespace {

// --- PIL's resampling (src/libImaging/Resample.c), kept operation for operation ---------------------------
//
// Bit-exactness depends on doing the same double arithmetic in the same order as PIL: the filter centre,
// the rounded window bounds, the normalised weights, the 22-bit fixed-point rounding and the order of the
// two passes. Integer accumulation is exact, so the loop order inside a pass is free.

// PIL keeps 8 bits for the result and 2 for overflow of filters with negative lobes.
constexpr int kPrecisionBits = 32 - 8 - 2;

double bilinear_filter(double x) {
  if (x < 0.0) x = -x;
  if (x < 1.0) return 1.0 - x;
  return 0.0;
}

// Keys' cubic convolution with a = -0.5, as PIL writes it.
double bicubic_filter(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

struct Filter {
  double (*fn)(double);
  double support;
};

Filter filter_for(ResampleFilter filter) {
  return filter == ResampleFilter::kBicubic ? Filter{bicubic_filter, 2.0} : Filter{bilinear_filter, 1.0};
}

// One axis of the resampling: for every output index, the first input index, the number of taps and the
// fixed-point weights (`ksize` slots per output, zero beyond the taps).
struct AxisCoefficients {
  int64_t ksize = 0;
  std::vector<int64_t> first;
  std::vector<int64_t> count;
  std::vector<int32_t> weights;
};

// PIL's precompute_coeffs (box = the whole axis) followed by normalize_coeffs_8bpc.
AxisCoefficients precompute_coefficients(int64_t in_size, int64_t out_size, const Filter& filter) {
  AxisCoefficients c;
  // PIL: (double)(in1 - in0) / outSize with the float box (0, in_size); exact for any image size.
  const double scale = static_cast<double>(in_size) / static_cast<double>(out_size);
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = filter.support * filterscale;
  c.ksize = static_cast<int64_t>(std::ceil(support)) * 2 + 1;
  c.first.resize(out_size);
  c.count.resize(out_size);
  c.weights.assign(out_size * c.ksize, 0);
  std::vector<double> k(c.ksize);
  const double ss = 1.0 / filterscale;
  for (int64_t xx = 0; xx < out_size; ++xx) {
    const double center = 0.0 + (static_cast<double>(xx) + 0.5) * scale;
    // Truncation toward zero, as PIL's (int) cast.
    int64_t xmin = static_cast<int64_t>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int64_t xmax = static_cast<int64_t>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int64_t x = 0; x < xmax; ++x) {
      const double w = filter.fn((static_cast<double>(x + xmin) - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    int32_t* out = &c.weights[xx * c.ksize];
    for (int64_t x = 0; x < xmax; ++x) {
      const double w = ww != 0.0 ? k[x] / ww : k[x];
      const double fixed = w * static_cast<double>(1 << kPrecisionBits);
      out[x] = static_cast<int32_t>(w < 0 ? -0.5 + fixed : 0.5 + fixed);
    }
    c.first[xx] = xmin;
    c.count[xx] = xmax;
  }
  return c;
}

// PIL's clip8: drop the fraction bits (arithmetic shift), clamp to a byte.
inline uint8_t clip8(int32_t sum) {
  const int32_t v = sum >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

constexpr int32_t kRoundHalf = 1 << (kPrecisionBits - 1);

// Rows per thread at least in the resampling passes; below this, thread start-up costs more than it saves.
constexpr int64_t kMinRowsPerThread = 256;

// Horizontal pass over image rows [row_first, row_first + rows) into a packed rows x out_width x 3 buffer.
void resample_horizontal(const ImageView& image, int64_t row_first, int64_t rows,
                         const AxisCoefficients& c, int64_t out_width, uint8_t* out) {
  const int64_t cs = image.channel_stride;
  parallel_chunks(rows, kMinRowsPerThread, [&](int64_t r_begin, int64_t r_end) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      const uint8_t* row = image.data + (row_first + r) * image.row_stride;
      uint8_t* dst = out + r * out_width * 3;
      for (int64_t xx = 0; xx < out_width; ++xx) {
        const int32_t* k = &c.weights[xx * c.ksize];
        const uint8_t* p = row + c.first[xx] * image.pixel_stride;
        int32_t s0 = kRoundHalf, s1 = kRoundHalf, s2 = kRoundHalf;
        for (int64_t x = 0; x < c.count[xx]; ++x, p += image.pixel_stride) {
          s0 += p[0] * k[x];
          s1 += p[cs] * k[x];
          s2 += p[2 * cs] * k[x];
        }
        dst[xx * 3 + 0] = clip8(s0);
        dst[xx * 3 + 1] = clip8(s1);
        dst[xx * 3 + 2] = clip8(s2);
      }
    }
  });
}

// Vertical pass from a packed buffer whose row 0 is input row `row_first`. Rows are accumulated whole
// (integer sums, so the order is free) to keep the inner loop contiguous and vectorisable.
void resample_vertical(const uint8_t* in, int64_t row_first, int64_t width, const AxisCoefficients& c,
                       int64_t out_height, uint8_t* out) {
  const int64_t n = width * 3;
  parallel_chunks(out_height, kMinRowsPerThread, [&](int64_t y_begin, int64_t y_end) {
    std::vector<int32_t> acc(n);
    for (int64_t yy = y_begin; yy < y_end; ++yy) {
      std::fill(acc.begin(), acc.end(), kRoundHalf);
      const int32_t* k = &c.weights[yy * c.ksize];
      for (int64_t y = 0; y < c.count[yy]; ++y) {
        const uint8_t* row = in + (c.first[yy] - row_first + y) * n;
        const int32_t w = k[y];
        for (int64_t i = 0; i < n; ++i) acc[i] += row[i] * w;
      }
      uint8_t* dst = out + yy * n;
      for (int64_t i = 0; i < n; ++i) dst[i] = clip8(acc[i]);
    }
  });
}

// Copies image rows [row_first, row_first + rows) into a packed buffer.
void pack_rows(const ImageView& image, int64_t row_first, int64_t rows, uint8_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t x = 0; x < image.width; ++x) {
      for (int64_t ch = 0; ch < 3; ++ch) *out++ = image.at(row_first + r, x, ch);
    }
  }
}

std::string size_text(int64_t width, int64_t height) {
  return std::to_string(width) + "x" + std::to_string(height);
}

void check_image(const char* fn, const ImageView& image) {
  if (image.height <= 0 || image.width <= 0) {
    throw std::invalid_argument(std::string(fn) + ": image has zero size (" +
                                size_text(image.width, image.height) + ")");
  }
}

void check_positive(const char* fn, const char* name, int64_t value) {
  if (value <= 0) {
    throw std::invalid_argument(std::string(fn) + ": " + name + " must be positive, got " +
                                std::to_string(value));
  }
}

// Per-channel lookup table of a normalisation: 256 float32 values per channel, so each pixel costs one
// load and the arithmetic is exactly the reference's (done once per byte value).
using ChannelLut = std::array<std::array<float, 256>, 3>;

ChannelLut clip_lut(const Channels& mean, const Channels& std) {
  ChannelLut lut;
  for (int c = 0; c < 3; ++c) {
    for (int v = 0; v < 256; ++v) {
      // np.asarray(tile, float32) / np.float32(255), then (x - mean) / std, all float32.
      lut[c][v] = (static_cast<float>(v) / 255.0f - mean[c]) / std[c];
    }
  }
  return lut;
}

ChannelLut imagenet_lut(const Channels& mean, const Channels& std) {
  ChannelLut lut;
  for (int c = 0; c < 3; ++c) {
    // np.asarray(mean, float32) * 255 stays float32 under NumPy 2's promotion rules.
    const float m = mean[c] * 255.0f;
    const float s = std[c] * 255.0f;
    for (int v = 0; v < 256; ++v) lut[c][v] = (static_cast<float>(v) - m) / s;
  }
  return lut;
}

void check_channels(const char* fn, const Channels& std) {
  for (int c = 0; c < 3; ++c) {
    if (!(std[c] > 0.0f) || !std::isfinite(std[c])) {
      throw std::invalid_argument(std::string(fn) + ": std must be positive and finite, got std[" +
                                  std::to_string(c) + "] = " + std::to_string(std[c]));
    }
  }
}

// One packed size x size RGB tile (row stride `row_pixels`) to planar CHW float.
void normalise_tile(const uint8_t* tile, int64_t row_pixels, int64_t size, const ChannelLut& lut,
                    float* out) {
  for (int64_t c = 0; c < 3; ++c) {
    float* plane = out + c * size * size;
    for (int64_t y = 0; y < size; ++y) {
      const uint8_t* src = tile + y * row_pixels * 3 + c;
      float* dst = plane + y * size;
      for (int64_t x = 0; x < size; ++x) dst[x] = lut[c][src[x * 3]];
    }
  }
}

void check_thumb(const char* fn, int64_t image_width, int64_t image_height, int64_t thumb_size) {
  if (image_width <= 0 || image_height <= 0) {
    throw std::invalid_argument(std::string(fn) + ": image_size must be positive, got " +
                                size_text(image_width, image_height));
  }
  check_positive(fn, "thumb_size", thumb_size);
}

std::string number_text(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

}  // namespace

void resize_rgb(const ImageView& image, int64_t out_width, int64_t out_height, ResampleFilter filter,
                uint8_t* out) {
  check_image("resize", image);
  check_positive("resize", "out_w", out_width);
  check_positive("resize", "out_h", out_height);
  const Filter f = filter_for(filter);
  // PIL: need_horizontal = xsize != imIn->xsize (the box is the whole image), likewise vertical.
  const bool need_horizontal = out_width != image.width;
  const bool need_vertical = out_height != image.height;
  if (!need_horizontal && !need_vertical) {
    pack_rows(image, 0, image.height, out);
    return;
  }
  if (!need_vertical) {
    resample_horizontal(image, 0, image.height, precompute_coefficients(image.width, out_width, f),
                        out_width, out);
    return;
  }
  const AxisCoefficients vertical = precompute_coefficients(image.height, out_height, f);
  const int64_t row_first = vertical.first[0];
  const int64_t row_last = vertical.first[out_height - 1] + vertical.count[out_height - 1];
  const int64_t rows = row_last - row_first;
  if (need_horizontal && out_height < image.height &&
      image.height - out_height > 2 * (image.width - out_width)) {
    // Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass first when the height shrinks by more
    // than twice what the width does. The uint8 rounding between the passes makes the order visible,
    // so it is followed here (rule checked against the installed Pillow on random sizes, in the tests).
    std::vector<uint8_t> source(rows * image.width * 3);
    pack_rows(image, row_first, rows, source.data());
    std::vector<uint8_t> mid(out_height * image.width * 3);
    resample_vertical(source.data(), row_first, image.width, vertical, out_height, mid.data());
    const ImageView packed{mid.data(), out_height, image.width, image.width * 3, 3, 1};
    resample_horizontal(packed, 0, out_height, precompute_coefficients(image.width, out_width, f), out_width,
                        out);
    return;
  }
  // Horizontal first: only the input rows the vertical pass reads are resampled, as PIL does.
  const int64_t mid_width = need_horizontal ? out_width : image.width;
  std::vector<uint8_t> mid(rows * mid_width * 3);
  if (need_horizontal) {
    resample_horizontal(image, row_first, rows, precompute_coefficients(image.width, out_width, f),
                        out_width, mid.data());
  } else {
    pack_rows(image, row_first, rows, mid.data());
  }
  resample_vertical(mid.data(), row_first, mid_width, vertical, out_height, out);
}

int64_t clip_tile_count(int64_t grid_cols, int64_t grid_rows) {
  const int64_t n = grid_cols * grid_rows;
  return n > 1 ? n + 1 : n;
}

void clip_tiles(const ImageView& image, int64_t grid_cols, int64_t grid_rows, int64_t tile_size,
                const Channels& mean, const Channels& std, float* out) {
  check_image("clip_tiles", image);
  check_positive("clip_tiles", "grid_cols", grid_cols);
  check_positive("clip_tiles", "grid_rows", grid_rows);
  check_positive("clip_tiles", "tile_size", tile_size);
  check_channels("clip_tiles", std);
  const ChannelLut lut = clip_lut(mean, std);
  const int64_t width = tile_size * grid_cols;
  const int64_t height = tile_size * grid_rows;
  std::vector<uint8_t> resized(width * height * 3);
  resize_rgb(image, width, height, ResampleFilter::kBicubic, resized.data());
  const int64_t tile_floats = 3 * tile_size * tile_size;
  const int64_t grid_tiles = grid_cols * grid_rows;
  for (int64_t t = 0; t < grid_tiles; ++t) {
    const int64_t x0 = (t % grid_cols) * tile_size;
    const int64_t y0 = (t / grid_cols) * tile_size;
    normalise_tile(resized.data() + (y0 * width + x0) * 3, width, tile_size, lut, out + t * tile_floats);
  }
  if (grid_tiles > 1) {
    // The thumbnail is resized from the original image, not from the grid image.
    std::vector<uint8_t> thumb(tile_size * tile_size * 3);
    resize_rgb(image, tile_size, tile_size, ResampleFilter::kBicubic, thumb.data());
    normalise_tile(thumb.data(), tile_size, tile_size, lut, out + grid_tiles * tile_floats);
  }
}

Size2 detection_resized_size(int64_t width, int64_t height, int64_t short_side, int64_t max_long_side) {
  if (width <= 0 || height <= 0) {
    throw std::invalid_argument("detection_input: image has zero size (" + size_text(width, height) + ")");
  }
  check_positive("detection_input", "short_side", short_side);
  check_positive("detection_input", "max_long_side", max_long_side);
  const double w = static_cast<double>(width);
  const double h = static_cast<double>(height);
  const double scale = std::min(static_cast<double>(short_side) / std::min(w, h),
                                static_cast<double>(max_long_side) / std::max(w, h));
  // Python's int() truncates; the value is positive, so this is round-half-up.
  const int64_t nw = std::max<int64_t>(1, static_cast<int64_t>(w * scale + 0.5));
  const int64_t nh = std::max<int64_t>(1, static_cast<int64_t>(h * scale + 0.5));
  return {nh, nw};
}

Size2 detection_padded_size(Size2 resized, int64_t size_divisibility, std::optional<Size2> pad_to) {
  if (pad_to) {
    if (pad_to->height < resized.height || pad_to->width < resized.width) {
      throw std::invalid_argument(
          "detection_input: pad_to (" + std::to_string(pad_to->height) + ", " +
          std::to_string(pad_to->width) + ") is smaller than the resized image (" +
          std::to_string(resized.height) + ", " + std::to_string(resized.width) + ")");
    }
    return *pad_to;
  }
  check_positive("detection_input", "size_divisibility", size_divisibility);
  const int64_t d = size_divisibility;
  return {(resized.height + d - 1) / d * d, (resized.width + d - 1) / d * d};
}

void detection_input(const ImageView& image, Size2 resized, Size2 padded, const Channels& mean,
                     const Channels& std, float* pixels, bool* mask) {
  check_image("detection_input", image);
  check_channels("detection_input", std);
  if (padded.height < resized.height || padded.width < resized.width) {
    throw std::invalid_argument("detection_input: padded size is smaller than the resized size");
  }
  std::vector<uint8_t> small(resized.height * resized.width * 3);
  resize_rgb(image, resized.width, resized.height, ResampleFilter::kBilinear, small.data());
  const ChannelLut lut = imagenet_lut(mean, std);
  const int64_t plane = padded.height * padded.width;
  std::fill(pixels, pixels + 3 * plane, 0.0f);
  std::fill(mask, mask + plane, false);
  for (int64_t c = 0; c < 3; ++c) {
    for (int64_t y = 0; y < resized.height; ++y) {
      const uint8_t* src = small.data() + y * resized.width * 3 + c;
      float* dst = pixels + c * plane + y * padded.width;
      for (int64_t x = 0; x < resized.width; ++x) dst[x] = lut[c][src[x * 3]];
    }
  }
  for (int64_t y = 0; y < resized.height; ++y) {
    std::fill(mask + y * padded.width, mask + y * padded.width + resized.width, true);
  }
}

void region_mask_box(const std::array<double, 4>& box, int64_t image_width, int64_t image_height,
                     int64_t thumb_size, float* out) {
  check_thumb("region_mask_box", image_width, image_height, thumb_size);
  const double w = static_cast<double>(image_width), h = static_cast<double>(image_height);
  const double x0 = box[0], y0 = box[1], x1 = box[2], y1 = box[3];
  // Written so that NaN fails, as the reference's chained comparison does.
  if (!(0 <= x0 && x0 < x1 && x1 <= w && 0 <= y0 && y0 < y1 && y1 <= h)) {
    throw std::invalid_argument("region_mask_box: box (" + number_text(x0) + ", " + number_text(y0) + ", " +
                                number_text(x1) + ", " + number_text(y1) + ") is empty or outside the " +
                                size_text(image_width, image_height) + " image");
  }
  const int64_t s = thumb_size;
  const double sx = static_cast<double>(s) / w, sy = static_cast<double>(s) / h;
  const int64_t c0 = static_cast<int64_t>(std::floor(x0 * sx));
  const int64_t r0 = static_cast<int64_t>(std::floor(y0 * sy));
  const int64_t c1 = std::max(c0 + 1, static_cast<int64_t>(std::ceil(x1 * sx)));
  const int64_t r1 = std::max(r0 + 1, static_cast<int64_t>(std::ceil(y1 * sy)));
  std::fill(out, out + s * s, 0.0f);
  // Slice bounds clamp at the edge, as torch's `mask[r0:r1, c0:c1]` does.
  for (int64_t r = std::min(r0, s); r < std::min(r1, s); ++r) {
    std::fill(out + r * s + std::min(c0, s), out + r * s + std::min(c1, s), 1.0f);
  }
}

void region_mask_point(const std::array<double, 2>& point, int64_t image_width, int64_t image_height,
                       int64_t thumb_size, float* out) {
  check_thumb("region_mask_point", image_width, image_height, thumb_size);
  const double w = static_cast<double>(image_width), h = static_cast<double>(image_height);
  const double x = point[0], y = point[1];
  if (!(0 <= x && x < w && 0 <= y && y < h)) {
    throw std::invalid_argument("region_mask_point: point (" + number_text(x) + ", " + number_text(y) +
                                ") is outside the " + size_text(image_width, image_height) + " image");
  }
  const int64_t s = thumb_size;
  const double sx = static_cast<double>(s) / w, sy = static_cast<double>(s) / h;
  std::fill(out, out + s * s, 0.0f);
  const int64_t r = std::min(static_cast<int64_t>(y * sy), s - 1);
  const int64_t c = std::min(static_cast<int64_t>(x * sx), s - 1);
  out[r * s + c] = 1.0f;
}

void region_mask_from_mask(const BoolMaskView& mask, int64_t image_width, int64_t image_height,
                           int64_t thumb_size, float* out) {
  check_thumb("region_mask_mask", image_width, image_height, thumb_size);
  if (mask.height != image_height || mask.width != image_width) {
    throw std::invalid_argument("region_mask_mask: mask: expected shape (" + std::to_string(image_height) +
                                ", " + std::to_string(image_width) + ") (the image), got (" +
                                std::to_string(mask.height) + ", " + std::to_string(mask.width) + ")");
  }
  bool any = false;
  for (int64_t y = 0; y < mask.height && !any; ++y) {
    for (int64_t x = 0; x < mask.width; ++x) {
      if (mask.at(y, x)) {
        any = true;
        break;
      }
    }
  }
  if (!any) throw std::invalid_argument("region_mask_mask: region mask is empty");
  const int64_t s = thumb_size;
  // PIL's NEAREST resize (ImagingScaleAffine): positions start at half a step and are accumulated in
  // double, then truncated; a position outside the source is filled with 0.
  const double step_x = static_cast<double>(static_cast<float>(image_width)) / static_cast<double>(s);
  const double step_y = static_cast<double>(static_cast<float>(image_height)) / static_cast<double>(s);
  std::vector<int64_t> cols(s);
  double xo = 0.0 + step_x * 0.5;
  for (int64_t x = 0; x < s; ++x, xo += step_x) cols[x] = xo < 0.0 ? -1 : static_cast<int64_t>(xo);
  double yo = 0.0 + step_y * 0.5;
  for (int64_t y = 0; y < s; ++y, yo += step_y) {
    const int64_t yi = yo < 0.0 ? -1 : static_cast<int64_t>(yo);
    float* dst = out + y * s;
    for (int64_t x = 0; x < s; ++x) {
      const int64_t xi = cols[x];
      const bool inside = yi >= 0 && yi < mask.height && xi >= 0 && xi < mask.width;
      dst[x] = inside && mask.at(yi, xi) ? 1.0f : 0.0f;
    }
  }
}

}  // namespace vle
