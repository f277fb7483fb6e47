// The names export and runtime agree on, in C++: the graphs an artifact may hold with their file and I/O
// names, the components, the special tokens and routing kinds, and the chat template's constants. They
// mirror python/visionllm_edge/contract.py, and a test proves the two are equal. The loop and the manifest
// parser take every name from here or from the manifest, never from a string literal of their own.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace vle::contract {

// --- files ------------------------------------------------------------------------------------------------
inline constexpr const char* kManifestFile = "manifest.json";
inline constexpr const char* kTokenizerFile = "tokenizer.json";
inline constexpr const char* kSentencePieceFile = "tokenizer.model";
inline constexpr const char* kEmbeddingsFile = "embeddings.safetensors";
inline constexpr const char* kValidationFile = "validation.json";
// The unconditional (empty-prompt) context of each diffusion decoder: one float32 tensor [1, 77, D] in
// "<kind>_uncond.safetensors" ("{kind}" stands for gen or edit).
inline constexpr const char* kUncondFile = "{kind}_uncond.safetensors";
inline constexpr const char* kUncondTensor = "uncond";

// --- the manifest format ----------------------------------------------------------------------------------
// The schema version this build writes and reads, and the oldest one it still reads (older artifacts must be
// re-exported: version 2 added tokenizer.sentencepiece).
inline constexpr int64_t kManifestSchemaVersion = 2;
inline constexpr int64_t kManifestMinSchemaVersion = 2;
inline constexpr const char* kProducerName = "visionllm-edge";
inline constexpr const char* kPackageVersion = "0.1.0";  // visionllm_edge.__version__, named in messages
// Tensor dtypes and graph precisions a manifest may name, in the order messages list them.
const std::vector<std::string>& dtypes();
const std::vector<std::string>& precisions();
// The decoders routing entries name, and the super-link query tables of embeddings.safetensors.
const std::vector<std::string>& decoders();
const std::vector<std::string>& query_tables();
// Every token the manifest's `tokens` section must give an id: the added tokens, then <s>, </s>, <unk>.
const std::vector<std::string>& required_tokens();
inline constexpr const char* kClipResample = "bicubic";
inline constexpr const char* kDetectionResample = "bilinear";
// VAE latents are 1/8 of the image side: diffusion image sizes are multiples of this.
inline constexpr int64_t kVaeScale = 8;

// --- graphs and their I/O names ---------------------------------------------------------------------------
struct GraphNames {
  std::string file;
  std::vector<std::string> inputs;   // "{i}" stands for the LLM layer index
  std::vector<std::string> outputs;
};
const std::map<std::string, GraphNames>& graphs();
// The graph names in contract order (the order messages list them in).
const std::vector<std::string>& graph_names();
// Component (what `components` names) -> its graphs, in contract order.
const std::vector<std::pair<std::string, std::vector<std::string>>>& component_graphs();
// "past_key.{i}" -> "past_key.3".
std::string layer_name(const std::string& name_template, int64_t layer);

namespace graph {
inline constexpr const char* kVision = "vision";
inline constexpr const char* kRegion = "region";
inline constexpr const char* kLlm = "llm";
inline constexpr const char* kDet = "det";
inline constexpr const char* kPose = "pose";
// The generation graphs are "<kind>_mapper" etc. for kind gen / edit.
inline constexpr const char* kMapperSuffix = "_mapper";
inline constexpr const char* kUnetSuffix = "_unet";
inline constexpr const char* kVaeDecoderSuffix = "_vae_decoder";
inline constexpr const char* kVaeEncoderSuffix = "_vae_encoder";
}  // namespace graph

