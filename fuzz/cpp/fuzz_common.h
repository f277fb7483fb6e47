// What the libFuzzer harnesses of fuzz/cpp/ share: an in-memory file for the entry points that read a path
// (the safetensors reader maps its file, the image decoder opens one), and the rule for what counts as a
// finding.
//
// A harness answers one input. A vle::Error (or, for the lower-level helpers that document it,
// std::invalid_argument) is a refusal that names the input: the correct answer to hostile bytes, so the
// harness returns. Anything else — another exception type, a crash, a sanitizer report, a hang, an
// allocation past -malloc_limit_mb — escapes to libFuzzer, which records the input as a crash.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace vle::fuzz {

// A file in memory (memfd), reachable by path as /proc/self/fd/N: the entry points under test open and map
// it as any file, and no input ever touches the disk. One per process, rewritten for each input.
class MemoryFile {
 public:
  explicit MemoryFile(const char* name) : fd_(memfd_create(name, MFD_CLOEXEC)) {
    if (fd_ < 0) {
      std::fprintf(stderr, "memfd_create(%s): %s\n", name, std::strerror(errno));
      std::abort();
    }
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  ~MemoryFile() { close(fd_); }
  MemoryFile(const MemoryFile&) = delete;
  MemoryFile& operator=(const MemoryFile&) = delete;

  // Replaces the file's bytes with `data`; returns its path.
  const std::string& write(const uint8_t* data, size_t size) {
    if (ftruncate(fd_, 0) != 0) fail("ftruncate");
    size_t done = 0;
    while (done < size) {
      const ssize_t n = pwrite(fd_, data + done, size - done, static_cast<off_t>(done));
      if (n <= 0) fail("pwrite");
      done += static_cast<size_t>(n);
    }
    return path_;
  }

 private:
  [[noreturn]] void fail(const char* what) const {
    std::fprintf(stderr, "%s on %s: %s\n", what, path_.c_str(), std::strerror(errno));
    std::abort();
  }

  int fd_;
  std::string path_;
};

}  // namespace vle::fuzz
