# Cross-compiles for 64-bit Arm Linux (a Jetson's CPU) on a Debian x86-64 host:
#   compilers  Debian's g++-aarch64-linux-gnu (sysroot "/": its own libc and libstdc++ live in /usr/aarch64-linux-gnu)
#   libraries  Debian multiarch packages of the target (apt-get install libssl-dev:arm64 ...), which install into
#              /usr/lib/aarch64-linux-gnu beside the host's /usr/lib/x86_64-linux-gnu; a library whose :arm64
#              package cannot be co-installed with the host's is unpacked under a prefix named in
#              CMAKE_PREFIX_PATH instead (scripts/cross_aarch64.sh does that for sentencepiece)
#   tests      run under qemu-aarch64 (Debian's qemu-user): ctest and gtest_discover_tests call the emulator
# Used by the aarch64-cross preset; scripts/cross_aarch64.sh installs the packages, builds and runs the tests.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
# The multiarch directory CMake searches under each prefix (lib/aarch64-linux-gnu, lib/aarch64-linux-gnu/cmake);
# the compiler reports the same, set here so that nothing can fall back to the host's x86_64-linux-gnu.
set(CMAKE_LIBRARY_ARCHITECTURE aarch64-linux-gnu)

# Multiarch puts target and host files in one tree, so the root is "/": libraries and CMake packages come only from
# the target's directories (the architecture above), programs (pkg-config, the emulator) from the host.
set(CMAKE_FIND_ROOT_PATH /)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# pkg-config reads the target's .pc files, never the host's (/usr/lib/x86_64-linux-gnu/pkgconfig); the
# architecture-independent ones (/usr/share/pkgconfig) serve both. FindPkgConfig puts each CMAKE_PREFIX_PATH
# entry's lib/pkgconfig in front (when cross-compiling, not lib/aarch64-linux-gnu/pkgconfig).
set(ENV{PKG_CONFIG_LIBDIR} "/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig")

# The emulator runs every target program CMake runs: test discovery at build time and each test under ctest.
find_program(VLE_QEMU_AARCH64 qemu-aarch64)
if(NOT VLE_QEMU_AARCH64)
  message(FATAL_ERROR "qemu-aarch64 not found: the aarch64 tests run under it (apt-get install qemu-user, or run "
                      "scripts/cross_aarch64.sh, which installs it)")
endif()
# Target programs run on the target's runtime from Debian's multiarch packages (libc6:arm64, libstdc++6:arm64:
# /lib/ld-linux-aarch64.so.1 and /usr/lib/aarch64-linux-gnu), like every other target library, so the loader, libc
# and libstdc++ are of one build. (The cross toolchain's own copies in /usr/aarch64-linux-gnu/lib, the usual
# "-L /usr/aarch64-linux-gnu", would mix its ld.so with the multiarch libc, which the loader finds first in
# /lib/aarch64-linux-gnu: glibc's private layout differs between the two builds, and the first pthread_create
# loops forever.)
# The -L prefix serves one file: qemu opens an absolute path under the prefix when the file exists there, else the
# host's, and qemu-user shows the host's x86 /proc/cpuinfo, on which ONNX Runtime's CPU detection crashes while the
# library loads (SIGSEGV in its initializer, onnxruntime 1.32 under qemu 7.2). proc/cpuinfo here is an aarch64
# kernel's text for each host CPU (Cortex-A78AE, a Jetson Orin's core).
set(_vle_qemu_prefix "${CMAKE_BINARY_DIR}/qemu-aarch64-prefix")
file(MAKE_DIRECTORY "${_vle_qemu_prefix}/proc")
# /sys/devices/system/cpu/possible lists the CPUs as ranges ("0-1", "0-3,8-11"); ONNX Runtime reads it too.
file(READ /sys/devices/system/cpu/possible _vle_cpus)
string(STRIP "${_vle_cpus}" _vle_cpus)
string(REPLACE "," ";" _vle_cpus "${_vle_cpus}")
set(_vle_cpuinfo "")
foreach(_vle_range IN LISTS _vle_cpus)
  string(REPLACE "-" ";" _vle_range "${_vle_range}")
  list(GET _vle_range 0 _vle_first)
  list(GET _vle_range -1 _vle_last)
  foreach(_vle_cpu RANGE ${_vle_first} ${_vle_last})
    string(APPEND _vle_cpuinfo
      "processor\t: ${_vle_cpu}\n"
      "BogoMIPS\t: 62.50\n"
      "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n"
      "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd42\nCPU revision\t: 1\n\n")
  endforeach()
endforeach()
file(WRITE "${_vle_qemu_prefix}/proc/cpuinfo" "${_vle_cpuinfo}")
set(CMAKE_CROSSCOMPILING_EMULATOR "${VLE_QEMU_AARCH64};-L;${_vle_qemu_prefix}")
