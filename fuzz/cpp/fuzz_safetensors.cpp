// The safetensors reader (artifact/safetensors.cpp): bytes as an artifact's embeddings.safetensors. The file
// is mapped and its header checked; then every tensor is read as the runtime reads its tables: the header
// entry, the zero-copy view (F32 F16 I64 I32 BOOL) and the float32 copy (F32 F16 BF16 F64), whose every
// element is read so that an entry pointing past the mapping is an AddressSanitizer report.
#include <cstdint>
#include <string>

#include "artifact/safetensors.h"
#include "fuzz_common.h"
#include "visionllm_edge/errors.h"

namespace {

// Reads every byte of a view: a range outside the mapping faults here rather than passing unnoticed.
unsigned char touch(const unsigned char* data, size_t bytes) {
  unsigned char sum = 0;
  for (size_t i = 0; i < bytes; ++i) sum = static_cast<unsigned char>(sum + data[i]);
  return sum;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static vle::fuzz::MemoryFile file("embeddings.safetensors");
  const std::string& path = file.write(data, size);
  volatile unsigned char sink = 0;
  try {
    const vle::SafetensorsFile tensors(path);
    for (const std::string& name : tensors.names()) {
      const vle::SafetensorsEntry& entry = tensors.entry(name);
      if (entry.bytes != static_cast<size_t>(entry.numel()) * entry.element_size) __builtin_trap();
      sink = sink + touch(entry.data, entry.bytes);
      try {
        const vle::TensorView view = tensors.view(name);
        sink = sink + touch(static_cast<const unsigned char*>(view.data), view.bytes());
      } catch (const vle::ArtifactError&) {  // a dtype the runtime does not view, or unaligned data
      }
      try {
        const vle::Tensor copy = tensors.to_float32(name);
        const float* values = copy.data_as<float>();
        float sum = 0;
        for (int64_t i = 0; i < copy.numel(); ++i) sum += values[i];
        sink = sink + static_cast<unsigned char>(sum == sum);
        // The shape check the pipeline makes of each table, against the shape the file claims.
        (void)tensors.to_float32(name, entry.shape);
      } catch (const vle::ArtifactError&) {  // not a float dtype
      }
    }
  } catch (const vle::Error&) {
    // A refusal naming the file and the tensor: the reader's answer to a bad file.
  }
  return 0;
}
