// The task shortcuts' official evaluation templates: the question and the answer it forces, per task, the
// first (test-mode) template of each official dataset class. The shortcuts run question + answer through
// the LLM in one pass with the super-link placeholders in place, so the LLM never chooses the task or the
// classes. Texts and checks are those of the Python SDK's visionllm_edge.templates.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace vle {
namespace templates {

struct TaskTemplate {
  std::vector<std::pair<std::string, std::string>> history;  // earlier (user, assistant) turns
  std::string question;
  std::string answer;  // the forced answer
};

// Names are stripped of surrounding whitespace; an empty list or an empty name is an InputError that
// lists the names given; a name holding a control character or a special token's spelling ([DET], <region>,
// </s>, ...) is an InputError naming both, and so is a label delimiter in a list's name (", ", " of ", ...:
// the answer's labels are split there).

// coco_llava: one [DET] group per class, in the given order (class k of the decoder is group k).
TaskTemplate detection(const std::vector<std::string>& classes);
// refcoco_llava: one [GRD] group for the referring expression.
TaskTemplate grounding(const std::string& phrase);
// ade20k_llava: one [SEG] group per class.
TaskTemplate segmentation(const std::vector<std::string>& classes);
// coco_pose_llava: a detection turn for the objects (as history), then the keypoint turn.
TaskTemplate pose(const std::vector<std::string>& keypoint_names,
                  const std::vector<std::string>& objects = {"person"});
// text2img: an instruction with the caption; the answer carries one [GEN] group.
TaskTemplate generation(const std::string& caption);
// ip2p: the instruction about the input image; the answer carries one [EDIT] group.
TaskTemplate editing(const std::string& instruction);

}  // namespace templates
}  // namespace vle
