// vle::Image::load on the image files fuzz/cpp/fuzz_image.cpp found (fuzz/corpus/image/regression_*; see
// docs/limits.md, "Fuzzing"): JPEGs whose Huffman tables define more than 256 codes, which made stb_image
// 2.27 write past its tables (a UBSan report, then memory corruption), and a JPEG whose scan decodes with a
// table no DHT defined, are refused with an InputError naming the file and the table; valid JPEGs decode.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "test_util.h"
#include "visionllm_edge/pipeline.h"

namespace {

const std::string kData = VLE_SOURCE_DIR "/csrc/tests/data/fuzz/";

TEST(ImageFiles, JpegHuffmanTableWithTooManyCodesIsRefused) {
  const std::string path = kData + "jpeg_dht_codes.jpg";
  EXPECT_EQ(vle::test_util::message_of<vle::InputError>([&] { vle::Image::load(path); }),
            "cannot read image " + path + ": corrupt JPEG: the Huffman table at byte 165 defines 368 codes, more than 256");
}

// The table's counts run past the end of the file, which stb reads as zeros: counted as it counts them.
TEST(ImageFiles, JpegHuffmanTableCutByTheEndOfTheFileIsRefused) {
  const std::string path = kData + "jpeg_dht_truncated.jpg";
  EXPECT_EQ(vle::test_util::message_of<vle::InputError>([&] { vle::Image::load(path); }),
            "cannot read image " + path + ": corrupt JPEG: the Huffman table at byte 476 defines 1388 codes, more than 256");
}

// stb takes fill bytes (0xFF) before SOI: such a file is checked as a JPEG too.
TEST(ImageFiles, JpegAfterFillBytesIsCheckedToo) {
  const std::string path = kData + "jpeg_dht_fill_bytes.jpg";
  EXPECT_EQ(vle::test_util::message_of<vle::InputError>([&] { vle::Image::load(path); }),
            "cannot read image " + path + ": corrupt JPEG: the Huffman table at byte 440 defines 738 codes, more than 256");
}

// A progressive scan decoding with an AC table that no DHT defined yet: stb read the table's uninitialised
// memory as code offsets (UBSan: index -16711606 out of bounds for type 'stbi_uc[256]').
TEST(ImageFiles, JpegScanWithAnUndefinedHuffmanTableIsRefused) {
  const std::string path = kData + "jpeg_undefined_table.jpg";
  EXPECT_EQ(vle::test_util::message_of<vle::InputError>([&] { vle::Image::load(path); }),
            "cannot read image " + path + ": corrupt JPEG: the scan at byte 294 decodes with the AC table 1, "
            "which no Huffman table segment before it defines");
}

// The fuzzer's seeds, 8 x 6 JPEGs after their 16 parameter bytes (fuzz/cpp/make_seeds.py, Pillow): baseline,
// progressive (DC scans name AC tables not defined yet, which they do not use), 4:2:0, grayscale, CMYK.
TEST(ImageFiles, ValidJpegsStillDecode) {
  for (const char* name : {"baseline.jpg", "progressive.jpg", "subsampled.jpg", "gray.jpg", "cmyk.jpg"}) {
    std::ifstream seed(std::string(VLE_SOURCE_DIR "/fuzz/corpus/image/") + name, std::ios::binary);
    ASSERT_TRUE(seed) << name;
    seed.ignore(16);
    const std::string jpeg((std::istreambuf_iterator<char>(seed)), std::istreambuf_iterator<char>());
    const std::filesystem::path path = std::filesystem::temp_directory_path() / (std::string("vle_test_seed_") + name);
    std::ofstream(path, std::ios::binary) << jpeg;
    const vle::Image image = vle::Image::load(path.string());
    std::filesystem::remove(path);
    EXPECT_EQ(image.width(), 8) << name;
    EXPECT_EQ(image.height(), 6) << name;
  }
}

}  // namespace
