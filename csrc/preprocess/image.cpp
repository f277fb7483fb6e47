// vle::Image: the caller's pixels copied, converted or borrowed, and image files decoded with stb_image
// (PNG, JPEG, BMP). Decoding follows what the Python SDK's Pillow path gives: grayscale is replicated to
// RGB, alpha dropped, 16-bit channels reduced to their high byte except 16-bit grayscale, which is divided
// by 257 as the SDK does.
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
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
// stb_image calls memcpy(dst, src, 0) with a null dst (a PNG whose first IDAT chunk is empty, before any
// buffer exists): harmless, but UBSan's nonnull-attribute check reports it (fuzz/cpp/fuzz_image.cpp found
// it). That one check is off inside stb's functions; every other sanitizer check stays on there.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((no_sanitize("nonnull-attribute"))), apply_to = function)
#endif
#include <stb/stb_image.h>
#if defined(__clang__)
#pragma clang attribute pop
#endif
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

// stb_image 2.27 (Debian 12's libstb-dev) reads and writes out of bounds on two kinds of corrupt JPEG
// (nothings/stb issues 1289 and 1291, fixed upstream in 2.28; both found here by fuzz/cpp/fuzz_image.cpp):
// a DHT segment defining more than 256 codes in one table overruns the table, and a scan decoding with a
// Huffman table no DHT defined reads the table's uninitialised memory as code offsets. The file is checked
// here first, read as stb reads it: each DHT table is Tc/Th, 16 code counts and that many symbols (ITU-T
// T.81, B.2.4.2), tables follow each other up to the segment's declared length, and bytes past the end of
// the file read as 0; each SOS lists its components' DC and AC table selectors, and stb decodes a
// sequential scan with both, a progressive one with the DC table (first DC pass) or the AC table (Ss > 0)
// only. Markers are found as stb finds them, a 0xFF byte followed by a marker code anywhere (entropy-coded
// data included), so every table stb could read is checked. Returns what is wrong, or "" for a file with
// neither fault.
std::string jpeg_huffman_problem(const std::string& bytes) {
  const auto at = [&](size_t i) -> size_t { return i < bytes.size() ? static_cast<uint8_t>(bytes[i]) : 0; };
  bool defined[2][4] = {};  // [Tc: 0 DC, 1 AC][Th]
  bool progressive = false;
  size_t pos = 0;
  while (pos + 4 <= bytes.size()) {
    if (at(pos) != 0xFF) {
      ++pos;  // entropy-coded data
      continue;
    }
    const size_t marker = at(pos + 1);
    // Fill bytes, stuffed zeros, RSTn, TEM and SOI have no length field.
    if (marker == 0xFF) {
      ++pos;
      continue;
    }
    if (marker == 0x00 || marker == 0x01 || marker == 0xD8 || (marker >= 0xD0 && marker <= 0xD7)) {
      pos += 2;
      continue;
    }
    if (marker == 0xD9) break;  // EOI
    const size_t length = at(pos + 2) << 8 | at(pos + 3);  // counts itself, not the marker
    if (marker == 0xC0 || marker == 0xC1 || marker == 0xC2) progressive = marker == 0xC2;
    if (marker == 0xC4) {
      for (size_t t = pos + 4; t < pos + 2 + length && t < bytes.size();) {
        size_t codes = 0;
        for (size_t i = 1; i <= 16; ++i) codes += at(t + i);
        if (codes > 256) {
          return "corrupt JPEG: the Huffman table at byte " + std::to_string(t) + " defines " +
                 std::to_string(codes) + " codes, more than 256";
        }
        const size_t tc = at(t) >> 4, th = at(t) & 15;
        if (tc <= 1 && th <= 3) defined[tc][th] = true;  // stb refuses other values itself
        t += 17 + codes;
      }
    }
    if (marker == 0xDA) {
      const size_t components = at(pos + 4);
      const size_t spectral = pos + 5 + 2 * components;  // Ss, Se, Ah/Al
      const bool dc_first = at(spectral) == 0 && (at(spectral + 2) >> 4) == 0;
      const bool ac = at(spectral) != 0;
      for (size_t c = 0; c < components && c < 4; ++c) {
        const size_t selectors = at(pos + 6 + 2 * c);
        const size_t dc = selectors >> 4, acs = selectors & 15;
        const bool needs_dc = progressive ? (!ac && dc_first) : true;
        const bool needs_ac = progressive ? ac : true;
        if ((needs_dc && dc <= 3 && !defined[0][dc]) || (needs_ac && acs <= 3 && !defined[1][acs])) {
          return "corrupt JPEG: the scan at byte " + std::to_string(pos) + " decodes with the " +
                 (needs_dc && dc <= 3 && !defined[0][dc] ? "DC table " + std::to_string(dc)
                                                          : "AC table " + std::to_string(acs)) +
                 ", which no Huffman table segment before it defines";
        }
      }
    }
    pos += 2 + std::max<size_t>(length, 2);
  }
  return "";
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
  {
    std::ifstream in(path, std::ios::binary);
    // stb takes a file for a JPEG when it starts with 0xFF: fill bytes may come before SOI.
    char first = 0;
    if (in.get(first) && static_cast<uint8_t>(first) == 0xFF) {
      std::ostringstream text;
      text << first << in.rdbuf();
      const std::string problem = jpeg_huffman_problem(text.str());
      if (!problem.empty()) throw InputError("cannot read image " + path + ": " + problem);
    }
  }
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
