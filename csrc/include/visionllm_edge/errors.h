// The exceptions of the visionllm-edge C++ API. Every message names the thing that is wrong: the file, the
// key path, the input name, the shape or value expected and the one got.
//
//   vle::Error                      base of everything the library throws on purpose
//   ├── vle::ArtifactError          an artifact folder that cannot be used (manifest key, missing file,
//   │   │                           sha256 mismatch, a path that leaves the folder)
//   │   └── vle::TokenizerError     the tokenizer files, or a tokenizer that disagrees with the manifest
//   ├── vle::InputError             a request the caller got wrong (image, prompt, regions, options)
//   ├── vle::BackendUnavailableError  a backend or execution provider this build or machine lacks
//   ├── vle::EngineError            an engine failed while running a graph (names the graph and the call)
//   └── vle::InterruptedError       RunOptions::interrupted said stop (names where the request stopped)
//
// The Python bindings map them to the SDK's own types: ArtifactError -> visionllm_edge.manifest.ManifestError
// (a ValueError), TokenizerError and InputError -> ValueError, BackendUnavailableError ->
// visionllm_edge.runtime.BackendUnavailableError (a RuntimeError), EngineError -> RuntimeError; an
// InterruptedError raised for a Python signal (SIGINT) re-raises the signal's own exception
// (KeyboardInterrupt).
#pragma once

#include <stdexcept>
#include <string>

namespace vle {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class ArtifactError : public Error {
 public:
  using Error::Error;
};

class TokenizerError : public ArtifactError {
 public:
  using ArtifactError::ArtifactError;
};

class InputError : public Error {
 public:
  using Error::Error;
};

class BackendUnavailableError : public Error {
 public:
  using Error::Error;
};

class EngineError : public Error {
 public:
  using Error::Error;
};

class InterruptedError : public Error {
 public:
  using Error::Error;
};

}  // namespace vle
