// The label rule: the name each super-link group of an answer gets.
//
// [DET], [SEG] and [POSE] groups take the answer text between the nearest preceding delimiter (the answer's
// start, the end of the previous group, ", ", ". ", ": ", " for ", " and ", " of ") and the routing token,
// stripped; `<det>phrase</det>[DET]` gives `phrase`. A [GRD] group whose own text only points at something
// ("It is [GRD].") takes the phrase the question asked for ("Where is the red ball?" -> "red ball").
// [GEN] and [EDIT] groups take the user's instruction.
//
// The rule is written directly on the text, code point by code point (UTF-8 in and out), and gives the
// same labels as the reference's Python `answer_labels`, whose three regular expressions it follows with
// Python's semantics: Unicode whitespace as `str.isspace`, case-insensitive words as `re.IGNORECASE`
// (which also lets U+0130/U+0131 match `i`, U+017F match `s` and U+212A match `k`), and the same
// leftmost, greedy/lazy choice of match.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace vle {

// The routing tokens, delimiters and placeholders the rule reads come from artifact/contract.h.

// (kind, label) of every routing token in `answer`, in answer order. `question` is the user's turn
// (`<image>` tokens are ignored); `instruction`, when given, labels [GEN]/[EDIT] groups instead of it.
std::vector<std::pair<std::string, std::string>> label_groups(const std::string& answer,
                                                              const std::string& question,
                                                              const std::optional<std::string>& instruction);

}  // namespace vle
