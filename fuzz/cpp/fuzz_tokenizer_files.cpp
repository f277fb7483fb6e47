// The tokenizer's files (tokenizer/tokenizer.cpp): an artifact's tokenizer.json and tokenizer.model are
// untrusted like its manifest. One of the two is the input's bytes, the other the shapes-tiny fixture's
// (csrc/tests/data/tokenizer); the last byte picks which. A tokenizer that loads encodes and decodes a prompt
// with every input marker and special token, as a request would. (SentencePiece parses the model: that
// library is not instrumented, so inside it only crashes count, not sanitizer reports.)
#include <cstdint>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

#include "fuzz_common.h"
#include "tokenizer/tokenizer.h"
#include "visionllm_edge/errors.h"

namespace {

const char kJson[] = VLE_SOURCE_DIR "/csrc/tests/data/tokenizer/tokenizer.json";
const char kModel[] = VLE_SOURCE_DIR "/csrc/tests/data/tokenizer/tokenizer.model";
const char kPrompt[] = "<image>\nWhere is <region> [DET] the <reg>red</reg> [SEG][EMB2] caf\xc3\xa9</s><s>?";

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static vle::fuzz::MemoryFile file("tokenizer-file");
  if (size == 0) return 0;
  const bool model = data[size - 1] & 1;
  const std::string& path = file.write(data, size - 1);
  try {
    const vle::Tokenizer tok(vle::TokenizerFiles{model ? kJson : path, model ? path : kModel, std::nullopt, std::nullopt});
    const std::vector<int64_t> ids = tok.tokenize_with_image(kPrompt);
    std::vector<int64_t> text_ids;
    for (int64_t id : ids) {
      if (id != vle::kImageSentinel) text_ids.push_back(id);
    }
    (void)tok.decode(text_ids, /*skip_special_tokens=*/false);
    (void)tok.decode(text_ids, /*skip_special_tokens=*/true);
    (void)tok.vocab_size();
  } catch (const vle::Error&) {
    // A refusal naming the file: the tokenizer's answer to a bad tokenizer.json or tokenizer.model.
  }
  return 0;
}
