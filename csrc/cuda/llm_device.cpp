#include "cuda/llm_device.h"

#include <map>
#include <string>
#include <utility>

#include "cuda/check.h"
#include "cuda/kernels.h"
#include "cuda/memory.h"
#include "cuda/sampling.h"
#include "loop/pipeline_impl.h"

namespace vle {
namespace cuda {

namespace {

// A device buffer that grows to the largest size asked of it and is reused.
class Scratch {
 public:
  Scratch(DType dtype, int device_id) : dtype_(dtype), device_id_(device_id) {}
  void* reserve(int64_t elements) {
    if (tensor_.empty() || tensor_.numel() < elements) {
      tensor_ = Tensor(dtype_, {std::max<int64_t>(elements, 1)}, device_allocator(device_id_));
    }
    return tensor_.data();
  }
  void* data() { return tensor_.data(); }

 private:
  DType dtype_;
  int device_id_;
  Tensor tensor_;
};

// Makes `device_id` the calling thread's device (before the members that allocate are made, and again on
// each call: a Pipeline may be used from another thread than the one that loaded it).
struct CurrentDevice {
  explicit CurrentDevice(int device_id) : id(device_id) { use(); }
  void use() const { VLE_CUDA_CHECK(cudaSetDevice(id)); }
  int id;
};

class DeviceLlm final : public LlmState {
 public:
  explicit DeviceLlm(const LlmSetup& setup)
      : LlmState(setup),
        device_(setup.device_id),
        embeds_(setup.embed_dtype, setup.device_id),
        positions_(DType::kInt64, setup.device_id),
        rows_(DType::kInt64, setup.device_id),
        image_rows_(DType::kFloat32, setup.device_id),
        region_rows_(DType::kFloat32, setup.device_id),
        links_(DType::kFloat32, setup.device_id),
        sampler_(setup.vocab) {
    if (setup.arena->memory() != MemoryKind::kDevice) {
      throw EngineError("the device LLM path needs its KV arena in device memory");
    }
    if (!setup.engine->device_io()) {
      throw EngineError("the device LLM path needs an llm engine that binds device memory (CUDA or TensorRT provider)");
    }
    const FloatArrayRef& t = setup.token_table;
    token_table_ = Tensor(DType::kFloat32, t.shape, device_allocator(setup.device_id));
    copy_to_device(token_table_.data(), t.data, token_table_.bytes());
    for (const auto& [kind, rows] : *setup.query_tables) {
      Tensor q(DType::kFloat32, {static_cast<int64_t>(rows.size()) / setup.hidden, setup.hidden},
               device_allocator(setup.device_id));
      copy_to_device(q.data(), rows.data(), q.bytes());
      query_tables_.emplace(kind, std::move(q));
    }
  }

  bool on_device() const override { return true; }

  Tensor prefill(const AssemblyInputs& in, const std::vector<int64_t>& output_rows) override {
    device_.use();
    // The same assembly with the tables swapped for their device copies; the frame's rows go up once.
    AssemblyInputs d = in;
    d.token_table = {token_table_.data_as<float>(), token_table_.shape()};
    if (in.image_rows) d.image_rows = upload_rows(*in.image_rows, image_rows_);
    if (in.region_rows) d.region_rows = upload_rows(*in.region_rows, region_rows_);
    for (auto& [kind, table] : d.query_tables) {
      const Tensor& q = query_tables_.at(kind);
      table = {q.data_as<float>(), q.shape()};
    }
    const std::vector<const float*> sources = assembly_sources(d);
    const int64_t s = in.num_ids;
    gather_rows(sources, setup_.hidden, embeds_.reserve(s * setup_.hidden), setup_.embed_dtype, gather_, stream_.get());
    fill_iota(static_cast<int64_t*>(positions_.reserve(s)), setup_.arena->length(), s, stream_.get());
    copy_to_device_async(rows_.reserve(static_cast<int64_t>(output_rows.size())), output_rows.data(),
                         output_rows.size() * sizeof(int64_t), stream_.get());
    const Tensor hidden = run(s, static_cast<int64_t>(output_rows.size()));
    return loop::to_float(to_host(hidden));
  }

  void start_decode(const std::vector<int64_t>& penalized) override {
    device_.use();
    pending_.clear();
    link_rows_ = 0;
    sampler_.set_penalized(penalized, stream_.get());
  }

  void penalize(int64_t token) override { sampler_.add_penalized(token, stream_.get()); }

  int64_t next_token(Sampler& sampler, const SamplingParams& params, const std::vector<int64_t>&) override {
    // Sampler::sample draws one uniform per sampled token and none for greedy: the same draws here.
    const double u = params.do_sample ? sampler.uniform() : 0.0;
    const int64_t last = logits_.shape()[0] - 1;
    const auto* row = static_cast<const std::byte*>(logits_.data()) +
                      static_cast<size_t>(last * setup_.vocab) * dtype_size(logits_.dtype());
    return sampler_.next_token(row, logits_.dtype(), params, u, stream_.get());
  }

