// Bindings of artifact/manifest.h and artifact/contract.h: conversion and GIL release, nothing else.
//
// `load_manifest` and `parse_manifest` run the C++ parser (every check; the GIL is released while it hashes
// files) and return what the Python SDK builds its dataclasses from: the validated document in its own key
// order, and the resolved absolute path of every file it names. A vle::ArtifactError reaches Python as
// visionllm_edge.manifest.ManifestError through the one translator of bind_errors.cpp.
// `artifact_contract` hands the C++ contract table to Python, where a test compares it with contract.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>

#include "artifact/contract.h"
#include "artifact/manifest.h"
#include "bindings/bind_registry.h"

namespace py = pybind11;

namespace {

py::object to_python(const nlohmann::ordered_json& value) {
  switch (value.type()) {
    case nlohmann::ordered_json::value_t::null:
      return py::none();
    case nlohmann::ordered_json::value_t::boolean:
      return py::bool_(value.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer:
      return py::int_(value.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_unsigned:
      return py::int_(value.get<uint64_t>());
    case nlohmann::ordered_json::value_t::number_float:
      return py::float_(value.get<double>());
    case nlohmann::ordered_json::value_t::string:
      return py::str(value.get_ref<const std::string&>());
    case nlohmann::ordered_json::value_t::array: {
      py::list out;
      for (const auto& item : value) out.append(to_python(item));
      return std::move(out);
    }
    case nlohmann::ordered_json::value_t::object: {
      py::dict out;
      for (const auto& item : value.items()) out[py::str(item.key())] = to_python(item.value());
      return std::move(out);
    }
    default:
      throw py::type_error("manifest: binary JSON values have no Python form");
  }
}

// The manifest as the SDK builds it: {"artifact_dir", "data", "paths": {graphs: {name: {path,
// external_data}}, embeddings, tokenizer, sentencepiece, extra_files: {name: path}}}.
py::dict to_python(const vle::Manifest& m, const nlohmann::ordered_json& document) {
  py::dict graphs;
  for (const auto& [name, g] : m.graphs) {
    py::list external;
    for (const auto& p : g.external_data) external.append(p.string());
    py::dict entry;
    entry["path"] = g.path.string();
    entry["external_data"] = external;
    graphs[py::str(name)] = entry;
  }
  py::dict extra;
  for (const auto& [name, ref] : m.extra_files) extra[py::str(name)] = ref.path.string();
  py::dict paths;
  paths["graphs"] = graphs;
  paths["embeddings"] = m.embeddings.file.path.string();
  paths["tokenizer"] = m.tokenizer.file.path.string();
  paths["sentencepiece"] = m.tokenizer.sentencepiece
                               ? py::object(py::str(m.tokenizer.sentencepiece->path.string()))
                               : py::object(py::none());
  paths["extra_files"] = extra;
  py::dict out;
  out["artifact_dir"] = m.artifact_dir.string();
  out["data"] = to_python(document);
  out["paths"] = paths;
  return out;
}

py::dict load(const std::string& artifact_dir, bool verify_hashes) {
  nlohmann::ordered_json document;
  vle::Manifest m;
  {
    py::gil_scoped_release release;
    const vle::ManifestLocation where = vle::locate_manifest(artifact_dir);
    document = vle::parse_manifest_text(vle::read_manifest_text(where), where.source);
    m = vle::parse_manifest(document, where.folder, where.source, verify_hashes);
  }
  return to_python(m, document);
}

py::dict parse(const std::string& text, const std::string& artifact_dir, const std::string& source,
               bool verify_hashes) {
  nlohmann::ordered_json document;
  vle::Manifest m;
  {
    py::gil_scoped_release release;
    document = vle::parse_manifest_text(text, source);
    m = vle::parse_manifest(document, artifact_dir, source, verify_hashes);
  }
  return to_python(m, document);
}

py::dict contract_table() {
  namespace c = vle::contract;
  py::dict graphs;  // in contract order
  for (const std::string& name : c::graph_names()) {
    const c::GraphNames& g = c::graphs().at(name);
    graphs[py::str(name)] =
        py::make_tuple(g.file, py::tuple(py::cast(g.inputs)), py::tuple(py::cast(g.outputs)));
  }
  py::dict components;
  for (const auto& [name, members] : c::component_graphs())
    components[py::str(name)] = py::tuple(py::cast(members));
  py::dict routing_tokens, query_table, decoder_of;
  for (const auto& [token, kind] : c::routing_tokens()) {
    routing_tokens[py::str(token)] = kind;
    query_table[py::str(kind)] = c::query_table_of(kind);
    decoder_of[py::str(kind)] = c::decoder_of(kind);
  }
  py::dict out;
  out["MANIFEST_FILE"] = c::kManifestFile;
  out["TOKENIZER_FILE"] = c::kTokenizerFile;
  out["SENTENCEPIECE_FILE"] = c::kSentencePieceFile;
  out["EMBEDDINGS_FILE"] = c::kEmbeddingsFile;
  out["VALIDATION_FILE"] = c::kValidationFile;
  out["UNCOND_FILE"] = c::kUncondFile;
  out["UNCOND_TENSOR"] = c::kUncondTensor;
  out["MANIFEST_SCHEMA_VERSION"] = c::kManifestSchemaVersion;
  out["MANIFEST_MIN_SCHEMA_VERSION"] = c::kManifestMinSchemaVersion;
  out["PRODUCER_NAME"] = c::kProducerName;
  out["VERSION"] = c::kPackageVersion;
  out["GRAPHS"] = graphs;
  out["COMPONENT_GRAPHS"] = components;
  out["ADDED_TOKENS"] = py::tuple(py::cast(c::added_tokens()));
  out["REQUIRED_TOKENS"] = py::tuple(py::cast(c::required_tokens()));
  out["IMAGE_TOKEN"] = c::kImageToken;
  out["IMAGE_PATCH_TOKEN"] = c::kImagePatchToken;
  out["REGION_TOKEN"] = c::kRegionToken;
  out["REGION_OPEN"] = c::kRegionOpen;
  out["REGION_CLOSE"] = c::kRegionClose;
  out["BOS_TOKEN"] = c::kBosToken;
  out["EOS_TOKEN"] = c::kEosToken;
  out["UNK_TOKEN"] = c::kUnkToken;
  out["INPUT_MARKERS"] = py::tuple(py::cast(c::input_markers()));
  out["ROUTING_TOKENS"] = routing_tokens;
  out["ROUTING_KINDS"] = py::tuple(py::cast(c::routing_kinds()));
  out["QUERY_TABLE"] = query_table;
  out["DECODER_OF_KIND"] = decoder_of;
  out["GENERATION_KINDS"] = py::tuple(py::cast(c::generation_kinds()));
  out["ALL_PLACEHOLDERS"] = py::tuple(py::cast(c::placeholders()));
  out["GENERATION_PLACEHOLDER"] = c::kGenerationPlaceholder;
  out["DTYPES"] = py::tuple(py::cast(c::dtypes()));
  out["PRECISIONS"] = py::tuple(py::cast(c::precisions()));
  out["DECODERS"] = py::tuple(py::cast(c::decoders()));
  out["QUERY_TABLES"] = py::tuple(py::cast(c::query_tables()));
  out["VAE_SCALE"] = c::kVaeScale;
  out["SYSTEM_PROMPT"] = c::kSystemPrompt;
  out["ROLES"] = py::make_tuple(c::kUserRole, c::kAssistantRole);
  out["SEP"] = c::kSep;
  out["SEP2"] = c::kSep2;
  out["LABEL_DELIMITERS"] = py::tuple(py::cast(c::label_delimiters()));
  return out;
}

void bind(py::module_& m) {
  m.def("load_manifest", &load, py::arg("artifact_dir"), py::arg("verify_hashes") = true,
        "Reads and checks <artifact_dir>/manifest.json; {'artifact_dir', 'data', 'paths'}.");
  m.def("parse_manifest", &parse, py::arg("text"), py::arg("artifact_dir"), py::arg("source"),
        py::arg("verify_hashes") = true, "Checks a manifest's JSON text against the files in artifact_dir.");
  m.def("artifact_contract", &contract_table,
        "The C++ contract table (artifact/contract.h) by contract.py name.");
}

const vle::BindRegistration registration(&bind);

}  // namespace
