// Files of an artifact folder: SHA-256 digests, and relative paths confined to the folder.
//
// An artifact must be self-contained so that it can be copied whole: every path a manifest names is a
// relative, '/'-separated path that stays inside the folder after symbolic links are followed.
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>

namespace vle {

// The SHA-256 of a file as 64 lower-case hex digits, read in 1 MiB chunks (graphs can be many GB); an
// ArtifactError naming the file when it cannot be read.
std::string file_sha256(const std::filesystem::path& file);
// The SHA-256 of a buffer, as 64 lower-case hex digits.
std::string sha256_hex(const void* data, size_t size);
// Whether `text` is 64 lower-case hex digits.
bool is_sha256_hex(const std::string& text);

// The artifact folder as every confined path is compared against: absolute, links resolved.
std::filesystem::path resolve_folder(const std::filesystem::path& folder);

// A path from a manifest, resolved inside the artifact folder.
struct ConfinedFile {
  std::filesystem::path full;      // folder / relative, as written
  std::filesystem::path resolved;  // absolute, symbolic links followed
  // Empty when `relative` names an existing regular file inside the folder; else why not, e.g.
  // "'../x' leaves the artifact folder ('..')", "'x' resolves outside the artifact folder (to /etc/x)".
  std::string problem;
};

// `folder` must come from resolve_folder.
ConfinedFile confine_to_folder(const std::filesystem::path& folder, const std::string& relative);

}  // namespace vle
