// The device implementation of the LLM's steps (loop/llm_state.h): the KV arena (device memory, given in the
// setup), the token and query tables, the step's inputs_embeds / positions / output rows, the logits and the
// link rows stay on the GPU. A prefill uploads its image and region rows once and brings the hidden rows it
// was asked for to the host; a decode step samples on the device and brings back only the token id; the
// routing steps' query rows are gathered into a device link buffer copied to the host once, after decoding.
#pragma once

#include <memory>

#include "loop/llm_state.h"

namespace vle {
namespace cuda {

// Needs the setup's arena in device memory on setup.device_id and an engine with device_io().
std::unique_ptr<LlmState> make_device_llm(const LlmSetup& setup);

}  // namespace cuda
}  // namespace vle
