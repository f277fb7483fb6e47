// The LLM's device path (cuda/llm_device.h) against the host one (loop/llm_state.h) with the same scripted
// engine: a stand-in for the llm graph whose outputs depend on every input it is bound to (the step's
// embeddings, positions and output rows, the whole past of every layer), so that a wrong binding, a
// missing upload or a link row out of place changes a token, a link or the arena. Both paths run the same
// prefill and decode steps (plain and routing, greedy and sampled, float32 and float16 inputs); the tokens,
// the prefill's hidden rows, the links and the arena's rows must agree bit for bit. Skipped without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda/llm_device.h"
#include "cuda/memory.h"
#include "cuda_skip.h"
#include "loop/llm_state.h"
#include "memory/half.h"

namespace {

constexpr int64_t kVocab = 60, kHidden = 8, kLayers = 2, kKvHeads = 1, kHeadDim = 4, kCapacity = 64;
constexpr int64_t kPatch = 1, kDet = 3, kPlaceholder = 4, kEos = 2, kQueries = 3;

// The scripted llm graph, on host or device views (copied through the host to compute on them).
class ScriptedLlm final : public vle::Engine {
 public:
  explicit ScriptedLlm(bool device) : device_(device) {}
  const std::string& name() const override { return name_; }
  const std::vector<vle::TensorInfo>& inputs() const override { return info_; }
  const std::vector<vle::TensorInfo>& outputs() const override { return info_; }
  bool device_io() const override { return device_; }
  std::string end_profiling() override { return ""; }

  std::vector<vle::Tensor> run(const std::vector<vle::NamedView>& inputs, const std::vector<vle::NamedView>& bound,
                               const std::vector<std::string>& fetch, vle::MemoryKind fetch_memory) override {
    EXPECT_EQ(fetch.size(), 2u);
    const vle::MemoryKind want = device_ ? vle::MemoryKind::kDevice : vle::MemoryKind::kHost;
    EXPECT_EQ(fetch_memory, want);
    for (const auto& [name, view] : inputs) EXPECT_EQ(view.memory, want) << name;
    for (const auto& [name, view] : bound) EXPECT_EQ(view.memory, want) << name;
    const std::vector<float> embeds = floats(inputs[0].second);
    const std::vector<int64_t> positions = ints(inputs[1].second), rows = ints(inputs[2].second);
    const int64_t s = static_cast<int64_t>(positions.size());
    // Each layer's new K/V rows: the step's embeddings and positions; their past: folded into one number.
    double past_sum = 0;
    for (int64_t l = 0; l < kLayers; ++l) {
      for (int side = 0; side < 2; ++side) {
        const vle::TensorView& past = inputs[static_cast<size_t>(3 + 2 * l + side)].second;
        const std::vector<float> p = floats(past);
        for (size_t i = 0; i < p.size(); ++i) past_sum += p[i] * static_cast<double>(1 + (i % 7) + l + side);
        std::vector<float> present(static_cast<size_t>(s * kKvHeads * kHeadDim));
        for (int64_t i = 0; i < s; ++i) {
          for (int64_t d = 0; d < kHeadDim; ++d) {
            present[static_cast<size_t>(i * kHeadDim + d)] =
                embeds[static_cast<size_t>(i * kHidden + (d + l) % kHidden)] * (side ? -1.f : 1.f) +
                0.01f * static_cast<float>(positions[static_cast<size_t>(i)]);
          }
        }
        write(bound[static_cast<size_t>(2 * l + side)].second, present);
      }
    }
    const auto r = static_cast<int64_t>(rows.size());
    std::vector<float> hidden(static_cast<size_t>(r * kHidden)), logits(static_cast<size_t>(r * kVocab));
    for (int64_t k = 0; k < r; ++k) {
      const int64_t row = rows[static_cast<size_t>(k)];
      for (int64_t h = 0; h < kHidden; ++h) {
        hidden[static_cast<size_t>(k * kHidden + h)] =
            std::tanh(embeds[static_cast<size_t>(row * kHidden + h)] + static_cast<float>(past_sum * 1e-3) +
                      0.1f * static_cast<float>(positions[static_cast<size_t>(row)]));
      }
      for (int64_t v = 0; v < kVocab; ++v) {
        float z = 0;
        for (int64_t h = 0; h < kHidden; ++h) {
          z += hidden[static_cast<size_t>(k * kHidden + h)] * std::sin(static_cast<float>(v * kHidden + h));
        }
        logits[static_cast<size_t>(k * kVocab + v)] = 4.f * z;
      }
    }
    return {output({r, kVocab}, logits, fetch_memory), output({r, kHidden}, hidden, fetch_memory)};
  }

