// The runtime's tokenizer: Llama's SentencePiece model (the artifact's tokenizer.model) through the
// SentencePiece library, plus the added tokens of tokenizer.json, giving exactly the ids of the reference's
// slow `LlamaTokenizer`; and the official `vicuna_v1` chat template with the super-link placeholders.
//
// Offsets in spans are UTF-8 byte offsets into the text they describe.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace vle {

// Where an `<image>` was, in an id list before it is expanded to patch tokens (the official value).
constexpr int64_t kImageSentinel = -200;

// A half-open byte range [start, end) of user-written text: there only the input markers `<image>`,
// `<region>`, `<reg>`, `</reg>` act as tokens, and any other special-token spelling stays text.
struct Span {
  size_t start = 0;
  size_t end = 0;
};

// The two files of the artifact's tokenizer. `legacy` and `add_prefix_space` are the manifest's flags:
// tokenizer.json's layout records them too, and a flag given here must agree with it (a TokenizerError
// otherwise); a flag left empty is taken from the file.
struct TokenizerFiles {
  std::filesystem::path tokenizer_json;   // added tokens (ids, lstrip/rstrip, special) and settings
  std::filesystem::path sentencepiece;    // tokenizer.model, with the slow tokenizer's settings baked in
  std::optional<bool> legacy;
  std::optional<bool> add_prefix_space;
};

class Tokenizer {
 public:
  // Loads the files; a TokenizerError naming the file when one is missing or not a Llama tokenizer, or
  // when `expected_ids` (the manifest's token table) disagrees with the file's ids (naming the token).
  Tokenizer(const TokenizerFiles& files, const std::map<std::string, int64_t>& expected_ids = {});
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // `tokenizer(text).input_ids` of the slow tokenizer, special tokens acting as tokens except inside
  // `protected_spans` (clamped to the text). An InputError when `text` is not valid UTF-8.
  std::vector<int64_t> encode_text(const std::string& text, const std::vector<Span>& protected_spans = {},
                                   bool add_bos = true) const;
  // The official `tokenizer_image_token`: kImageSentinel where each `<image>` was, one BOS first.
  std::vector<int64_t> tokenize_with_image(const std::string& prompt,
                                           const std::vector<Span>& protected_spans = {}) const;
  // The slow tokenizer's `decode(ids)`; an InputError for an id outside the vocabulary.
  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens = false) const;

  int64_t token_id(const std::string& token) const;  // TokenizerError naming a token that is not special
  int64_t vocab_size() const;                         // added tokens included
  int64_t bos_id() const;
  int64_t eos_id() const;

  // The settings in force: the slow tokenizer's `legacy` and `add_prefix_space`, and whether the
  // sentencepiece model puts a dummy "\u2581" in front of each text (only ever with legacy).
  bool legacy() const;
  bool add_prefix_space() const;
  bool add_dummy_prefix() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// --- the chat template ------------------------------------------------------------------------------------

struct Conversation {
  std::string text;
  std::vector<Span> user_spans;
};

// The official `vicuna_v1` template (system prompt, "USER: ... ASSISTANT: ...</s>"); a turn without an answer
// (only the last may have none) leaves the prompt open ("... ASSISTANT:"). An InputError otherwise.
Conversation build_conversation(const std::vector<std::pair<std::string, std::optional<std::string>>>& turns);

// Writes the super-link placeholders after every routing token that lacks them: [DET] [GRD] [SEG] [POSE]
// get [EMB][EMB2]..[EMB<num_embs>], [GEN] and [EDIT] get num_embs_gen x [EMB].
std::string insert_placeholders(const std::string& answer, int64_t num_embs, int64_t num_embs_gen);

}  // namespace vle
