# find_package(visionllm_edge): the installed static library and its public headers. The library's own
# dependencies (Debian packages) are found again here because a static library carries them to the program.
include(CMakeFindDependencyMacro)
find_dependency(Threads)
find_dependency(nlohmann_json 3)
find_dependency(OpenSSL COMPONENTS Crypto)
find_dependency(PkgConfig)
pkg_check_modules(SENTENCEPIECE REQUIRED IMPORTED_TARGET sentencepiece)
include("${CMAKE_CURRENT_LIST_DIR}/visionllm_edge-options.cmake")
if(visionllm_edge_WITH_CUDA)  # built with VLE_WITH_CUDA: the library links CUDA::cudart_static
  find_dependency(CUDAToolkit)
endif()
include("${CMAKE_CURRENT_LIST_DIR}/visionllm_edge-targets.cmake")
