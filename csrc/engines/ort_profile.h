// ONNX Runtime's session profile (EngineOptions::profile_prefix), read back: how many host<->device copies
// each run made (the GPU check's bar "no Memcpy on the hot path" is that every decode step's run has none),
// and how many FLOPs each run's matrix kernels did at the shapes they ran (the bench's compute floors).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace vle {

// One run of a copy node. Its bytes (the profile's args.output_size) tell a copy of a few scalars, which a
// decode step may make, from one that moves a tensor the size of the past, which it must not.
struct CopyNode {
  std::string op;    // "MemcpyToHost" or "MemcpyFromHost"
  std::string node;  // the graph node's name (the event's, less "_kernel_time")
  int64_t bytes = 0;
};

// The copy nodes of one Run: ONNX Runtime inserts MemcpyToHost / MemcpyFromHost where a value crosses
// between a device provider and the CPU. to_host and from_host count `nodes` by op.
struct RunCopies {
  int to_host = 0;
  int from_host = 0;
  std::vector<CopyNode> nodes;  // in the profile's order
};

// One entry per "model_run" event of the profile, in time order: the Memcpy kernels that ran inside it.
// A file that is missing or is not a profile (a JSON array of trace events), or a Memcpy kernel without a
// whole-number output_size, is an ArtifactError naming it.
std::vector<RunCopies> profile_copies(const std::filesystem::path& profile_json);

// The arithmetic of one Run, counted from each kernel's input_type_shape / output_type_shape (a multiply-add is
// 2 FLOPs), by the rate class it runs at:
//   float: MatMul, FusedMatMul, Gemm, FusedGemm, Conv, FusedConv, NhwcFusedConv, ConvTranspose;
//   int8:  MatMulInteger, DynamicQuantizeMatMul, MatMulIntegerToFloat, QLinearMatMul, ConvInteger, QLinearConv;
//   nbits: MatMulNBits (4-bit weights; its accuracy_level picks the compute precision, which the profile does
//          not record).
// A matrix product is 2 * |Y| * K, K read from A beside Y's rows (A may be transposed: with A = [.., a, b] and
// Y = [.., M, N], K is b when a == M, else a); a convolution 2 * |Y| * |W| / W[0] (each output element is one
// filter's dot product: Cin / group x kernel); a transposed convolution 2 * |X| * |W| / W[0] (each input
// element is scattered through Cout / group x kernel weights). The shapes are those the kernel ran, so NCHWc
// blocked convolutions count their padded channels. Other ops (element-wise, norms, softmax, gathers,
// Einsum) are not counted: a floor from these counts is a lower bound of the run's work.
struct RunFlops {
  int64_t ts_us = 0, dur_us = 0;       // the model_run event's start (since the session's profiler began), span
  int64_t float_flops = 0, int8_flops = 0, nbits_flops = 0;
  std::map<std::string, int> uncounted;  // kernels of compute-heavy ops the counter has no rule for, by op
};

// One entry per "model_run" event, in time order. A counted kernel without the shapes its rule needs is an
// ArtifactError naming the node; so is a file that is not a profile.
std::vector<RunFlops> profile_flops(const std::filesystem::path& profile_json);

}  // namespace vle
