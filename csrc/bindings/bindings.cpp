// The module entry point: runs every registered csrc/bind_<concern>.cpp.
#include <pybind11/pybind11.h>

#include "bindings/bind_registry.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "visionllm-edge C++ core";
  for (vle::BindFn fn : vle::binders()) fn(m);
}
