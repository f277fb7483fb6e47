// The largest value the manifest may give each size it sets, and the image caps the decoders share. A manifest is untrusted input (artifacts are
// copied between machines), and every one of these sizes reaches an allocation or a loop bound: the KV arena
// (context x layers x heads x head_dim), the token table (vocab x hidden), the query rows, the CLIP tiles,
// the decoders' image, the diffusion latents and steps, the decoders' top-k. Each cap is far above any
// VisionLLM v2 model (the 7B: hidden 4096, 32 layers, 32 heads of 128, vocab 32k, context 4096) and low
// enough that products of them stay inside int64; the products are checked as well (memory/checked.h).
// docs/limits.md lists them with every other limit and refusal.
#pragma once

#include <cstdint>

namespace vle::limits {

inline constexpr int64_t kMaxHiddenSize = 65536;
inline constexpr int64_t kMaxLayers = 1024;
inline constexpr int64_t kMaxHeads = 1024;         // num_heads and num_kv_heads
inline constexpr int64_t kMaxHeadDim = 1024;
inline constexpr int64_t kMaxVocab = 1 << 24;
inline constexpr int64_t kMaxContext = 1 << 20;    // model.max_context, in rows
inline constexpr int64_t kMaxQueries = 4096;       // routing.<kind>.queries
inline constexpr int64_t kMaxTiles = 64;           // preprocess.clip.max_tiles, and a grid's side
inline constexpr int64_t kMaxTileSize = 4096;      // preprocess.clip.tile_size, in pixels
inline constexpr int64_t kMaxPatchesPerTile = 65536;
// An image's side (the caller's, a file's, and the manifest's detection and diffusion sizes) and the pixels a
// file may decode to, checked from its header before any pixel is decoded (Pillow's decompression-bomb
// threshold; the Python SDK's MAX_IMAGE_SIDE and MAX_IMAGE_PIXELS are the same).
inline constexpr int64_t kMaxImageSide = 16384;
inline constexpr int64_t kMaxImagePixels = 178956970;
inline constexpr int64_t kMaxSizeDivisibility = 1024;
inline constexpr int64_t kMaxTopK = 10000;         // postprocess.det_top_k, pose_top_k
inline constexpr int64_t kMaxDiffusionSteps = 1000;  // generation.diffusion_steps (a DDPM's train steps)

}  // namespace vle::limits
