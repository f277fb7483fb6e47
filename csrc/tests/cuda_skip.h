// The CUDA tests' skip: without a usable GPU a test says so, naming the CUDA runtime's reason.
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "cuda/device.h"

#define VLE_REQUIRE_GPU()                                                                     \
  do {                                                                                        \
    std::string vle_why_;                                                                     \
    if (!::vle::cuda::cuda_available(&vle_why_)) GTEST_SKIP() << "needs a CUDA GPU: " << vle_why_; \
  } while (0)
