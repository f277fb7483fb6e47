#include "artifact/files.h"

#include <openssl/evp.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <system_error>
#include <vector>

#include "artifact/json_text.h"
#include "text/utf8.h"
#include "visionllm_edge/errors.h"

namespace fs = std::filesystem;

namespace vle {

namespace {

constexpr size_t kHashChunk = size_t{1} << 20;

struct DigestContext {
  DigestContext() : ctx(EVP_MD_CTX_new()) {
    if (!ctx || EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) != 1) {
      EVP_MD_CTX_free(ctx);
      throw ArtifactError("sha256: OpenSSL could not start a SHA-256 digest");
    }
  }
  ~DigestContext() { EVP_MD_CTX_free(ctx); }
  DigestContext(const DigestContext&) = delete;
  DigestContext& operator=(const DigestContext&) = delete;

  void update(const void* data, size_t size) {
    if (EVP_DigestUpdate(ctx, data, size) != 1) throw ArtifactError("sha256: OpenSSL digest update failed");
  }
  std::string hex() {
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int length = 0;
    if (EVP_DigestFinal_ex(ctx, digest, &length) != 1) throw ArtifactError("sha256: OpenSSL digest failed");
    static const char* digits = "0123456789abcdef";
    std::string out;
    out.reserve(2 * length);
    for (unsigned int i = 0; i < length; ++i) {
      out += digits[digest[i] >> 4];
      out += digits[digest[i] & 15];
    }
    return out;
  }

  EVP_MD_CTX* ctx;
};

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};

// Whether `path` lies inside `folder`, component by component (both absolute and normal).
bool inside(const fs::path& path, const fs::path& folder) {
  auto p = path.begin();
  for (auto f = folder.begin(); f != folder.end(); ++f, ++p) {
    if (f->empty()) continue;  // a trailing separator
    if (p == path.end() || *p != *f) return false;
  }
  return true;
}

}  // namespace

std::string sha256_hex(const void* data, size_t size) {
  DigestContext digest;
  digest.update(data, size);
  return digest.hex();
}

std::string file_sha256(const fs::path& file) {
  std::unique_ptr<std::FILE, FileCloser> f(std::fopen(file.c_str(), "rb"));
  if (!f) throw ArtifactError(file.string() + ": cannot open to hash (" + std::strerror(errno) + ")");
  DigestContext digest;
  std::vector<unsigned char> chunk(kHashChunk);
  while (true) {
    const size_t n = std::fread(chunk.data(), 1, chunk.size(), f.get());
    if (n) digest.update(chunk.data(), n);
    if (n < chunk.size()) {
      if (std::ferror(f.get())) throw ArtifactError(file.string() + ": read error while hashing");
      break;
    }
  }
  return digest.hex();
}

bool is_sha256_hex(const std::string& text) {
  if (text.size() != 64) return false;
  for (char c : text) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

fs::path resolve_folder(const fs::path& folder) {
  std::error_code ec;
  fs::path absolute = fs::absolute(folder, ec);
  if (ec) absolute = folder;
  fs::path resolved = fs::weakly_canonical(absolute, ec);
  return ec ? absolute.lexically_normal() : resolved;
}

ConfinedFile confine_to_folder(const fs::path& folder, const std::string& relative) {
  ConfinedFile out;
  const std::string shown = utf8::python_repr(relative);
  // A drive ("C:x") or a backslash would mean something else on Windows; the manifest is portable.
  if (relative.empty() || relative[0] == '/' || relative.find('\\') != std::string::npos ||
      (relative.size() >= 2 && relative[1] == ':')) {
    out.problem = shown + " is not a relative '/'-separated path inside the artifact folder";
    return out;
  }
  size_t begin = 0;
  while (begin <= relative.size()) {
    size_t end = relative.find('/', begin);
    if (end == std::string::npos) end = relative.size();
    if (relative.compare(begin, end - begin, "..") == 0 && end - begin == 2) {
      out.problem = shown + " leaves the artifact folder ('..')";
      return out;
    }
    begin = end + 1;
  }
  out.full = (folder / relative).lexically_normal();
  std::error_code ec;
  out.resolved = fs::weakly_canonical(out.full, ec);
  if (ec) out.resolved = out.full;
  // weakly_canonical stops at a link whose target is missing; such a link must point inside too.
  if (fs::is_symlink(fs::symlink_status(out.resolved, ec))) {
    fs::path target = fs::read_symlink(out.resolved, ec);
    if (!ec)
      out.resolved = (target.is_absolute() ? target : out.resolved.parent_path() / target).lexically_normal();
  }
  // A symbolic link may point anywhere; the artifact must be self-contained so it can be copied whole.
  if (!inside(out.resolved, folder)) {
    out.problem = shown + " resolves outside the artifact folder (to " + out.resolved.string() + ")";
    return out;
  }
  const fs::file_status status = fs::status(out.resolved, ec);
  if (!fs::exists(status)) {
    out.problem = shown + ": file not found (looked for " + out.full.string() + ")";
  } else if (!fs::is_regular_file(status)) {
    out.problem = shown + " is not a regular file";
  }
  return out;
}

}  // namespace vle
