// The one translation of the core's exceptions (visionllm_edge/errors.h) into the SDK's Python types, message
// kept as thrown:
//   vle::TokenizerError, vle::InputError -> ValueError
//   vle::ArtifactError                   -> visionllm_edge.manifest.ManifestError (a ValueError)
//   vle::BackendUnavailableError         -> visionllm_edge.runtime.engine.BackendUnavailableError
//   vle::EngineError, any other vle::Error -> RuntimeError
// The SDK's classes are imported when an error is first translated, not when _core loads, since those
// modules import _core themselves. Exceptions outside the hierarchy go on to pybind11's own translators.
#include <pybind11/pybind11.h>

#include <exception>

#include "bindings/bind_registry.h"
#include "visionllm_edge/errors.h"

namespace py = pybind11;

namespace {

// Raises `module.attr` with `message`; `fallback` when the class cannot be imported (a broken install), so an
// error is never lost behind an ImportError.
void raise_sdk_error(const char* module, const char* attr, PyObject* fallback, const char* message) {
  try {
    py::object cls = py::module_::import(module).attr(attr);
    PyErr_SetString(cls.ptr(), message);
  } catch (py::error_already_set&) {
    PyErr_SetString(fallback, message);
  }
}

void translate(std::exception_ptr thrown) {
  try {
    if (thrown) std::rethrow_exception(thrown);
  } catch (const vle::TokenizerError& e) {  // before ArtifactError, which it derives from
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const vle::ArtifactError& e) {
    raise_sdk_error("visionllm_edge.manifest", "ManifestError", PyExc_ValueError, e.what());
  } catch (const vle::InputError& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const vle::BackendUnavailableError& e) {
    raise_sdk_error("visionllm_edge.runtime.engine", "BackendUnavailableError", PyExc_RuntimeError, e.what());
  } catch (const vle::Error& e) {  // EngineError and anything added to the hierarchy later
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
}

void bind(py::module_&) { py::register_exception_translator(&translate); }

const vle::BindRegistration registration(&bind);

}  // namespace
