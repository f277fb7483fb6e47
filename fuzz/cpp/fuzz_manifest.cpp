// The manifest parser (artifact/manifest.cpp): bytes as manifest.json, read strictly (artifact/json_text.cpp)
// and then validated against an artifact folder. The folder holds a stub of every file the seed manifest
// names (fuzz/corpus/manifest/tiny_random.json, the tiny-random export's), sparse and of the size the seed
// gives, so mutated manifests get past the file checks and reach every section's validation and cap. Hashes
// are not verified: a mutated sha256 would fail on the first graph, and hashing is the files' harness's job,
// not the parser's.
#include <fuzzer/FuzzedDataProvider.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "artifact/manifest.h"
#include "visionllm_edge/errors.h"

namespace fs = std::filesystem;

namespace {

fs::path g_folder;

void remove_folder() {
  std::error_code ec;
  fs::remove_all(g_folder, ec);
}

// A file of `size` bytes at `relative` inside the folder (a hole: it costs no disk).
void stub(const std::string& relative, int64_t size) {
  const fs::path path = g_folder / relative;
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary).close();
  fs::resize_file(path, static_cast<uintmax_t>(size));
}

// Every {"file": ..., "size_bytes": ...} and every "external_data" entry of the seed document.
void stub_files(const nlohmann::json& node) {
  if (node.is_object()) {
    if (node.contains("file") && node["file"].is_string()) {
      stub(node["file"].get<std::string>(), node.value("size_bytes", int64_t{0}));
    }
    if (node.contains("external_data") && node["external_data"].is_array()) {
      for (const auto& name : node["external_data"]) {
        if (name.is_string()) stub(name.get<std::string>(), 0);
      }
    }
    for (const auto& item : node.items()) stub_files(item.value());
  } else if (node.is_array()) {
    for (const auto& item : node) stub_files(item);
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  char pattern[] = "/tmp/vle-fuzz-manifest-XXXXXX";
  if (mkdtemp(pattern) == nullptr) {
    perror("mkdtemp");
    abort();
  }
  g_folder = pattern;
  atexit(remove_folder);
  std::ifstream seed(VLE_SOURCE_DIR "/fuzz/corpus/manifest/tiny_random.json");
  if (!seed) {
    fprintf(stderr, "fuzz_manifest: cannot read the seed manifest fuzz/corpus/manifest/tiny_random.json\n");
    abort();
  }
  stub_files(nlohmann::json::parse(seed));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const nlohmann::ordered_json document = vle::parse_manifest_text(text, "manifest.json");
    const vle::Manifest manifest = vle::parse_manifest(document, g_folder, "manifest.json", /*verify_hashes=*/false);
    // What the pipeline asks of a parsed manifest: every graph and token it names is there.
    for (const auto& [name, graph] : manifest.graphs) (void)manifest.graph(name);
    for (const auto& [token, id] : manifest.tokens) {
      if (manifest.token_id(token) != id) __builtin_trap();
    }
  } catch (const vle::Error&) {
    // A refusal naming the key: the parser's answer to a bad manifest.
  }
  return 0;
}