  vle::DType output_dtype = vle::DType::kFloat32;

 private:
  std::vector<uint8_t> bytes(const vle::TensorView& v) const {
    std::vector<uint8_t> out(v.bytes());
    if (v.memory == vle::MemoryKind::kDevice) {
      vle::cuda::copy_to_host(out.data(), v.data, out.size());
    } else if (!out.empty()) {
      std::memcpy(out.data(), v.data, out.size());
    }
    return out;
  }
  std::vector<float> floats(const vle::TensorView& v) const {
    const std::vector<uint8_t> b = bytes(v);
    std::vector<float> out(static_cast<size_t>(v.numel()));
    for (size_t i = 0; i < out.size(); ++i) {
      if (v.dtype == vle::DType::kFloat16) {
        uint16_t h;
        std::memcpy(&h, b.data() + 2 * i, 2);
        out[i] = vle::half_to_float(h);
      } else {
        std::memcpy(&out[i], b.data() + 4 * i, 4);
      }
    }
    return out;
  }
  std::vector<int64_t> ints(const vle::TensorView& v) const {
    EXPECT_EQ(v.dtype, vle::DType::kInt64);
    const std::vector<uint8_t> b = bytes(v);
    std::vector<int64_t> out(static_cast<size_t>(v.numel()));
    if (!out.empty()) std::memcpy(out.data(), b.data(), b.size());
    return out;
  }
  void write(const vle::TensorView& v, const std::vector<float>& values) const {
    ASSERT_EQ(v.numel(), static_cast<int64_t>(values.size()));
    std::vector<uint8_t> b(v.bytes());
    for (size_t i = 0; i < values.size(); ++i) {
      if (v.dtype == vle::DType::kFloat16) {
        const uint16_t h = vle::float_to_half(values[i]);
        std::memcpy(b.data() + 2 * i, &h, 2);
      } else {
        std::memcpy(b.data() + 4 * i, &values[i], 4);
      }
    }
    if (v.memory == vle::MemoryKind::kDevice) {
      vle::cuda::copy_to_device(v.data, b.data(), b.size());
    } else {
      std::memcpy(v.data, b.data(), b.size());
    }
  }
  vle::Tensor output(std::vector<int64_t> shape, const std::vector<float>& values, vle::MemoryKind memory) const {
    vle::Tensor host(output_dtype, shape);
    write(host.view(), values);
    return memory == vle::MemoryKind::kDevice ? vle::cuda::to_device(host) : host;
  }

