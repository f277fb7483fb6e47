// The token names and the chat-template text the tokenizer and the template build on, in one C++ place.
// They mirror python/visionllm_edge/contract.py value for value; tests/test_tokenizer.py checks that
// through the bindings, so a change on one side without the other fails there.
#pragma once

#include <array>
#include <string_view>
#include <utility>

namespace vle::chat {

// The 26 tokens the official training adds to the Llama vocabulary, in their official order (ids
// consecutive from the base vocabulary size).
inline constexpr std::array<std::string_view, 26> kAddedTokens = {
    "[PAD]", "<image>", "<im_patch>", "<region>", "<img>",  "</img>",  "<reg>",  "</reg>", "<det>",
    "</det>", "<grd>",  "</grd>",     "[DET]",    "[GRD]",  "[SEG]",   "[POSE]", "[GEN]",  "[EDIT]",
    "[EMB]",  "[EMB2]", "[EMB3]",     "[EMB4]",   "[EMB5]", "[EMB6]",  "[EMB7]", "[EMB8]",
};

inline constexpr std::string_view kBosToken = "<s>";
inline constexpr std::string_view kEosToken = "</s>";
inline constexpr std::string_view kUnkToken = "<unk>";
inline constexpr std::string_view kImageToken = "<image>";
inline constexpr std::string_view kImagePatchToken = "<im_patch>";
inline constexpr std::string_view kRegionToken = "<region>";
inline constexpr std::string_view kRegionOpen = "<reg>";
inline constexpr std::string_view kRegionClose = "</reg>";

// The only special tokens that act as tokens inside text a user wrote.
inline constexpr std::array<std::string_view, 4> kInputMarkers = {kImageToken, kRegionToken, kRegionOpen,
                                                                  kRegionClose};

// Routing token -> routing kind, in the contract's order.
inline constexpr std::array<std::pair<std::string_view, std::string_view>, 6> kRoutingTokens = {{
    {"[DET]", "det"},
    {"[GRD]", "grd"},
    {"[SEG]", "seg"},
    {"[POSE]", "pose"},
    {"[GEN]", "gen"},
    {"[EDIT]", "edit"},
}};
// The kinds whose routing token is followed by num_embs_gen copies of kGenerationPlaceholder.
inline constexpr std::array<std::string_view, 2> kGenerationKinds = {"gen", "edit"};

// The placeholders after a perception routing token, in order ([EMB][EMB2].. up to num_embs).
inline constexpr std::array<std::string_view, 8> kAllPlaceholders = {"[EMB]",  "[EMB2]", "[EMB3]", "[EMB4]",
                                                                     "[EMB5]", "[EMB6]", "[EMB7]", "[EMB8]"};
inline constexpr std::string_view kGenerationPlaceholder = "[EMB]";

// The official `vicuna_v1` template.
inline constexpr std::string_view kSystemPrompt =
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.";
inline constexpr std::array<std::string_view, 2> kRoles = {"USER", "ASSISTANT"};
inline constexpr std::string_view kSep = " ";
inline constexpr std::string_view kSep2 = "</s>";

}  // namespace vle::chat
