// vle::Image: the caller's pixels copied, converted or borrowed, and image files decoded with stb_image
// (PNG, JPEG, BMP). Decoding follows what the Python SDK's Pillow path gives: grayscale is replicated to
// RGB, alpha dropped, 16-bit channels reduced to their high byte except 16-bit grayscale, which is divided
// by 257 as the SDK does.
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <system_error>

#define STBI_ONLY_PNG
#define STBI_ONLY_JPEG
#define STBI_ONLY_BMP
#define STBI_NO_STDIO_WARNINGS
#define STB_IMAGE_IMPLEMENTATION
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#include <stb/stb_image.h>
#pragma GCC diagnostic pop

#include "artifact/limits.h"
#include "visionllm_edge/pipeline.h"

namespace vle {
namespace {

using limits::kMaxImagePixels;
using limits::kMaxImageSide;

std::string size_text(int64_t width, int64_t height) {
  return std::to_string(width) + "x" + std::to_string(height);
}

void check_pixels(const char* fn, const uint8_t* pixels, int64_t width, int64_t height) {
  if (width <= 0 || height <= 0) {
    throw InputError(std::string(fn) + ": image has zero size (" + size_text(width, height) + ")");
  }
  if (width > kMaxImageSide || height > kMaxImageSide) {
    throw InputError(std::string(fn) + ": image is " + size_text(width, height) +
                     "; the largest side allowed is " + std::to_string(kMaxImageSide));
  }
  if (pixels == nullptr) throw InputError(std::string(fn) + ": pixels is null for a " + size_text(width, height) + " image");
}

std::shared_ptr<uint8_t> allocate(int64_t bytes) {
  return std::shared_ptr<uint8_t>(new uint8_t[static_cast<size_t>(bytes)], std::default_delete<uint8_t[]>());
}

}  // namespace

Image Image::rgb(const uint8_t* pixels, int64_t width, int64_t height) {
  check_pixels("Image::rgb", pixels, width, height);
  const int64_t bytes = width * height * 3;
  std::shared_ptr<uint8_t> copy = allocate(bytes);
  std::memcpy(copy.get(), pixels, static_cast<size_t>(bytes));
  Image im;
  im.width_ = width;
  im.height_ = height;
  im.data_ = std::move(copy);
  return im;
}

Image Image::bgr(const uint8_t* pixels, int64_t width, int64_t height) {
  check_pixels("Image::bgr", pixels, width, height);
  const int64_t n = width * height;
  std::shared_ptr<uint8_t> copy = allocate(n * 3);
  uint8_t* dst = copy.get();
  for (int64_t i = 0; i < n; ++i) {
    dst[i * 3 + 0] = pixels[i * 3 + 2];
    dst[i * 3 + 1] = pixels[i * 3 + 1];
    dst[i * 3 + 2] = pixels[i * 3 + 0];
  }
  Image im;
  im.width_ = width;
  im.height_ = height;
  im.data_ = std::move(copy);
  return im;
}

Image Image::view(const uint8_t* pixels, int64_t width, int64_t height) {
  check_pixels("Image::view", pixels, width, height);
  Image im;
  im.width_ = width;
  im.height_ = height;
  im.data_ = std::shared_ptr<const uint8_t>(pixels, [](const uint8_t*) {});  // borrowed: never freed here
  return im;
}

Image Image::load(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) throw InputError("image file not found: " + path);
  if (std::filesystem::is_directory(path, ec)) throw InputError("cannot read image " + path + ": it is a folder");
  // The header first: the size is checked before any pixel memory is allocated.
  int width = 0, height = 0, channels = 0;
  if (!stbi_info(path.c_str(), &width, &height, &channels)) {
    throw InputError("cannot read image " + path + ": " + stbi_failure_reason());
  }
  if (width <= 0 || height <= 0) {
    throw InputError("cannot read image " + path + ": image has zero size (" + size_text(width, height) + ")");
  }
  if (width > kMaxImageSide || height > kMaxImageSide) {
    throw InputError("cannot read image " + path + ": image is " + size_text(width, height) +
                     "; the largest side allowed is " + std::to_string(kMaxImageSide));
  }
  if (static_cast<int64_t>(width) * height > kMaxImagePixels) {
    throw InputError("cannot read image " + path + ": " + size_text(width, height) + " is " +
                     std::to_string(static_cast<int64_t>(width) * height) + " pixels; the most allowed is " +
                     std::to_string(kMaxImagePixels));
  }

  Image im;
  int w = 0, h = 0, c = 0;
  if (channels == 1 && stbi_is_16_bit(path.c_str())) {
    // 16-bit grayscale: v / 257 (truncated), replicated to RGB.
    stbi_us* gray = stbi_load_16(path.c_str(), &w, &h, &c, 1);
    if (gray == nullptr) throw InputError("cannot read image " + path + ": " + stbi_failure_reason());
    std::unique_ptr<stbi_us, void (*)(void*)> owner(gray, stbi_image_free);
    std::shared_ptr<uint8_t> out = allocate(static_cast<int64_t>(w) * h * 3);
    for (int64_t i = 0; i < static_cast<int64_t>(w) * h; ++i) {
      const uint8_t v = static_cast<uint8_t>(gray[i] / 257);
      out.get()[i * 3] = out.get()[i * 3 + 1] = out.get()[i * 3 + 2] = v;
    }
    im.data_ = std::move(out);
  } else {
    stbi_uc* pixels = stbi_load(path.c_str(), &w, &h, &c, 3);
    if (pixels == nullptr) throw InputError("cannot read image " + path + ": " + stbi_failure_reason());
    im.data_ = std::shared_ptr<const uint8_t>(pixels, [](const uint8_t* p) { stbi_image_free(const_cast<uint8_t*>(p)); });
  }
  im.width_ = w;
  im.height_ = h;
  return im;
}

}  // namespace vle
