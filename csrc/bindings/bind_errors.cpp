// The one translation of the core's exceptions (visionllm_edge/errors.h) into the SDK's Python types, message
// kept as thrown:
//   vle::TokenizerError, vle::InputError -> ValueError
//   vle::ArtifactError                   -> visionllm_edge.manifest.ManifestError (a ValueError)
//   vle::BackendUnavailableError         -> visionllm_edge.runtime.engine.BackendUnavailableError
//   vle::EngineError, any other vle::Error -> RuntimeError
// The SDK's classes are imported when an error is first translated, not when _core loads, since those
// modules import _core themselves. Exceptions outside the hierarchy go on to pybind11's own translators.
#include <pybind11/pybind11.h>

#include <cstring>
#include <exception>

#include "bindings/bind_registry.h"
#include "visionllm_edge/errors.h"

namespace py = pybind11;

namespace {

// Raises `type` with `message`. A message quotes what it names, and a file's bytes or a decoded token need not
// be UTF-8: those bytes become \xNN escapes. (PyErr_SetString decodes strictly, and a UnicodeDecodeError
// naming a byte position would take the place of the error.)
void set_error(PyObject* type, const char* message) {
  PyObject* text = PyUnicode_DecodeUTF8(message, static_cast<Py_ssize_t>(std::strlen(message)), "backslashreplace");
  if (text == nullptr) return;  // out of memory: that error is set instead
  PyErr_SetObject(type, text);
  Py_DECREF(text);
}

// Raises `module.attr` with `message`; `fallback` when the class cannot be imported (a broken install), so an
// error is never lost behind an ImportError.
void raise_sdk_error(const char* module, const char* attr, PyObject* fallback, const char* message) {
  try {
    py::object cls = py::module_::import(module).attr(attr);
    set_error(cls.ptr(), message);
  } catch (py::error_already_set&) {
    set_error(fallback, message);
  }
}

void translate(std::exception_ptr thrown) {
  try {
    if (thrown) std::rethrow_exception(thrown);
  } catch (const vle::TokenizerError& e) {  // before ArtifactError, which it derives from
    set_error(PyExc_ValueError, e.what());
  } catch (const vle::ArtifactError& e) {
    raise_sdk_error("visionllm_edge.manifest", "ManifestError", PyExc_ValueError, e.what());
  } catch (const vle::InputError& e) {
    set_error(PyExc_ValueError, e.what());
  } catch (const vle::BackendUnavailableError& e) {
    raise_sdk_error("visionllm_edge.runtime.engine", "BackendUnavailableError", PyExc_RuntimeError, e.what());
  } catch (const vle::Error& e) {  // EngineError and anything added to the hierarchy later
    set_error(PyExc_RuntimeError, e.what());
  }
}

void bind(py::module_&) { py::register_exception_translator(&translate); }

const vle::BindRegistration registration(&bind);

}  // namespace
