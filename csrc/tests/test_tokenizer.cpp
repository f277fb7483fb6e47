// The C++ tokenizer on the committed shapes-tiny tokenizer files (csrc/tests/data/tokenizer/, made by the
// command in its README): ids the slow reference tokenizer gives for a few texts (special tokens plain and
// inside protected spans, Python whitespace around lstrip/rstrip tokens, byte fallback, byte-offset spans),
// invalid UTF-8, the errors for missing, bad and mismatching files, decode, and the chat template.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "artifact/contract.h"
#include "tokenizer/tokenizer.h"
#include "text/utf8.h"
#include "visionllm_edge/errors.h"

namespace {

namespace fs = std::filesystem;
using Ids = std::vector<int64_t>;

const fs::path kData = fs::path(VLE_SOURCE_DIR) / "csrc" / "tests" / "data" / "tokenizer";

vle::TokenizerFiles files() { return {kData / "tokenizer.json", kData / "tokenizer.model", false, true}; }

const vle::Tokenizer& tok() {
  static const vle::Tokenizer t(files(), {});
  return t;
}

// Runs `fn`, which must throw E, and returns the message.
template <typename E, typename Fn>
std::string message_of(Fn&& fn) {
  try {
    fn();
  } catch (const E& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an exception";
  return {};
}

struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("vle-tok-" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) +
                                        "-" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
};

nlohmann::json read_json(const fs::path& p) {
  std::ifstream in(p);
  return nlohmann::json::parse(in);
}

void write_text(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary);
  out << text;
}

// --- the token table -------------------------------------------------------------------------------------

TEST(Tokenizer, TokenTable) {
  EXPECT_EQ(tok().vocab_size(), 794);  // 768 SentencePiece pieces + 26 added tokens
  EXPECT_EQ(tok().bos_id(), 1);
  EXPECT_EQ(tok().eos_id(), 2);
  EXPECT_EQ(tok().token_id("[DET]"), 780);
  EXPECT_EQ(tok().token_id("<image>"), 769);
  EXPECT_FALSE(tok().legacy());
  EXPECT_TRUE(tok().add_prefix_space());
  EXPECT_FALSE(tok().add_dummy_prefix());  // legacy=False: baked off into the written model
  for (const std::string& t : vle::contract::added_tokens()) EXPECT_GE(tok().token_id(t), 768) << t;
  const std::string msg = message_of<vle::TokenizerError>([] { tok().token_id("hello"); });
  EXPECT_NE(msg.find("'hello'"), std::string::npos) << msg;
}

// --- encoding: ids of the slow reference tokenizer ------------------------------------------------------

TEST(Tokenizer, KnownIds) {
  EXPECT_EQ(tok().encode_text("hello world"), (Ids{1, 294, 347, 707, 386, 430, 453}));
  EXPECT_EQ(tok().encode_text("hello world", {}, false), (Ids{294, 347, 707, 386, 430, 453}));
  EXPECT_EQ(tok().encode_text(""), (Ids{1}));
  EXPECT_EQ(tok().encode_text("<image>\nWhat is in <reg>region1<region></reg>?"),
            (Ids{1, 769, 740, 426, 299, 276, 774, 313, 738, 771, 775, 725}));
  // "\u2581" typed by the user is a space to the slow tokenizer (legacy=False).
  EXPECT_EQ(tok().encode_text("\xE2\x96\x81\xE2\x96\x81x\xE2\x96\x81"), (Ids{1, 699, 699, 699, 750, 699}));
  // Byte fallback: "é", CJK and an emoji become byte pieces.
  EXPECT_EQ(tok().encode_text("caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x98\x80"),
            (Ids{1, 271, 703, 717, 198, 172, 699, 233, 154, 168, 233, 159, 175, 699, 243, 162, 155, 131}));
}