  void step(const StepPlan& plan, SuperLinkRouter&) override {
    if (!plan.feed) throw std::invalid_argument("step: the plan for token " + std::to_string(plan.token) + " feeds no rows");
    if (plan.token < 0 || plan.token >= setup_.vocab) {
      throw std::invalid_argument("token = " + std::to_string(plan.token) + " is outside the token table's " +
                                  std::to_string(setup_.vocab) + " rows");
    }
    // [E(token); Q_kind], as SuperLinkRouter::step_embeddings, from the device tables.
    step_sources_.assign(1, token_table_.data_as<float>() + plan.token * setup_.hidden);
    if (plan.query_table) {
      const Tensor& q = query_tables_.at(plan.kind);
      for (int64_t i = 0; i < q.shape()[0]; ++i) step_sources_.push_back(q.data_as<float>() + i * setup_.hidden);
    }
    if (static_cast<int64_t>(step_sources_.size()) != plan.rows) {
      throw std::invalid_argument("step: the plan feeds " + std::to_string(plan.rows) + " rows, its token and " +
                                  "query table give " + std::to_string(step_sources_.size()));
    }
    gather_rows(step_sources_, setup_.hidden, embeds_.reserve(plan.rows * setup_.hidden), setup_.embed_dtype,
                gather_, stream_.get());
    fill_iota(static_cast<int64_t*>(positions_.reserve(plan.rows)), setup_.arena->length(), plan.rows, stream_.get());
    const auto num_rows = static_cast<int64_t>(plan.output_rows.size());
    bool contiguous = true;
    for (size_t i = 1; i < plan.output_rows.size(); ++i) {
      contiguous = contiguous && plan.output_rows[i] == plan.output_rows[0] + static_cast<int64_t>(i);
    }
    auto* rows = static_cast<int64_t*>(rows_.reserve(num_rows));
    if (contiguous && num_rows > 0) {
      fill_iota(rows, plan.output_rows[0], num_rows, stream_.get());  // nothing to upload
    } else {
      copy_to_device_async(rows, plan.output_rows.data(), plan.output_rows.size() * sizeof(int64_t), stream_.get());
    }
    const Tensor hidden = run(plan.rows, num_rows);
    if (plan.route >= 0) keep_link(plan, hidden);
  }

  void finish_decode(SuperLinkRouter& router) override {
    if (pending_.empty()) return;
    std::vector<float> host(static_cast<size_t>(link_rows_ * setup_.hidden));
    copy_to_host_async(host.data(), links_.data(), host.size() * sizeof(float), stream_.get());
    stream_.synchronize();
    for (const auto& [plan, offset] : pending_) {
      router.observe(plan, {host.data() + offset * setup_.hidden, {plan.num_queries, setup_.hidden}});
    }
    pending_.clear();
    link_rows_ = 0;
  }

 private:
  FloatArrayRef upload_rows(const FloatArrayRef& rows, Scratch& buffer) {
    require_matrix(rows, "rows", setup_.hidden);
    const int64_t n = rows.shape[0] * rows.shape[1];
    auto* device = static_cast<float*>(buffer.reserve(n));
    copy_to_device_async(device, rows.data, static_cast<size_t>(n) * sizeof(float), stream_.get());
    return {device, rows.shape};
  }

  // The inputs were written on our stream; the engine runs on its own, so they must be complete first. Its
  // outputs are ready when it returns.
  Tensor run(int64_t s, int64_t num_output_rows) {
    stream_.synchronize();
    std::vector<Tensor> out =
        run_step(embeds_.data(), positions_.data(), rows_.data(), s, num_output_rows, MemoryKind::kDevice);
    if (out[0].memory() != MemoryKind::kDevice || out[1].memory() != MemoryKind::kDevice) {
      throw EngineError("llm: the engine returned host outputs for a device fetch");
    }
    logits_ = std::move(out[0]);
    return std::move(out[1]);
  }

  // Appends a routing step's N query rows (its whole output, float32 or float16) to the device link buffer.
  void keep_link(const StepPlan& plan, const Tensor& hidden) {
    const int64_t n = plan.num_queries;
    if (hidden.shape() != std::vector<int64_t>{n, setup_.hidden}) {
      throw EngineError("llm: a routing step's hidden output must be " + shape_text({n, setup_.hidden}) + ", got " +
                        shape_text(hidden.shape()));
    }
    const int64_t needed = (link_rows_ + n) * setup_.hidden;
    if (links_.data() == nullptr || needed > link_capacity_) {
      // Grows by doubling, keeping the rows already gathered.
      const int64_t capacity = std::max(needed, 2 * link_capacity_);
      Scratch grown(DType::kFloat32, setup_.device_id);
      void* to = grown.reserve(capacity);
      if (link_rows_ > 0) {
        copy_on_device_async(to, links_.data(), static_cast<size_t>(link_rows_ * setup_.hidden) * sizeof(float),
                             stream_.get());
        stream_.synchronize();
      }
      links_ = std::move(grown);
      link_capacity_ = capacity;
    }
    float* at = static_cast<float*>(links_.data()) + link_rows_ * setup_.hidden;
    if (hidden.dtype() == DType::kFloat16) {
      half_to_float(hidden.data_as<uint16_t>(), at, n * setup_.hidden, stream_.get());
    } else {
      copy_on_device_async(at, hidden.data(), static_cast<size_t>(n * setup_.hidden) * sizeof(float), stream_.get());
    }
    // `hidden` is freed when this returns: its rows must be copied out first.
    stream_.synchronize();
    pending_.emplace_back(plan, link_rows_);
    link_rows_ += n;
  }

  CurrentDevice device_;
  Stream stream_;
  GatherScratch gather_;
  Scratch embeds_, positions_, rows_, image_rows_, region_rows_, links_;
  int64_t link_capacity_ = 0, link_rows_ = 0;
  std::vector<std::pair<StepPlan, int64_t>> pending_;  // routing steps and their first row in links_
  Tensor token_table_;
  std::map<std::string, Tensor> query_tables_;
  std::vector<const float*> step_sources_;
  DeviceSampler sampler_;
  Tensor logits_;  // the last step's [rows, V], device
};

}  // namespace

std::unique_ptr<LlmState> make_device_llm(const LlmSetup& setup) { return std::make_unique<DeviceLlm>(setup); }

}  // namespace cuda
}  // namespace vle
