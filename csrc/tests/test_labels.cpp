// The label rule on a table of answers: the documented examples, then the edge cases where the reference's
// regular expressions decide (delimiter scan order, `<det>` spans and newlines, pointing words, grounding
// questions, Unicode whitespace and case). Every expected label was produced by the reference's
// `answer_labels` (export/reference.py); tests/test_labels_parity.py compares the two on random text.
#include <gtest/gtest.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "loop/labels.h"

namespace {

using Labels = std::vector<std::pair<std::string, std::string>>;

struct LabelCase {
  std::string answer;
  std::string question;
  std::optional<std::string> instruction;
  Labels want;
};

std::ostream& operator<<(std::ostream& os, const LabelCase& c) {
  return os << "answer '" << c.answer << "', question '" << c.question << "'";
}

const std::vector<LabelCase>& label_cases() {
  static const std::vector<LabelCase> cases = {
      // The examples of the rule.
      {"Yes, here are the results for person[DET], dog[DET] in the image.", "Detect person and dog.",
       std::nullopt, {{"det", "person"}, {"det", "dog"}}},
      {"<det>a red circle</det>[DET]", "Find the red circle.", std::nullopt, {{"det", "a red circle"}}},
      {"nose[POSE], left eye[POSE]", "Detect the keypoints.", std::nullopt,
       {{"pose", "nose"}, {"pose", "left eye"}}},
      {"It is [GRD].", "<image>\nWhere is the red ball in the image?", std::nullopt, {{"grd", "red ball"}}},
      {"Here is the image [GEN].", "Draw a red circle.", std::nullopt, {{"gen", "Draw a red circle."}}},
      {"Done [EDIT]", "<image>\nmake it blue", "make the square blue", {{"edit", "make the square blue"}}},
      {"The masks: sky[SEG] and grass[SEG].", "Segment everything.", std::nullopt,
       {{"seg", "sky"}, {"seg", "grass"}}},
      {"No routing here.", "q", std::nullopt, {}},
      // Delimiters: a left-to-right scan, placeholders removed first, empty labels kept.
      {"a for b and c[DET]", "q", std::nullopt, {{"det", "c"}}},
      {"a for and b[DET]", "q", std::nullopt, {{"det", "and b"}}},
      {"x of y[SEG]", "q", std::nullopt, {{"seg", "y"}}},
      {"one.two[DET]", "q", std::nullopt, {{"det", "one.two"}}},
      {"a, [DET]", "q", std::nullopt, {{"det", ""}}},
      {"[DET]", "q", std::nullopt, {{"det", ""}}},
      {"person[DET][DET]", "q", std::nullopt, {{"det", "person"}, {"det", ""}}},
      {"Results for a cat[DET][EMB][EMB2][EMB3][EMB4] and a dog[DET]", "", std::nullopt,
       {{"det", "a cat"}, {"det", "a dog"}}},
      {"a[EMB]b[DET]", "q", std::nullopt, {{"det", "ab"}}},
      {"[EM[EMB]B][DET]", "q", std::nullopt, {{"det", "[EMB]"}}},  // one pass, as re.sub
      {"a cat[det]", "q", std::nullopt, {}},                       // routing tokens are case-sensitive
      // <det> spans: from the first <det> on the line of the closing </det>.
      {"x: <det>a, b</det> [DET]", "q", std::nullopt, {{"det", "a, b"}}},
      {"<det>a</det> then <det>b</det>[DET]", "q", std::nullopt, {{"det", "a</det> then <det>b"}}},
      {"<det>a\nb</det>[DET]", "q", std::nullopt, {{"det", "<det>a\nb</det>"}}},
      {"<det>x</det> \n [DET]", "q", std::nullopt, {{"det", "x"}}},
      {"<det>x</det>y[DET]", "q", std::nullopt, {{"det", "<det>x</det>y"}}},
      {"<det></det>[DET]", "q", std::nullopt, {{"det", ""}}},
      // Unicode text and whitespace.
      {"\u732b[DET]\u3001\u72ac[DET]", "\u691c\u51fa\u3057\u3066", std::nullopt,
       {{"det", "\u732b"}, {"det", "\u3001\u72ac"}}},
      {"caf\u00e9 au lait: cr\u00e8me br\u00fbl\u00e9e[DET]", "q", std::nullopt,
       {{"det", "cr\u00e8me br\u00fbl\u00e9e"}}},
      {"\u00a0na\u00efve\u3000[DET]", "q", std::nullopt, {{"det", "na\u00efve"}}},
      {"a  [DET]", "q", std::nullopt, {{"det", "a"}}},
      // [GRD]: pointing words take the question's phrase.
      {"Sure, it is [GRD].", "Please locate the blue square.", std::nullopt, {{"grd", "blue square"}}},
      {"yes[GRD]", "point to this little dog", std::nullopt, {{"grd", "this little dog"}}},
      {"okay, that is [GRD]", "Can you find the cat on the photo?", std::nullopt, {{"grd", "cat"}}},
      {"Here[GRD]", "segment the sky", std::nullopt, {{"grd", "sky"}}},
      {"yes is [GRD]", "find the cat", std::nullopt, {{"grd", "cat"}}},  // the prefix's spaces end early
      {"ok , it is[GRD]", "find the cat", std::nullopt, {{"grd", "cat"}}},
      {"it\n.[GRD]", "find the cat", std::nullopt, {{"grd", "cat"}}},  // a final newline is allowed
      {"\u0130t is [GRD]", "FIND THE DOG", std::nullopt, {{"grd", "DOG"}}},  // U+0130 matches i
      {"okay ,,it[GRD]", "find the cat", std::nullopt, {{"grd", "okay ,,it"}}},  // two commas: a phrase
      {"itis[GRD]", "find the cat", std::nullopt, {{"grd", "itis"}}},
      {"see[GRD]", "find the cat", std::nullopt, {{"grd", "see"}}},
      {"the small red triangle[GRD]", "Where is it?", std::nullopt, {{"grd", "the small red triangle"}}},
      // [GRD]: the question's phrase, or the whole question when it has none.
      {"[GRD]", "What is this?", std::nullopt, {{"grd", "What is this?"}}},
      {"It is [GRD]", "<image>", std::nullopt, {{"grd", ""}}},
      {"It is [GRD].", "WHERE'S THE \u017fmall KEY?", std::nullopt, {{"grd", "\u017fmall KEY"}}},
      {"that[GRD]", "\u017fee the ball", std::nullopt, {{"grd", "ball"}}},  // U+017F matches s
      {"it[GRD]", "Locate   the   blue  ball   in   the  picture  ", std::nullopt, {{"grd", "blue  ball"}}},
      {"it[GRD]", "Where is the dog in this image? And find the cat.", std::nullopt, {{"grd", "dog"}}},
      {"it[GRD]", "where is the dog is on the photo", std::nullopt, {{"grd", "dog"}}},
      {"it[GRD]", "ground\tthe\u00a0tree in the image!", std::nullopt, {{"grd", "tree"}}},
      {"it[GRD]", "find the images", std::nullopt, {{"grd", "images"}}},
      {"it[GRD]", "see thee", std::nullopt, {{"grd", "thee"}}},
      {"it[GRD]", "detect the cat<dog>", std::nullopt, {{"grd", "detect the cat<dog>"}}},
      {"sure it is [GRD]", "find  ?", std::nullopt, {{"grd", "find  ?"}}},  // the phrase is only spaces
      // [GEN]/[EDIT]: the instruction, else the question without <image>, stripped.
      {"[GEN]", "<image>  draw\u3000", std::nullopt, {{"gen", "draw"}}},
  };
  return cases;
}

class LabelTable : public testing::TestWithParam<LabelCase> {};

TEST_P(LabelTable, GivesTheReferenceLabels) {
  const LabelCase& c = GetParam();
  EXPECT_EQ(vle::label_groups(c.answer, c.question, c.instruction), c.want);
}

INSTANTIATE_TEST_SUITE_P(Labels, LabelTable, testing::ValuesIn(label_cases()));

TEST(Labels, InvalidUtf8StaysInTheLabel) {
  // A stray byte is kept as it is; it is neither a space nor a letter.
  EXPECT_EQ(vle::label_groups("a \xff[DET]", "q", std::nullopt), (Labels{{"det", "a \xff"}}));
}

}  // namespace
