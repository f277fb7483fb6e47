// The task shortcuts' templates (see templates.h).
#include "loop/templates.h"

#include <cstdio>

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

// The names stripped; an InputError when there are none or one is empty.
std::vector<std::string> checked_names(const std::vector<std::string>& given) {
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
  const std::string p = checked_names({phrase})[0];
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
  const std::string c = checked_names({caption})[0];
  return {{}, "Generate image with caption: " + without_trailing_dots(c) + ".", "Here it is [GEN]."};
}

TaskTemplate editing(const std::string& instruction) {
  const std::string i = checked_names({instruction})[0];
  return {{}, without_trailing_dots(i) + ".", "Here it is [EDIT]."};
}

}  // namespace templates
}  // namespace vle
