// A request's frame: the image's CLIP tiles, the vision and region encoders, the decoders' input, cached
// per frame (keyed by the pixels and the regions).
#include "loop/pipeline_impl.h"

#include <array>

#include <openssl/evp.h>

#include "preprocess/regions.h"

namespace vle {

using namespace loop;

namespace {

std::string sha1_key(const std::vector<std::pair<const void*, size_t>>& parts) {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  if (ctx == nullptr) throw std::bad_alloc();
  EVP_DigestInit_ex(ctx, EVP_sha1(), nullptr);
  for (const auto& [data, size] : parts) EVP_DigestUpdate(ctx, data, size);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_DigestFinal_ex(ctx, digest, &length);
  EVP_MD_CTX_free(ctx);
  return std::string(reinterpret_cast<const char*>(digest), length);
}

// A new frame keeps the arena's rows before the first image-dependent one (a patch or region row): under causal
// attention they saw only the image-independent ids before them (the system prompt), so any frame may reuse
// them (docs/architecture.md §3).
void keep_image_independent_prefix(std::vector<int64_t>& cached_ids, int64_t patch_id, int64_t region_id) {
  const auto first = std::find_if(cached_ids.begin(), cached_ids.end(),
                                  [&](int64_t id) { return id == patch_id || id == region_id; });
  cached_ids.erase(first, cached_ids.end());
}

}  // namespace

// --- frames ---------------------------------------------------------------------------------------------------

Frame& Pipeline::Impl::frame_for(const Image& image, const RunOptions& options, Result& result) {
  if (image.empty()) {
    if (!options.regions.empty()) throw InputError("regions need an image");
    if (!frame || frame->key != "text-only") {
      frame = Frame{};
      frame->key = "text-only";
      keep_image_independent_prefix(cached_ids, patch_id, region_id);
    }
    return *frame;
  }
  std::string key;
  {
    StageTimer t(result, "preprocess");
    std::vector<std::pair<const void*, size_t>> parts;
    const int64_t dims[2] = {image.width(), image.height()};
    parts.emplace_back(dims, sizeof dims);
    parts.emplace_back(image.data(), static_cast<size_t>(image.width() * image.height() * 3));
    // Each region's kind and sizes, so that the bytes after them read one way only. They live until the key is
    // made: the parts point into them (a kind held in the loop's scope was read after its end, caught by ASan).
    std::vector<std::array<int64_t, 5>> headers;
    headers.reserve(options.regions.size());
    for (const Region& r : options.regions) {
      headers.push_back({static_cast<int64_t>(r.kind), static_cast<int64_t>(r.coords.size()),
                         static_cast<int64_t>(r.mask.size()), r.mask_width, r.mask_height});
      parts.emplace_back(headers.back().data(), sizeof(headers.back()));
      parts.emplace_back(r.coords.data(), r.coords.size() * sizeof(float));
      parts.emplace_back(r.mask.data(), r.mask.size());
    }
    key = sha1_key(parts);
  }
  if (frame && frame->key == key) return *frame;
  Frame f;
  f.key = key;
  f.image = Image::rgb(image.data(), image.width(), image.height());  // the frame outlives the caller's pixels
  f.width = image.width();
  f.height = image.height();
  const ClipPreprocess& clip = manifest.clip;
  {
    StageTimer t(result, "preprocess");
    std::vector<Grid> grids;
    for (const auto& [cols, rows] : clip.candidate_grids) grids.push_back({cols, rows});
    const Grid grid = choose_anyres_grid(f.width, f.height, clip.tile_size, grids);
    f.num_tiles = clip_tile_count(grid.cols, grid.rows);
    f.tiles.resize(static_cast<size_t>(f.num_tiles * 3 * clip.tile_size * clip.tile_size));
    clip_tiles(image_view(f.image), grid.cols, grid.rows, clip.tile_size, clip.mean, clip.std, f.tiles.data());
  }
  {
    StageTimer t(result, "vision");
    std::vector<uint16_t> storage;
    const TensorView pixels = float_input(contract::graph::kVision, contract::io::kPixelValues, f.tiles.data(),
                                          {f.num_tiles, 3, clip.tile_size, clip.tile_size}, storage);
    auto out = engine(contract::graph::kVision)
                   .run({{contract::io::kPixelValues, pixels}}, {}, {contract::io::kImageEmbeds, contract::io::kRegionLevels});
    const Tensor embeds = to_float(out[0]);
    if (embeds.shape().size() != 3 || embeds.shape()[2] != hidden) {
      throw EngineError("vision: image_embeds has shape " + shape_text(embeds.shape()) + ", expected [T, P, " +
                        std::to_string(hidden) + "]");
    }
    f.num_patches = embeds.shape()[0] * embeds.shape()[1];
    f.image_embeds.assign(embeds.data_as<float>(), embeds.data_as<float>() + embeds.numel());
    f.region_levels = out[1];
  }
  if (!options.regions.empty()) {
    StageTimer t(result, "region");
    encode_regions(f, options.regions);
  }
  frame = std::move(f);
  keep_image_independent_prefix(cached_ids, patch_id, region_id);
  return *frame;
}

void Pipeline::Impl::encode_regions(Frame& f, const std::vector<Region>& regions) {
  const int64_t size = manifest.clip.tile_size;
  const int64_t cells = size * size;
  std::vector<float> masks(static_cast<size_t>(cells) * regions.size());
  for (size_t i = 0; i < regions.size(); ++i) {
    rasterise_region(regions[i], i, f.width, f.height, size, masks.data() + i * static_cast<size_t>(cells));
  }
  const int64_t n = static_cast<int64_t>(regions.size());
  std::vector<uint16_t> s1, s2;
  const float* thumbnail = f.tiles.data() + (f.num_tiles - 1) * 3 * cells;
  const TensorView image = float_input(contract::graph::kRegion, contract::io::kRegionImage, thumbnail,
                                       {1, 3, size, size}, s1);
  const TensorView mask_view = float_input(contract::graph::kRegion, contract::io::kRegionMasks, masks.data(),
                                           {n, size, size}, s2);
  TensorView levels = f.region_levels.view();
  std::vector<uint16_t> s3;
  Tensor levels_f;
  const TensorSpec* want = graph(contract::graph::kRegion).input(contract::io::kRegionLevels);
  if (want && want->dtype != levels.dtype) {
    levels_f = to_float(f.region_levels);
    levels = float_input(contract::graph::kRegion, contract::io::kRegionLevels, levels_f.data_as<float>(),
                         levels_f.shape(), s3);
  }
  auto out = engine(contract::graph::kRegion)
                 .run({{contract::io::kRegionImage, image}, {contract::io::kRegionMasks, mask_view},
                       {contract::io::kRegionLevels, levels}},
                      {}, {contract::io::kRegionEmbeds});
  const Tensor rows = to_float(out[0]);
  f.region_rows.assign(rows.data_as<float>(), rows.data_as<float>() + rows.numel());
  f.num_regions = n;
}

DetectionInput Pipeline::Impl::detection_input(const Image& image) const {
  const DetectionPreprocess& d = manifest.detection;
  std::optional<Size2> pad_to;
  if (manifest.has_graph(contract::graph::kDet)) {
    // A decoder exported at one static size (a bucket) takes every image padded into it; a dynamic one takes
    // the image padded to a multiple of size_divisibility, as the official code does.
    const auto& facts = manifest.graph(contract::graph::kDet).facts;
    const auto it = facts.find("image_size");
    if (it != facts.end() && it->is_array() && it->size() == 2) pad_to = Size2{(*it)[0].get<int64_t>(), (*it)[1].get<int64_t>()};
  }
  const Size2 resized = detection_resized_size(image.width(), image.height(), d.short_side, d.max_long_side);
  const Size2 padded = detection_padded_size(resized, d.size_divisibility, pad_to);
  DetectionInput in;
  in.pixel_values = Array::make(Array::Type::kFloat32, {1, 3, padded.height, padded.width});
  in.pixel_mask = Array::make(Array::Type::kBool, {1, padded.height, padded.width});
  vle::detection_input(image_view(image), resized, padded, d.mean, d.std, in.pixel_values.as<float>(),
                       in.pixel_mask.as<bool>());
  in.resized_hw = {resized.height, resized.width};
  return in;
}

const DetectionInput& Pipeline::Impl::frame_detection_input(Frame& f, const RunOptions& options) {
  if (options.det_input) return *options.det_input;
  if (options.det_image) {
    det_scratch = detection_input(*options.det_image);
    return det_scratch;
  }
  if (f.image.empty()) throw InputError("this answer routes to a perception decoder, which needs an image");
  if (!f.det) f.det = detection_input(f.image);
  return *f.det;
}

}  // namespace vle