TEST(Tokenizer, StripUsesPythonWhitespaceOnCodePoints) {
  // <s> has lstrip and rstrip: the spaces before it go, and U+3000 after it (Python whitespace) too, while
  // U+200B (not whitespace to Python) stays and becomes three byte pieces.
  EXPECT_EQ(tok().encode_text("  spaced  <s>\xE3\x80\x80x\xE2\x80\x8By"),
            (Ids{1, 699, 699, 284, 719, 703, 562, 721, 1, 750, 229, 131, 142, 720}));
  EXPECT_EQ(vle::utf8::lstrip("\xE3\x80\x80\xC2\xA0 \x1Cx "), "x ");
  EXPECT_EQ(vle::utf8::rstrip(" x\xE2\x80\xA8\xC2\x85\t"), " x");
  EXPECT_EQ(vle::utf8::rstrip("x\xE2\x80\x8B"), "x\xE2\x80\x8B");
}

TEST(Tokenizer, ProtectedSpansKeepSpecialTokensAsTextButNotTheMarkers) {
  const std::string text = "Find [DET] and </s> in <reg>r<region></reg>";
  const Ids plain = tok().encode_text(text);
  EXPECT_EQ(plain, (Ids{1, 699, 73, 336, 721, 780, 285, 2, 336, 774, 701, 771, 775}));
  const Ids user = tok().encode_text(text, {{0, text.size()}});
  EXPECT_EQ(user, (Ids{1, 699, 73, 336, 721, 355, 298, 716, 346, 699, 379, 706, 732, 276, 774, 701, 771, 775}));
  EXPECT_EQ(std::count(user.begin(), user.end(), 780), 0);  // [DET] stayed text
  EXPECT_EQ(std::count(user.begin(), user.end(), 2), 0);    // so did </s>
  for (const char* marker : {"<reg>", "<region>", "</reg>"}) {
    EXPECT_EQ(std::count(user.begin(), user.end(), tok().token_id(marker)), 1) << marker;
  }
  // A span past the end is clamped to the text: the same ids.
  EXPECT_EQ(tok().encode_text(text, {{0, text.size() + 100}}), user);
}

TEST(Tokenizer, SpansAreByteOffsets) {
  // "é[DET]x[DET]": the first [DET] ends at byte 7 (é is two bytes); a span of bytes [0, 7) protects it,
  // the second one stays a token.
  const std::string text = "\xC3\xA9[DET]x[DET]";
  EXPECT_EQ(tok().encode_text(text, {{0, 7}}), (Ids{1, 699, 198, 172, 715, 298, 716, 750, 780}));
  // [0, 6) ends inside the token: it is not protected.
  const Ids six = tok().encode_text(text, {{0, 6}});
  EXPECT_EQ(std::count(six.begin(), six.end(), 780), 2);
}

TEST(Tokenizer, InvalidUtf8IsAnInputErrorNamingTheByte) {
  for (const std::string& bad : {std::string("ok\xFF"), std::string("a\xC3"), std::string("\xED\xA0\x80"),
                                std::string("\xC0\xAF"), std::string("\xF4\x90\x80\x80")}) {
    const std::string msg = message_of<vle::InputError>([&] { tok().encode_text(bad); });
    EXPECT_NE(msg.find("not valid UTF-8"), std::string::npos) << msg;
    message_of<vle::InputError>([&] { tok().tokenize_with_image("<image>" + bad); });
  }
  EXPECT_NE(message_of<vle::InputError>([] { tok().encode_text("ok\xFF"); }).find("byte 2"), std::string::npos);
}

TEST(Tokenizer, TokenizeWithImage) {
  EXPECT_EQ(tok().tokenize_with_image("<image>\nA <image> b"), (Ids{1, -200, 699, 13, 746, 699, -200, 699, 349}));
  const Ids no_image = tok().tokenize_with_image("hello world");
  EXPECT_EQ(no_image, tok().encode_text("hello world"));
}

// --- decoding --------------------------------------------------------------------------------------------

