// What the machine has: the GPUs the CUDA runtime sees, asked without throwing, so that tests can skip
// naming what is missing and the TensorRT engines can stamp the device they were built for.
#pragma once

#include <string>

namespace vle {
namespace cuda {

struct DeviceInfo {
  int id = -1;
  std::string name;  // "NVIDIA H100 80GB HBM3"
  int sm = 0;        // compute capability as major * 10 + minor: 87 (Orin), 90 (H100)
  size_t memory_bytes = 0;
};

// The number of GPUs; 0 when there is none or no driver (the reason in `why` when given).
int device_count(std::string* why = nullptr);
// True when device `device_id` exists and a context can be made on it; otherwise false with the CUDA
// error (or the count of devices) in `why`.
bool cuda_available(std::string* why = nullptr, int device_id = 0);
// Facts of device `device_id`; false (and `why`) when it cannot be asked.
bool device_info(int device_id, DeviceInfo& info, std::string* why = nullptr);

}  // namespace cuda
}  // namespace vle
