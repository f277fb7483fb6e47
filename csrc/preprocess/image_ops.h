// Image preprocessing of the runtime (docs/architecture.md §3 step 1), bit-compatible with the reference in
// export/preprocess.py: PIL's bicubic / bilinear resampling, CLIP anyres tiles, the decoders' padded
// ImageNet-normalised image and the rasterised visual prompts.
//
// Every function writes into a caller-allocated output, so the bindings can hand numpy's own buffers in
// and run the whole computation with the GIL released.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <exception>
#include <optional>
#include <thread>
#include <vector>

namespace vle {

// Runs fn(begin, end) over contiguous chunks of [0, n) on up to hardware_concurrency() threads, each chunk
// at least `min_chunk` long. Callers split work so that every output element is computed by exactly one
// chunk with the same arithmetic, so results do not depend on the thread count.
template <typename Fn>
void parallel_chunks(int64_t n, int64_t min_chunk, Fn&& fn) {
  const int64_t hardware = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t tasks = std::max<int64_t>(1, std::min(hardware, n / std::max<int64_t>(1, min_chunk)));
  if (tasks == 1) {
    if (n > 0) fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(tasks);
  for (int64_t t = 0; t < tasks; ++t) {
    threads.emplace_back([&, t] {
      try {
        fn(n * t / tasks, n * (t + 1) / tasks);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (const std::exception_ptr& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

// A read-only view of an H x W x 3 uint8 RGB image. Strides are in elements (bytes), any sign, so numpy
// views such as a BGR->RGB flip (`a[:, :, ::-1]`) or a crop are read in place, without a copy.
struct ImageView {
  const uint8_t* data;
  int64_t height;
  int64_t width;
  int64_t row_stride;
  int64_t pixel_stride;
  int64_t channel_stride;

  uint8_t at(int64_t y, int64_t x, int64_t c) const {
    return data[y * row_stride + x * pixel_stride + c * channel_stride];
  }
};

// A read-only strided view of an H x W bool mask (strides in elements).
struct BoolMaskView {
  const bool* data;
  int64_t height;
  int64_t width;
  int64_t row_stride;
  int64_t col_stride;

  bool at(int64_t y, int64_t x) const { return data[y * row_stride + x * col_stride]; }
};

// Height and width in pixels.
struct Size2 {
  int64_t height;
  int64_t width;
};

// Per-channel (R, G, B) normalisation constants, float32 as the reference computes with them.
using Channels = std::array<float, 3>;

// PIL's resampling filters that the reference uses (`Image.BICUBIC`, `Image.BILINEAR`).
enum class ResampleFilter { kBilinear, kBicubic };

// `PIL.Image.resize((out_width, out_height), filter)` of an RGB image, bit-exact: PIL's separable
// convolution whose support widens with the downscale factor (antialiasing), coefficients rounded to
// 22-bit fixed point, horizontal pass then vertical pass, each clipped to uint8. `out` is
// out_height x out_width x 3, packed.
void resize_rgb(const ImageView& image, int64_t out_width, int64_t out_height, ResampleFilter filter,
                uint8_t* out);

// Number of tiles `clip_tiles` writes for a grid: cols * rows, plus the thumbnail when that is above 1.
int64_t clip_tile_count(int64_t grid_cols, int64_t grid_rows);

// The official anyres tiling + CLIPImageProcessor normalisation (`export.preprocess.anyres_tiles`): the
// image resized bicubic (aspect not kept) to the grid, cut into tile_size tiles row-major, and, for more
// than one tile, a bicubic thumbnail of the whole image last. Each pixel is (v / 255 - mean) / std in
// float32. `out` is [clip_tile_count, 3, tile_size, tile_size].
void clip_tiles(const ImageView& image, int64_t grid_cols, int64_t grid_rows, int64_t tile_size,
                const Channels& mean, const Channels& std, float* out);

// The decoders' resized size (`export.preprocess.detection_image`): scale = min(short_side / min(w, h),
// max_long_side / max(w, h)), each side int(side * scale + 0.5), at least 1; computed in double as the
// reference does in Python.
Size2 detection_resized_size(int64_t width, int64_t height, int64_t short_side, int64_t max_long_side);

// The padded size of the decoders' image: `pad_to` when given (a fixed engine bucket; it must hold the
// resized image), else the resized size rounded up to a multiple of `size_divisibility`.
Size2 detection_padded_size(Size2 resized, int64_t size_divisibility, std::optional<Size2> pad_to);

// The decoders' input: the image resized bilinear to `resized`, normalised as (v - mean * 255) /
// (std * 255) in float32 (mean and std in [0, 1] units, as the manifest stores them), zero-padded to
// `padded`. `pixels` is [3, padded.height, padded.width]; `mask` is [padded.height, padded.width], true
// on the image and false on the padding.
void detection_input(const ImageView& image, Size2 resized, Size2 padded, const Channels& mean,
                     const Channels& std, float* pixels, bool* mask);

// A visual prompt rasterised into the thumb_size x thumb_size thumbnail frame, exactly as
// `export.preprocess.region_mask` does; `out` is [thumb_size, thumb_size] float32 of 0 and 1.
//
// A box (x0, y0, x1, y1) in original pixels must satisfy 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height;
// it covers the cells from floor(x0 * s) to ceil(x1 * s), at least one.
void region_mask_box(const std::array<double, 4>& box, int64_t image_width, int64_t image_height,
                     int64_t thumb_size, float* out);
// A point (x, y) in original pixels, inside the image; it marks one cell.
void region_mask_point(const std::array<double, 2>& point, int64_t image_width, int64_t image_height,
                       int64_t thumb_size, float* out);
// An H x W mask in the original frame (it must match the image and be non-empty), resized with PIL's
// NEAREST rule (source index = int((i + 0.5) * in / out), accumulated in double as PIL does).
void region_mask_from_mask(const BoolMaskView& mask, int64_t image_width, int64_t image_height,
                           int64_t thumb_size, float* out);

}  // namespace vle
