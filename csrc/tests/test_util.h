// Helpers the GoogleTest files share.
#pragma once

#include <exception>
#include <string>

#include <gtest/gtest.h>

namespace vle::test_util {

// Runs `call` and returns the message of the vle error of type E it throws; fails the test otherwise.
template <typename E, typename F>
std::string message_of(F call) {
  try {
    call();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw another exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "did not throw";
  return "";
}

}  // namespace vle::test_util