TEST(Tokenizer, DecodeAsTheSlowTokenizer) {
  EXPECT_EQ(tok().decode({294, 347, 707, 386, 430, 453}), "hello world");
  EXPECT_EQ(tok().decode({198, 172}), "\xC3\xA9");                 // byte pieces joined into UTF-8
  EXPECT_EQ(tok().decode({229, 68}), "\xEF\xBF\xBD" "A");          // a lone lead byte: U+FFFD
  EXPECT_EQ(tok().decode({1, 2, 0}), "<s></s><unk>");
  EXPECT_EQ(tok().decode({1, 2, 0}, true), "");
  EXPECT_EQ(tok().decode({780, 10, 1}), "[DET] \x07<s>");  // added tokens past the base stand apart
  EXPECT_EQ(tok().decode({780, 300, 2}, true), "ang");
  const std::string msg = message_of<vle::InputError>([] { tok().decode({794}); });
  EXPECT_NE(msg.find("outside the vocabulary"), std::string::npos) << msg;
}

TEST(Tokenizer, DecodeRoundTrips) {
  for (std::string text : {"hello world", "What is in the region? Please segment it.", "a  b   c",
                                 "caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x98\x80!", "2023 1,234.5"}) {
    EXPECT_EQ(tok().decode(tok().encode_text(text, {}, false)), text) << text;
    EXPECT_EQ(tok().decode(tok().encode_text(text), true), text) << text;
  }
}

// --- errors: files and the manifest ------------------------------------------------------------------------

TEST(Tokenizer, MissingFilesAreNamed) {
  vle::TokenizerFiles f = files();
  f.sentencepiece = kData / "absent.model";
  std::string msg = message_of<vle::TokenizerError>([&] { vle::Tokenizer t(f, {}); });
  EXPECT_NE(msg.find("absent.model"), std::string::npos) << msg;
  f = files();
  f.tokenizer_json = kData / "absent.json";
  msg = message_of<vle::TokenizerError>([&] { vle::Tokenizer t(f, {}); });
  EXPECT_NE(msg.find("absent.json"), std::string::npos) << msg;
}

