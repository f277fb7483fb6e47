#include "artifact/contract.h"

#include <stdexcept>

#include "visionllm_edge/errors.h"

namespace vle::contract {

const std::map<std::string, GraphNames>& graphs() {
  static const std::map<std::string, GraphNames> table = {
      {"vision", {"vision.onnx", {"pixel_values"}, {"image_embeds", "region_levels"}}},
      {"region", {"region.onnx", {"image", "masks", "region_levels"}, {"region_embeds"}}},
      {"llm",
       {"llm.onnx",
        {"inputs_embeds", "position_ids", "output_rows", "past_key.{i}", "past_value.{i}"},
        {"logits", "hidden", "present_key.{i}", "present_value.{i}"}}},
      {"det",
       {"det.onnx",
        {"pixel_values", "pixel_mask", "text_query", "text_query_mask", "mask_query_index"},
        {"logits", "pred_boxes", "pred_masks"}}},
      {"pose",
       {"pose.onnx",
        {"pixel_values", "pixel_mask", "object_query", "object_query_mask", "keypoint_query",
         "keypoint_query_mask"},
        {"pred_logits", "pred_boxes", "pred_keypoints"}}},
      {"gen_mapper", {"gen_mapper.onnx", {"link_states"}, {"conditioning"}}},
      {"gen_unet", {"gen_unet.onnx", {"sample", "timestep", "encoder_hidden_states"}, {"noise_pred"}}},
      {"gen_vae_decoder", {"gen_vae_decoder.onnx", {"latents"}, {"images"}}},
      {"edit_mapper", {"edit_mapper.onnx", {"link_states"}, {"conditioning"}}},
      {"edit_unet", {"edit_unet.onnx", {"sample", "timestep", "encoder_hidden_states"}, {"noise_pred"}}},
      {"edit_vae_decoder", {"edit_vae_decoder.onnx", {"latents"}, {"images"}}},
      {"edit_vae_encoder", {"edit_vae_encoder.onnx", {"images"}, {"latents"}}},
  };
  return table;
}

const std::vector<std::string>& graph_names() {
  static const std::vector<std::string> names = {
      "vision",   "region",          "llm",         "det",       "pose",             "gen_mapper",
      "gen_unet", "gen_vae_decoder", "edit_mapper", "edit_unet", "edit_vae_decoder", "edit_vae_encoder"};
  return names;
}

const std::vector<std::pair<std::string, std::vector<std::string>>>& component_graphs() {
  static const std::vector<std::pair<std::string, std::vector<std::string>>> table = {
      {"vision", {"vision"}},
      {"region", {"region"}},
      {"llm", {"llm"}},
      {"det", {"det"}},
      {"pose", {"pose"}},
      {"gen", {"gen_mapper", "gen_unet", "gen_vae_decoder"}},
      {"edit", {"edit_mapper", "edit_unet", "edit_vae_decoder", "edit_vae_encoder"}},
  };
  return table;
}

std::string layer_name(const std::string& name_template, int64_t layer) {
  const size_t at = name_template.find("{i}");
  if (at == std::string::npos) return name_template;
  return name_template.substr(0, at) + std::to_string(layer) + name_template.substr(at + 3);
}

const std::vector<std::string>& added_tokens() {
  static const std::vector<std::string> tokens = {
      "[PAD]", "<image>", "<im_patch>", "<region>", "<img>", "</img>", "<reg>", "</reg>", "<det>",
      "</det>", "<grd>", "</grd>", "[DET]", "[GRD]", "[SEG]", "[POSE]", "[GEN]", "[EDIT]",
      "[EMB]", "[EMB2]", "[EMB3]", "[EMB4]", "[EMB5]", "[EMB6]", "[EMB7]", "[EMB8]"};
  return tokens;
}

const std::vector<std::string>& input_markers() {
  static const std::vector<std::string> markers = {kImageToken, kRegionToken, kRegionOpen, kRegionClose};
  return markers;
}

const std::vector<std::pair<std::string, std::string>>& routing_tokens() {
  static const std::vector<std::pair<std::string, std::string>> table = {
      {"[DET]", "det"}, {"[GRD]", "grd"}, {"[SEG]", "seg"},
      {"[POSE]", "pose"}, {"[GEN]", "gen"}, {"[EDIT]", "edit"}};
  return table;
}

const std::vector<std::string>& routing_kinds() {
  static const std::vector<std::string> kinds = [] {
    std::vector<std::string> out;
    for (const auto& entry : routing_tokens()) out.push_back(entry.second);
    return out;
  }();
  return kinds;
}

const std::string& routing_token_of(const std::string& kind) {
  static const std::string none;
  for (const auto& entry : routing_tokens()) {
    if (entry.second == kind) return entry.first;
  }
  return none;
}

const std::vector<std::string>& dtypes() {
  static const std::vector<std::string> table = {"float32", "float16", "int64", "bool", "int32"};
  return table;
}

const std::vector<std::string>& precisions() {
  static const std::vector<std::string> table = {"fp32", "fp16", "int8", "int4"};
  return table;
}

const std::vector<std::string>& decoders() {
  static const std::vector<std::string> table = {"object", "pose", "gen", "edit"};
  return table;
}

const std::vector<std::string>& query_tables() {
  static const std::vector<std::string> table = {"det", "pose", "gen", "edit"};
  return table;
}

const std::vector<std::string>& required_tokens() {
  static const std::vector<std::string> tokens = [] {
    std::vector<std::string> out = added_tokens();
    out.insert(out.end(), {kBosToken, kEosToken, kUnkToken});
    return out;
  }();
  return tokens;
}

namespace {

const std::map<std::string, std::pair<std::string, std::string>>& kind_table() {
  // kind -> (query table, decoder)
  static const std::map<std::string, std::pair<std::string, std::string>> table = {
      {"det", {"det", "object"}}, {"grd", {"det", "object"}}, {"seg", {"det", "object"}},
      {"pose", {"pose", "pose"}}, {"gen", {"gen", "gen"}},     {"edit", {"edit", "edit"}}};
  return table;
}

const std::pair<std::string, std::string>& kind_entry(const std::string& kind) {
  const auto it = kind_table().find(kind);
  if (it == kind_table().end()) {
    throw InputError("unknown routing kind '" + kind + "' (known: det, grd, seg, pose, gen, edit)");
  }
  return it->second;
}

}  // namespace

const std::string& query_table_of(const std::string& kind) { return kind_entry(kind).first; }
const std::string& decoder_of(const std::string& kind) { return kind_entry(kind).second; }
bool is_object_kind(const std::string& kind) { return kind == "det" || kind == "grd" || kind == "seg"; }
bool is_generation_kind(const std::string& kind) { return kind == "gen" || kind == "edit"; }

const std::vector<std::string>& generation_kinds() {
  static const std::vector<std::string> kinds = {"gen", "edit"};
  return kinds;
}

const std::vector<std::string>& placeholders() {
  static const std::vector<std::string> table = {"[EMB]",  "[EMB2]", "[EMB3]", "[EMB4]",
                                                 "[EMB5]", "[EMB6]", "[EMB7]", "[EMB8]"};
  return table;
}

const char* const kSystemPrompt =
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.";

const std::vector<std::string>& label_delimiters() {
  static const std::vector<std::string> table = {", ", ". ", ": ", " for ", " and ", " of "};
  return table;
}

}  // namespace vle::contract
