// The task shortcuts' templates (see templates.h).
#include "loop/templates.h"

#include <cstdio>

#include "artifact/contract.h"
#include "text/utf8.h"
#include "visionllm_edge/errors.h"

namespace vle {
namespace templates {
namespace {

std::string join(const std::vector<std::string>& names, const std::string& sep, const std::string& suffix = "") {
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) out += (i ? sep : "") + names[i] + suffix;
  return out;
}

// The names stripped; an InputError when there are none or one is empty. A name goes into the forced answer
// beside its routing token, so one that spells a special token ("cat[DET]", "<region>") would add a group
// or a marker of its own, and a control character has no place in a label. In a list (`list_item`) the
// label delimiters are refused too (", ", " of ", ...: contract::label_delimiters()): the answer's labels are
// split there as the official code splits them, so "cup of tea" would come back labelled "tea".
std::vector<std::string> checked_names(const std::vector<std::string>& given, bool list_item = true) {
  std::vector<std::string> names;
  bool ok = !given.empty();
  for (const std::string& n : given) {
    names.push_back(std::string(utf8::rstrip(utf8::lstrip(n))));
    ok = ok && !names.back().empty();
  }
  if (!ok) {
    std::vector<std::string> quoted;
    for (const std::string& n : names) quoted.push_back(utf8::python_repr(n));
    throw InputError("expected one or more non-empty names, got [" + join(quoted, ", ") + "]");
  }
  for (const std::string& n : names) {
    const std::string shown = "name " + utf8::python_repr(n);
    for (const char c : n) {
      if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
        throw InputError(shown + " contains the control character " + utf8::python_repr(std::string(1, c)));
      }
    }
    if (list_item) {
      for (const std::string& d : contract::label_delimiters()) {
        if (n.find(d) != std::string::npos) {
          throw InputError(shown + " contains " + utf8::python_repr(d) +
                           ", where the answer's labels are split: its label would not be the name");
        }
      }
    }
    for (const std::string& token : contract::required_tokens()) {
      if (n.find(token) != std::string::npos) {
        throw InputError(shown + " contains the special token " + utf8::python_repr(token));
      }
    }
  }
  return names;
}

std::string without_trailing_dots(std::string s) {
  while (!s.empty() && s.back() == '.') s.pop_back();
  return s;
}

}  // namespace

TaskTemplate detection(const std::vector<std::string>& classes) {
  const std::vector<std::string> names = checked_names(classes);
  return {{},
          "Can you analyze the image and identify the " + join(names, ", ") + " present?",
          "Yes, here are the results for " + join(names, ", ", "[DET]") + " in the image."};
}

TaskTemplate grounding(const std::string& phrase) {
  const std::string p = checked_names({phrase}, false)[0];
  return {{}, "Where can we locate the " + p + " in the image?", "Yes, it is [GRD]."};
}

TaskTemplate segmentation(const std::vector<std::string>& classes) {
  const std::vector<std::string> names = checked_names(classes);
  return {{},
          "Could you aid me in generating unique masks for every category present in " + join(names, ", ") +
              " in this image?",
          "Yes, here are the results for " + join(names, ", ", "[SEG]") + " in the image."};
}

TaskTemplate pose(const std::vector<std::string>& keypoint_names, const std::vector<std::string>& objects) {
  const std::vector<std::string> names = checked_names(keypoint_names);
  const TaskTemplate det = detection(checked_names(objects));
  return {{{det.question, det.answer}},
          "Can you examine the image and pinpoint the keypoint locations of the " + join(names, ", ") + "?",
          "Utilizing keypoints detection, the image analysis reveals the location of " +
              join(names, ", ", "[POSE]") + "."};
}

TaskTemplate generation(const std::string& caption) {
  const std::string c = checked_names({caption}, false)[0];
  return {{}, "Generate image with caption: " + without_trailing_dots(c) + ".", "Here it is [GEN]."};
}

TaskTemplate editing(const std::string& instruction) {
  const std::string i = checked_names({instruction}, false)[0];
  return {{}, without_trailing_dots(i) + ".", "Here it is [EDIT]."};
}

}  // namespace templates
}  // namespace vle