TEST(Tokenizer, BadFilesAreNamed) {
  TempDir dir;
  vle::TokenizerFiles f = files();
  // Not JSON.
  f.tokenizer_json = dir.path / "tokenizer.json";
  write_text(f.tokenizer_json, "{ not json");
  std::string msg = message_of<vle::TokenizerError>([&] { vle::Tokenizer t(f, {}); });
  EXPECT_NE(msg.find(f.tokenizer_json.string()), std::string::npos) << msg;
  // A layout the slow tokenizer's reproduction does not cover.
  nlohmann::json data = read_json(kData / "tokenizer.json");
  data["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}};
  write_text(f.tokenizer_json, data.dump());
  msg = message_of<vle::TokenizerError>([&] { vle::Tokenizer t(f, {}); });
  EXPECT_NE(msg.find("unsupported pre_tokenizer"), std::string::npos) << msg;
  // A special token missing.
  data = read_json(kData / "tokenizer.json");
  auto& added = data["added_tokens"];
  for (size_t i = 0; i < added.size(); ++i) {
    if (added[i]["content"] == "[EMB8]") added.erase(i);
  }
  write_text(f.tokenizer_json, data.dump());
  msg = message_of<vle::TokenizerError>([&] { vle::Tokenizer t(f, {}); });
  EXPECT_NE(msg.find("[EMB8]"), std::string::npos) << msg;
  // Not a SentencePiece model.
  f = files();
  f.sentencepiece = dir.path / "tokenizer.model";
  write_text(f.sentencepiece, "not a model");
  msg = message_of<vle::TokenizerError>([&] { vle::Tokenizer t(f, {}); });
  EXPECT_NE(msg.find(f.sentencepiece.string()), std::string::npos) << msg;
}

TEST(Tokenizer, ManifestMismatchNamesTheToken) {
  std::string msg = message_of<vle::TokenizerError>([] {
    vle::Tokenizer t(files(), {{"<s>", 1}, {"[DET]", 781}});
  });
  EXPECT_NE(msg.find("tokenizer mismatch"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[DET]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("781"), std::string::npos) << msg;
  EXPECT_NE(msg.find("780"), std::string::npos) << msg;
  msg = message_of<vle::TokenizerError>([] { vle::Tokenizer t(files(), {{"[NOPE]", 5}}); });
  EXPECT_NE(msg.find("[NOPE]"), std::string::npos) << msg;
  // The manifest's flags must agree with the file's layout.
  vle::TokenizerFiles f = files();
  f.legacy = true;
  msg = message_of<vle::TokenizerError>([&] { vle::Tokenizer t(f, {}); });
  EXPECT_NE(msg.find("legacy=true"), std::string::npos) << msg;
  // The token table the manifest writes is accepted.
  std::map<std::string, int64_t> table;
  for (const std::string& t : vle::contract::added_tokens()) table[t] = tok().token_id(t);
  table["<s>"] = 1;
  table["</s>"] = 2;
  table["<unk>"] = 0;
  EXPECT_NO_THROW(vle::Tokenizer(files(), table));
}

TEST(Tokenizer, AddedTokensMustAgreeWithTheModel) {
  TempDir dir;
  vle::TokenizerFiles f = files();
  f.tokenizer_json = dir.path / "tokenizer.json";
  nlohmann::json data = read_json(kData / "tokenizer.json");
  for (auto& t : data["added_tokens"]) {
    if (t["content"] == "</s>") t["id"] = 5;  // piece 5 of the model is not "</s>"
  }
  write_text(f.tokenizer_json, data.dump());
  const std::string msg = message_of<vle::TokenizerError>([&] { vle::Tokenizer t(f, {}); });
  EXPECT_NE(msg.find("tokenizer mismatch"), std::string::npos) << msg;
  EXPECT_NE(msg.find("</s>"), std::string::npos) << msg;
}

// --- the chat template -------------------------------------------------------------------------------------

TEST(Conversation, VicunaTemplateWithByteSpans) {
  const std::string system(vle::contract::kSystemPrompt);
  const vle::Conversation conv =
      vle::build_conversation({{"<image>\nWhat is this caf\xC3\xA9?", std::string("A cup.")}, {"And?", std::nullopt}});
  const std::string want = system + " USER: <image>\nWhat is this caf\xC3\xA9? ASSISTANT: A cup.</s>USER: And? ASSISTANT:";
  EXPECT_EQ(conv.text, want);
  ASSERT_EQ(conv.user_spans.size(), 2u);
  EXPECT_EQ(conv.text.substr(conv.user_spans[0].start, conv.user_spans[0].end - conv.user_spans[0].start),
            "<image>\nWhat is this caf\xC3\xA9?");
  EXPECT_EQ(conv.text.substr(conv.user_spans[1].start, conv.user_spans[1].end - conv.user_spans[1].start), "And?");
  const std::string msg = message_of<vle::InputError>([] {
    vle::build_conversation({{"a", std::nullopt}, {"b", std::string("c")}});
  });
  EXPECT_NE(msg.find("only the last turn may have no answer"), std::string::npos) << msg;
}

TEST(Conversation, InsertPlaceholders) {
  EXPECT_EQ(vle::insert_placeholders("The person[DET], road[SEG][EMB][EMB2].", 2, 3),
            "The person[DET][EMB][EMB2], road[SEG][EMB][EMB2].");
  EXPECT_EQ(vle::insert_placeholders("a[GEN]b[EDIT][EMB][EMB]", 4, 2), "a[GEN][EMB][EMB]b[EDIT][EMB][EMB]");
  EXPECT_EQ(vle::insert_placeholders("[POSE]", 4, 2), "[POSE][EMB][EMB2][EMB3][EMB4]");
  EXPECT_EQ(vle::insert_placeholders("no routing", 4, 2), "no routing");
  EXPECT_EQ(vle::insert_placeholders("[DET]", 0, 0), "[DET]");
  message_of<vle::InputError>([] { vle::insert_placeholders("[DET]", 9, 1); });
}

}  // namespace