  bool device_;
  std::string name_ = "llm";
  std::vector<vle::TensorInfo> info_;
};

struct Side {
  Side(bool device, const vle::LlmSetup& base, vle::KVDType kv_dtype, vle::DType dtype)
      : engine(device),
        arena(kLayers, kCapacity, kKvHeads, kHeadDim, kv_dtype,
              device ? vle::cuda::device_allocator() : vle::host_allocator()) {
    engine.output_dtype = dtype;
    vle::LlmSetup setup = base;
    setup.engine = &engine;
    setup.arena = &arena;
    setup.embed_dtype = dtype;
    state = device ? vle::cuda::make_device_llm(setup) : std::make_unique<vle::HostLlm>(setup);
  }
  std::vector<uint8_t> arena_rows() const {
    std::vector<uint8_t> out;
    const size_t n = static_cast<size_t>(arena.length()) * arena.row_bytes();
    for (int64_t l = 0; l < kLayers; ++l) {
      for (const void* base : {arena.key_row(l, 0), arena.value_row(l, 0)}) {
        std::vector<uint8_t> rows(n);
        if (arena.memory() == vle::MemoryKind::kDevice) {
          vle::cuda::copy_to_host(rows.data(), base, n);
        } else {
          std::memcpy(rows.data(), base, n);
        }
        out.insert(out.end(), rows.begin(), rows.end());
      }
    }
    return out;
  }
  ScriptedLlm engine;
  vle::KVArena arena;
  std::unique_ptr<vle::LlmState> state;
};

TEST(CudaLlm, DevicePathMatchesTheHostPath) {
  VLE_REQUIRE_GPU();
  const uint32_t seed = std::random_device{}();
  std::cout << "[ seed     ] " << seed << "\n";
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> table(kVocab * kHidden), image(5 * kHidden);
  for (float& x : table) x = normal(rng);
  for (float& x : image) x = normal(rng);
  std::unordered_map<std::string, std::vector<float>> queries{{"det", std::vector<float>(kQueries * kHidden)}};
  for (float& x : queries["det"]) x = normal(rng);
  vle::LlmSetup base;
  base.hidden = kHidden;
  base.vocab = kVocab;
  base.token_table = {table.data(), {kVocab, kHidden}};
  base.query_tables = &queries;

  for (const vle::DType dtype : {vle::DType::kFloat32, vle::DType::kFloat16}) {
    for (const bool sample : {false, true}) {
      SCOPED_TRACE(std::string(vle::dtype_name(dtype)) + (sample ? ", sampled" : ", greedy"));
      const vle::KVDType kv = dtype == vle::DType::kFloat16 ? vle::KVDType::kFloat16 : vle::KVDType::kFloat32;
      Side host(false, base, kv, dtype), device(true, base, kv, dtype);
      auto router = [&] {
        std::vector<vle::Route> routes;
        routes.emplace_back(kDet, "det", "det", std::vector<int64_t>(kQueries, kPlaceholder),
                            vle::FloatArrayRef{queries["det"].data(), {kQueries, kHidden}});
        return vle::SuperLinkRouter(std::move(routes), kEos);
      };
      vle::SuperLinkRouter host_router = router(), device_router = router();

      // A prompt with five image slots and a complete [DET] group, asking for the group's rows and the last.
      std::vector<int64_t> ids{10, 11, kPatch, kPatch, kPatch, kPatch, kPatch, 12, kDet};
      ids.insert(ids.end(), kQueries, kPlaceholder);
      ids.push_back(13);
      vle::AssemblyInputs in;
      in.token_table = base.token_table;
      in.ids = ids.data();
      in.num_ids = static_cast<int64_t>(ids.size());
      in.image_token_id = kPatch;
      in.image_rows = vle::FloatArrayRef{image.data(), {5, kHidden}};
      in.query_tables["det"] = {queries["det"].data(), {kQueries, kHidden}};
      in.routing_kinds = {{kDet, "det"}};
      in.placeholder_ids = {kPlaceholder};
      const std::vector<int64_t> out_rows{9, 10, 11, static_cast<int64_t>(ids.size()) - 1};
      const vle::Tensor host_hidden = host.state->prefill(in, out_rows);
      const vle::Tensor device_hidden = device.state->prefill(in, out_rows);
      EXPECT_TRUE(device.state->on_device());
      EXPECT_FALSE(host.state->on_device());
      ASSERT_EQ(device_hidden.memory(), vle::MemoryKind::kHost);
      ASSERT_EQ(device_hidden.shape(), host_hidden.shape());
      EXPECT_EQ(std::memcmp(device_hidden.data(), host_hidden.data(), host_hidden.bytes()), 0);

      vle::SamplingParams params;
      params.do_sample = sample;
      params.temperature = 0.8;
      params.top_k = 20;
      params.top_p = 0.9;
      params.repetition_penalty = 1.2;
      std::vector<int64_t> penalized{10, 11, 12};
      host.state->start_decode(penalized);
      device.state->start_decode(penalized);
      vle::Sampler host_sampler(seed), device_sampler(seed);
      // Scripted plans (a routing step every third) so that both paths feed the same steps whatever the
      // tokens; the sampled tokens are compared at every step.
      for (int step = 0; step < 9; ++step) {
        const int64_t want = host.state->next_token(host_sampler, params, penalized);
        ASSERT_EQ(device.state->next_token(device_sampler, params, penalized), want) << "step " << step;
        const int64_t fed = step % 3 == 1 ? kDet : 5 + (want % (kVocab - 5));
        const vle::StepPlan plan = host_router.plan(fed, host.arena.length(), kCapacity, false);
        ASSERT_TRUE(plan.feed);
        host.state->step(plan, host_router);
        device.state->step(plan, device_router);
        penalized.push_back(fed);
        host.state->penalize(fed);
        device.state->penalize(fed);
      }
      host.state->finish_decode(host_router);
      EXPECT_TRUE(device_router.links().empty());  // the device path's links come after decoding
      device.state->finish_decode(device_router);
      ASSERT_EQ(device_router.links().size(), 3u);
      ASSERT_EQ(device_router.links().size(), host_router.links().size());
      for (size_t g = 0; g < host_router.links().size(); ++g) {
        const vle::LinkGroup &a = host_router.links()[g], &b = device_router.links()[g];
        EXPECT_EQ(a.position, b.position);
        EXPECT_EQ(*a.states, *b.states) << "link " << g;
      }
      EXPECT_EQ(device.arena.length(), host.arena.length());
      EXPECT_EQ(device.arena_rows(), host.arena_rows());
    }
  }
}

}  // namespace
