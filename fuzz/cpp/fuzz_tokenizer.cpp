// The tokenizer (tokenizer/tokenizer.cpp, conversation.cpp) on user text: the shapes-tiny tokenizer fixture
// (csrc/tests/data/tokenizer) encodes arbitrary bytes — every special-token spelling, invalid UTF-8, long
// inputs (-max_len) — with and without protected spans, as a chat-template turn and through the `<image>`
// path, and decodes arbitrary id streams, in and outside the vocabulary. The first byte picks the entry point;
// the rest is the text, or for decode the ids.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tokenizer/tokenizer.h"
#include "visionllm_edge/errors.h"

namespace {

const vle::Tokenizer& tokenizer() {
  static const vle::Tokenizer instance(
      vle::TokenizerFiles{VLE_SOURCE_DIR "/csrc/tests/data/tokenizer/tokenizer.json",
                          VLE_SOURCE_DIR "/csrc/tests/data/tokenizer/tokenizer.model", std::nullopt, std::nullopt});
  return instance;
}

// Spans with arbitrary bounds: the tokenizer clamps them to the text.
std::vector<vle::Span> spans(FuzzedDataProvider& in) {
  std::vector<vle::Span> out(in.ConsumeIntegralInRange<size_t>(0, 4));
  for (vle::Span& s : out) {
    s.start = in.ConsumeIntegral<uint16_t>();
    s.end = in.ConsumeIntegral<uint16_t>();
  }
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  (void)tokenizer();  // a fixture that does not load is a broken build, not a finding: fail before fuzzing
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const vle::Tokenizer& tok = tokenizer();
  try {
    switch (in.ConsumeIntegralInRange<int>(0, 4)) {
      case 0: {
        const std::vector<vle::Span> protect = spans(in);
        const bool bos = in.ConsumeBool();
        const std::vector<int64_t> ids = tok.encode_text(in.ConsumeRemainingBytesAsString(), protect, bos);
        // What it encoded must decode: every id is in the vocabulary.
        (void)tok.decode(ids, /*skip_special_tokens=*/false);
        (void)tok.decode(ids, /*skip_special_tokens=*/true);
        break;
      }
      case 1: {
        const std::vector<vle::Span> protect = spans(in);
        (void)tok.tokenize_with_image(in.ConsumeRemainingBytesAsString(), protect);
        break;
      }
      case 2: {
        std::vector<int64_t> ids;
        const bool skip = in.ConsumeBool();
        while (in.remaining_bytes() > 0) {
          // Mostly ids near the vocabulary (special ones included), sometimes any int64.
          ids.push_back(in.ConsumeBool() ? in.ConsumeIntegral<int64_t>()
                                         : in.ConsumeIntegralInRange<int64_t>(-2, tok.vocab_size() + 2));
        }
        (void)tok.decode(ids, skip);
        break;
      }
      case 3: {
        // A conversation of user turns and answers, the last open or not, through the template and encoder.
        std::vector<std::pair<std::string, std::optional<std::string>>> turns;
        const size_t n = in.ConsumeIntegralInRange<size_t>(0, 3);
        for (size_t i = 0; i < n; ++i) {
          std::string user = in.ConsumeRandomLengthString(256);
          std::optional<std::string> answer;
          if (in.ConsumeBool()) answer = in.ConsumeRandomLengthString(256);
          turns.emplace_back(std::move(user), std::move(answer));
        }
        const vle::Conversation c = vle::build_conversation(turns);
        (void)tok.tokenize_with_image(c.text, c.user_spans);
        break;
      }
      case 4: {
        // An answer with routing tokens gets its placeholders (the counts are the manifest's, capped there).
        const int64_t embs = in.ConsumeIntegralInRange<int64_t>(-1, 9);
        const int64_t embs_gen = in.ConsumeIntegralInRange<int64_t>(-1, 70);
        const std::string answer = vle::insert_placeholders(in.ConsumeRemainingBytesAsString(), embs, embs_gen);
        (void)tok.encode_text(answer, {}, /*add_bos=*/false);
        break;
      }
    }
  } catch (const vle::Error&) {
    // A refusal naming the text or id: the tokenizer's answer to bad input.
  }
  return 0;
}
