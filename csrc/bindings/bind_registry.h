// Each csrc/bind_<concern>.cpp registers its bindings here with a static `BindRegistration`, so adding a
// concern never touches a shared file.
#pragma once

#include <pybind11/pybind11.h>

#include <vector>

namespace vle {

using BindFn = void (*)(pybind11::module_&);

inline std::vector<BindFn>& binders() {
  static std::vector<BindFn> fns;
  return fns;
}

struct BindRegistration {
  explicit BindRegistration(BindFn fn) { binders().push_back(fn); }
};

}  // namespace vle
