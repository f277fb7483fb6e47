// The official `vicuna_v1` chat template and the super-link placeholders, the same text as
// python/visionllm_edge/conversation.py builds (spans here in bytes, there in characters).
#include <string>

#include "artifact/contract.h"
#include "tokenizer/tokenizer.h"
#include "visionllm_edge/errors.h"

namespace vle {

Conversation build_conversation(const std::vector<std::pair<std::string, std::optional<std::string>>>& turns) {
  // SeparatorStyle.TWO: "SYSTEM USER: q ASSISTANT: a</s>USER: ..."; an open last turn ends "ASSISTANT:".
  Conversation conv;
  conv.text = std::string(contract::kSystemPrompt) + contract::kSep;
  for (size_t i = 0; i < turns.size(); ++i) {
    const auto& [user, answer] = turns[i];
    conv.text += std::string(contract::kUserRole) + ": ";
    conv.user_spans.push_back({conv.text.size(), conv.text.size() + user.size()});
    conv.text += user + contract::kSep;
    if (!answer) {
      if (i + 1 != turns.size()) {
        throw InputError("only the last turn may have no answer (turn " + std::to_string(i + 1) + " of " +
                         std::to_string(turns.size()) + " has none)");
      }
      conv.text += std::string(contract::kAssistantRole) + ":";
    } else {
      conv.text += std::string(contract::kAssistantRole) + ": " + *answer + contract::kSep2;
    }
  }
  return conv;
}

std::string insert_placeholders(const std::string& answer, int64_t num_embs, int64_t num_embs_gen) {
  const std::vector<std::string>& placeholders = contract::placeholders();
  const int64_t most = static_cast<int64_t>(placeholders.size());
  if (num_embs < 0 || num_embs > most) {
    throw InputError("num_embs must be in 0.." + std::to_string(most) + ", got " + std::to_string(num_embs));
  }
  if (num_embs_gen < 0) throw InputError("num_embs_gen must be >= 0, got " + std::to_string(num_embs_gen));
  std::string perception, generation;
  for (int64_t i = 0; i < num_embs; ++i) perception += placeholders[static_cast<size_t>(i)];
  for (int64_t i = 0; i < num_embs_gen; ++i) generation += contract::kGenerationPlaceholder;

  std::string out;
  size_t pos = 0;
  while (true) {
    // The leftmost routing token after `pos` (no routing token is a prefix of another).
    size_t at = std::string::npos;
    const std::pair<std::string, std::string>* hit = nullptr;
    for (const auto& route : contract::routing_tokens()) {
      const size_t found = answer.find(route.first, pos);
      if (found < at) {
        at = found;
        hit = &route;
      }
    }
    if (!hit) break;
    const size_t end = at + hit->first.size();
    out.append(answer, pos, end - pos);
    const std::string& placeholder = contract::is_generation_kind(hit->second) ? generation : perception;
    if (answer.compare(end, placeholder.size(), placeholder) != 0) out += placeholder;
    pos = end;
  }
  out.append(answer, pos, std::string::npos);
  return out;
}

}  // namespace vle