namespace io {
// vision: tiles [T,3,S,S] -> projected embeddings [T,P,H] and the thumbnail's CLIP levels [3,P,C]
inline constexpr const char* kPixelValues = "pixel_values";
inline constexpr const char* kImageEmbeds = "image_embeds";
inline constexpr const char* kRegionLevels = "region_levels";
// region: thumbnail [1,3,S,S], masks [R,S,S], levels -> [R,H]
inline constexpr const char* kRegionImage = "image";
inline constexpr const char* kRegionMasks = "masks";
inline constexpr const char* kRegionEmbeds = "region_embeds";
// llm: inputs_embeds [1,S,H], position_ids [S], output_rows [R], past K/V per layer -> logits [R,V],
// hidden [R,H], the step's new K/V rows per layer
inline constexpr const char* kInputsEmbeds = "inputs_embeds";
inline constexpr const char* kPositionIds = "position_ids";
inline constexpr const char* kOutputRows = "output_rows";
inline constexpr const char* kPastKey = "past_key.{i}";
inline constexpr const char* kPastValue = "past_value.{i}";
inline constexpr const char* kLogits = "logits";
inline constexpr const char* kHidden = "hidden";
inline constexpr const char* kPresentKey = "present_key.{i}";
inline constexpr const char* kPresentValue = "present_value.{i}";
// det (object decoder) and pose (keypoint decoder); pixel_values as above
inline constexpr const char* kPixelMask = "pixel_mask";
inline constexpr const char* kTextQuery = "text_query";
inline constexpr const char* kTextQueryMask = "text_query_mask";
inline constexpr const char* kMaskQueryIndex = "mask_query_index";
inline constexpr const char* kPredBoxes = "pred_boxes";
inline constexpr const char* kPredMasks = "pred_masks";
inline constexpr const char* kObjectQuery = "object_query";
inline constexpr const char* kObjectQueryMask = "object_query_mask";
inline constexpr const char* kKeypointQuery = "keypoint_query";
inline constexpr const char* kKeypointQueryMask = "keypoint_query_mask";
inline constexpr const char* kPredLogits = "pred_logits";
inline constexpr const char* kPredKeypoints = "pred_keypoints";
// generation / editing
inline constexpr const char* kLinkStates = "link_states";
inline constexpr const char* kConditioning = "conditioning";
inline constexpr const char* kSample = "sample";
inline constexpr const char* kTimestep = "timestep";
inline constexpr const char* kEncoderHiddenStates = "encoder_hidden_states";
inline constexpr const char* kNoisePred = "noise_pred";
inline constexpr const char* kLatents = "latents";
inline constexpr const char* kImages = "images";
}  // namespace io

// --- tokens -----------------------------------------------------------------------------------------------
// The 26 tokens the official training adds, in the official order.
const std::vector<std::string>& added_tokens();
inline constexpr const char* kImageToken = "<image>";
inline constexpr const char* kImagePatchToken = "<im_patch>";
inline constexpr const char* kRegionToken = "<region>";
inline constexpr const char* kRegionOpen = "<reg>";
inline constexpr const char* kRegionClose = "</reg>";
inline constexpr const char* kBosToken = "<s>";
inline constexpr const char* kEosToken = "</s>";
inline constexpr const char* kUnkToken = "<unk>";
// The only markers that act as tokens in a user's prompt.
const std::vector<std::string>& input_markers();
// Routing token -> kind, in contract order ([DET] det, [GRD] grd, [SEG] seg, [POSE] pose, [GEN] gen, [EDIT] edit).
const std::vector<std::pair<std::string, std::string>>& routing_tokens();
// The routing kinds in contract order, and the routing token of a kind ("" when it is none).
const std::vector<std::string>& routing_kinds();
const std::string& routing_token_of(const std::string& kind);
// Kind -> query table (det, grd and seg share "det") and kind -> decoder (object, pose, gen, edit).
const std::string& query_table_of(const std::string& kind);
const std::string& decoder_of(const std::string& kind);
bool is_object_kind(const std::string& kind);      // det grd seg
bool is_generation_kind(const std::string& kind);  // gen edit
const std::vector<std::string>& generation_kinds();
// [EMB] [EMB2] ... [EMB8]; perception groups take the first N, generation groups N x [EMB].
const std::vector<std::string>& placeholders();
inline constexpr const char* kGenerationPlaceholder = "[EMB]";

// --- chat template (official vicuna_v1) -------------------------------------------------------------------
extern const char* const kSystemPrompt;
inline constexpr const char* kUserRole = "USER";
inline constexpr const char* kAssistantRole = "ASSISTANT";
inline constexpr const char* kSep = " ";
inline constexpr const char* kSep2 = "</s>";
const std::vector<std::string>& label_delimiters();

}  // namespace vle::contract
