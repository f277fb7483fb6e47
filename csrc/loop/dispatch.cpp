// Dispatch of the answer's super-link groups: the object decoder, the keypoint decoder, and for [GEN] /
// [EDIT] the mapper, the DDIM loop with guidance and the VAE; then post-processing into the Result.
//
// Timings: "link" is the super-link hand-off (grouping the links per decoder and building each decoder's
// query inputs from them; the decode loop adds the device path's copy of the link rows), each decoder's
// stage its graph calls, and "denoise" the DDIM loop alone, inside the gen_decoder / edit_decoder stage
// (which also holds the mapper and the VAE).
#include "loop/pipeline_impl.h"
#include "loop/summary.h"

namespace vle {

using namespace loop;

namespace {

// Standard normal float32 noise from a seed: Box-Muller on the same generator and uniform draw as the
// sampler, so one seed gives the same latents on every platform and in every front end.
std::vector<float> seeded_normal(uint64_t seed, int64_t count) {
  Sampler rng(seed);
  std::vector<float> out(static_cast<size_t>(count));
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  for (int64_t i = 0; i < count; i += 2) {
    double u1 = rng.uniform();
    const double u2 = rng.uniform();
    if (u1 <= 0.0) u1 = 0x1.0p-53;
    const double radius = std::sqrt(-2.0 * std::log(u1));
    out[static_cast<size_t>(i)] = static_cast<float>(radius * std::cos(kTwoPi * u2));
    if (i + 1 < count) out[static_cast<size_t>(i + 1)] = static_cast<float>(radius * std::sin(kTwoPi * u2));
  }
  return out;
}

// A float32 array that crosses into post-processing or out to the caller: NaN or inf in a logit, a box, a
// keypoint or a pixel would still become a plausible-looking result, so it is an EngineError naming the
// graph's output (or the caller's input, as an InputError). Logits may hold -inf: the decoders mask the
// class slots a request does not use that way.
enum class Source { kGraph, kGraphLogits, kCaller };
void require_finite(const Array& a, const std::string& what, Source source = Source::kGraph) {
  if (a.type != Array::Type::kFloat32) return;
  const auto* data = static_cast<const float*>(a.data.get());
  if (const auto bad = first_non_finite(data, a.numel(), source == Source::kGraphLogits)) {
    const std::string message = what + " is not finite: " + non_finite_text(data, *bad, a.numel());
    if (source == Source::kCaller) throw InputError(message);
    throw EngineError(message);
  }
}

// The decoders' image, before graph `g` runs on it. When the caller prepared it (RunOptions::det_input), NaN
// or inf pixels make the object decoder's top-k gather out of range (an ONNX Runtime error naming a
// GatherElements node) or answer with plausible boxes, so they are refused by name, as a caller's noise is.
// Any image, ours or the caller's: the two-stage top-k takes facts.min_encoder_tokens of the encoder's tokens,
// and a small or elongated picture pads to fewer (3 x 32 pixels gives 108 of tiny-random's 120), where ONNX
// Runtime fails at the TopK node. Tokens are counted as export/onnx/decoders.py's encoder_tokens counts them:
// levels 0-2 at strides 8, 16, 32, each further level the previous one halved, rounding up.
void check_decoder_image(const GraphEntry& g, const DetectionInput& det, const RunOptions& o) {
  if (o.det_input) require_finite(det.pixel_values, "det_image['pixel_values']", Source::kCaller);
  const int64_t need = fact_int(g, "min_encoder_tokens", 0), levels = fact_int(g, "num_feature_levels", 0);
  const std::vector<int64_t>& shape = det.pixel_values.shape;
  if (need <= 0 || levels <= 0 || shape.size() != 4) return;  // a wrong shape is the engine's to name
  int64_t tokens = 0, h = 0, w = 0;
  for (int64_t level = 0; level < levels; ++level) {
    if (level < 3) {
      const int64_t stride = int64_t{8} << level;
      h = (shape[2] + stride - 1) / stride;
      w = (shape[3] + stride - 1) / stride;
    } else {
      h = (h + 1) / 2;
      w = (w + 1) / 2;
    }
    tokens += h * w;
  }
  if (tokens < need) {
    throw InputError(g.name + ": the decoder's image of " + std::to_string(shape[3]) + "x" +
                     std::to_string(shape[2]) + " pixels gives " + std::to_string(tokens) +
                     " encoder tokens, fewer than the " + std::to_string(need) +
                     " its top-k takes (facts.min_encoder_tokens): the picture is too small or too elongated");
  }
}

}  // namespace

// --- decoders -------------------------------------------------------------------------------------------------

void Pipeline::Impl::dispatch(Frame& f, const std::map<int64_t, std::string>& labels,
                              const std::vector<LinkGroup>& history, const RunOptions& o, Result& result) {
  auto label_of = [&](int64_t position) {
    const auto it = labels.find(position);
    return it == labels.end() ? std::string() : it->second;
  };
  // Every decoder below takes groups of this answer: without links there is nothing to hand off.
  if (router->links().empty()) return;
  const Postprocess& post = manifest.postprocess;
  if (decoders.count(kObjectDecoder)) {
    std::vector<DecoderGroup> groups;
    {
      StageTimer t(result, "link");
      groups = router->groups_for(kObjectDecoder).at(0).second;
    }
    if (!groups.empty()) {
      const DetectionInput& det = frame_detection_input(f, o);
      const GraphEntry& g = graph(contract::graph::kDet);
      check_decoder_image(g, det, o);
      const int64_t max_groups = fact_int(g, "max_groups", fact_int(g, "max_text_len", 256));
      const int64_t num_queries = fact_int(g, "num_queries");
      // One decoder call per max_groups groups: its text query [1, k, nq, H] and query mask [1, k].
      struct Call {
        int64_t k = 0, nq = 0;
        std::vector<float> query;
        std::vector<uint8_t> query_mask;
      };
      std::vector<Call> calls;
      {
        StageTimer t(result, "link");
        for (size_t begin = 0; begin < groups.size(); begin += static_cast<size_t>(max_groups)) {
          const size_t end = std::min(groups.size(), begin + static_cast<size_t>(max_groups));
          Call c;
          c.k = static_cast<int64_t>(end - begin);
          c.nq = groups[begin].link.num_queries;
          for (size_t i = begin; i < end; ++i) {
            c.query.insert(c.query.end(), groups[i].link.states->begin(), groups[i].link.states->end());
          }
          c.query_mask.assign(static_cast<size_t>(c.k), 1);
          calls.push_back(std::move(c));
        }
      }
      std::vector<Array> logits, boxes, masks;
      {
        StageTimer t(result, "object_decoder");
        std::vector<int64_t> query_index(static_cast<size_t>(num_queries));
        for (int64_t i = 0; i < num_queries; ++i) query_index[static_cast<size_t>(i)] = i;
        for (Call& c : calls) {
          auto out = engine(contract::graph::kDet)
                         .run({{contract::io::kPixelValues, {DType::kFloat32, det.pixel_values.shape, det.pixel_values.data.get()}},
                               {contract::io::kPixelMask, {DType::kBool, det.pixel_mask.shape, det.pixel_mask.data.get()}},
                               {contract::io::kTextQuery, {DType::kFloat32, {1, c.k, c.nq, hidden}, c.query.data()}},
                               {contract::io::kTextQueryMask, {DType::kBool, {1, c.k}, c.query_mask.data()}},
                               {contract::io::kMaskQueryIndex, {DType::kInt64, {1, num_queries}, query_index.data()}}},
                              {}, {contract::io::kLogits, contract::io::kPredBoxes, contract::io::kPredMasks});
          logits.push_back(to_array(out[0]));
          boxes.push_back(to_array(out[1]));
          masks.push_back(to_array(out[2]));
        }
      }
      // One chunk per decoder call, stacked: [chunks, ...] without the batch axis.
      auto stack = [](const std::vector<Array>& parts) {
        std::vector<int64_t> shape = parts[0].shape;
        shape[0] = static_cast<int64_t>(parts.size());
        Array out = Array::make(parts[0].type, shape);
        size_t offset = 0;
        for (const Array& a : parts) {
          if (a.shape != parts[0].shape) throw EngineError("det: decoder calls returned different shapes");
          std::memcpy(static_cast<char*>(out.data.get()) + offset, a.data.get(), a.bytes());
          offset += a.bytes();
        }
        return out;
      };
      Array all_logits = stack(logits), all_boxes = stack(boxes), all_masks = stack(masks);
      require_finite(all_logits, "graph 'det' output 'logits'", Source::kGraphLogits);
      require_finite(all_boxes, "graph 'det' output 'pred_boxes'");
      require_finite(all_masks, "graph 'det' output 'pred_masks'");
      result.decoders[kObjectDecoder] = {{contract::io::kLogits, all_logits}, {contract::io::kPredBoxes, all_boxes},
                                         {contract::io::kPredMasks, all_masks}};
      std::vector<ObjectGroup> object_groups;
      for (const DecoderGroup& dg : groups) object_groups.push_back({dg.link.kind, label_of(dg.link.position), dg.index});
      StageTimer t(result, "postprocess");
      object_results(all_logits, all_boxes, all_masks, object_groups, max_groups, det.resized_hw, f.width, f.height,
                     post, result);
    }
  }
  if (decoders.count(kPoseDecoder)) {
    DecoderGroups pose_groups;
    {
      StageTimer t(result, "link");
      pose_groups = router->groups_for(kPoseDecoder);
    }
    std::vector<const LinkGroup*> objects;
    for (const DecoderGroup& g : pose_groups.at(0).second) objects.push_back(&g.link);
    if (objects.empty()) {
      for (const LinkGroup& g : history) objects.push_back(&g);
    }
    const std::vector<DecoderGroup>& keypoints = pose_groups.at(1).second;
    if (!keypoints.empty() && !objects.empty()) {
      const GraphEntry& g = graph(contract::graph::kPose);
      const int64_t max_keypoints = fact_int(g, "max_keypoints", 68);
      constexpr int64_t kSlots = 100;
      if (static_cast<int64_t>(objects.size()) > kSlots || static_cast<int64_t>(keypoints.size()) > max_keypoints) {
        throw InputError("the keypoint decoder takes at most 100 object and " + std::to_string(max_keypoints) +
                         " keypoint groups, got " + std::to_string(objects.size()) + " and " +
                         std::to_string(keypoints.size()));
      }
      const int64_t nq = keypoints[0].link.num_queries;
      const size_t group = static_cast<size_t>(nq * hidden);
      std::vector<float> obj, kpt;
      std::vector<uint8_t> om(kSlots, 0), km(kSlots, 0);
      {
        StageTimer t(result, "link");
        obj.assign(static_cast<size_t>(kSlots) * group, 0.f);
        kpt.assign(static_cast<size_t>(kSlots) * group, 0.f);
        for (size_t i = 0; i < objects.size(); ++i) {
          const std::vector<float>& states = *objects[i]->states;
          if (states.size() != group) throw InputError("pose: an object group has the wrong number of states");
          std::copy(states.begin(), states.end(), obj.begin() + i * group);
          om[i] = 1;
        }
        for (size_t i = 0; i < keypoints.size(); ++i) {
          std::copy(keypoints[i].link.states->begin(), keypoints[i].link.states->end(), kpt.begin() + i * group);
          km[i] = 1;
        }
      }
      const DetectionInput& det = frame_detection_input(f, o);
      check_decoder_image(graph(contract::graph::kPose), det, o);
      std::vector<Tensor> out;
      {
        StageTimer t(result, "pose_decoder");
        out = engine(contract::graph::kPose)
                  .run({{contract::io::kPixelValues, {DType::kFloat32, det.pixel_values.shape, det.pixel_values.data.get()}},
                        {contract::io::kPixelMask, {DType::kBool, det.pixel_mask.shape, det.pixel_mask.data.get()}},
                        {contract::io::kObjectQuery, {DType::kFloat32, {1, kSlots, nq, hidden}, obj.data()}},
                        {contract::io::kObjectQueryMask, {DType::kBool, {1, kSlots}, om.data()}},
                        {contract::io::kKeypointQuery, {DType::kFloat32, {1, kSlots, nq, hidden}, kpt.data()}},
                        {contract::io::kKeypointQueryMask, {DType::kBool, {1, kSlots}, km.data()}}},
                       {}, {contract::io::kPredLogits, contract::io::kPredBoxes, contract::io::kPredKeypoints});
      }
      Array pl = to_array(out[0]), pb = to_array(out[1]), pk = to_array(out[2]);
      require_finite(pl, "graph 'pose' output 'pred_logits'", Source::kGraphLogits);
      require_finite(pb, "graph 'pose' output 'pred_boxes'");
      require_finite(pk, "graph 'pose' output 'pred_keypoints'");
      result.decoders[kPoseDecoder] = {{contract::io::kPredLogits, pl}, {contract::io::kPredBoxes, pb},
                                       {contract::io::kPredKeypoints, pk}};
      std::vector<std::string> object_labels, keypoint_names;
      for (const LinkGroup* g : objects) object_labels.push_back(label_of(g->position));
      for (const DecoderGroup& k : keypoints) keypoint_names.push_back(label_of(k.link.position));
      StageTimer t(result, "postprocess");
      pose_results(pl, pb, pk, object_labels, keypoint_names, {det.pixel_values.shape[2], det.pixel_values.shape[3]},
                   det.resized_hw, f.width, f.height, post, result);
    }
  }
  std::vector<double> step_ms;  // every UNet step of the request, [GEN] and [EDIT] alike
  for (const std::string& kind : contract::generation_kinds()) {
    if (!decoders.count(kind)) continue;
    std::vector<DecoderGroup> groups;
    std::vector<float> states;  // the mapper's input [n, nq, H]
    {
      StageTimer t(result, "link");
      groups = router->groups_for(kind).at(0).second;
      for (const DecoderGroup& g : groups) states.insert(states.end(), g.link.states->begin(), g.link.states->end());
    }
    if (groups.empty()) continue;
    StageTimer t(result, kind + "_decoder");
    diffusion(kind, groups, states, f, o, result, step_ms);
  }
  if (!step_ms.empty()) {
    const Summary steps = summarize(step_ms);
    result.stats["diffusion_steps"] = static_cast<double>(steps.n);
    result.stats["diffusion_step_ms_min"] = steps.min;
    result.stats["diffusion_step_ms_median"] = steps.median;
    result.stats["diffusion_step_ms_max"] = steps.max;
  }
}

void Pipeline::Impl::diffusion(const std::string& kind, const std::vector<DecoderGroup>& groups,
                               const std::vector<float>& states, const Frame& f, const RunOptions& o, Result& result,
                               std::vector<double>& step_ms) {
  const int64_t n = static_cast<int64_t>(groups.size());
  const int64_t nq = groups[0].link.num_queries;
  const std::string mapper = kind + contract::graph::kMapperSuffix;
  float* link_states = const_cast<float*>(states.data());  // an input: the engine only reads it
  auto mapped = engine(mapper).run({{contract::io::kLinkStates, {DType::kFloat32, {n, nq, hidden}, link_states}}}, {},
                                   {contract::io::kConditioning});
  Array cond = to_array(mapped[0]);
  auto& raw = result.decoders[kind];
  raw[contract::io::kConditioning] = cond;
  if (!o.decode_images) return;

  const std::string unet_name = kind + contract::graph::kUnetSuffix;
  const GraphEntry& unet_graph = graph(unet_name);
  const int64_t latent = fact_int(unet_graph, "latent_size");
  const auto uncond_ref = manifest.extra_files.find(kind + "_uncond");
  if (uncond_ref == manifest.extra_files.end()) {
    throw ArtifactError(manifest.manifest_file.string() + ": extra_files." + kind + "_uncond: missing (needed by [" +
                        kind + "])");
  }
  std::string uncond_name = contract::kUncondTensor;
  if (const auto it = unet_graph.facts.find("uncond_tensor"); it != unet_graph.facts.end() && it->is_string()) {
    uncond_name = it->get<std::string>();
  }
  const FileRef& uncond_file = uncond_ref->second;
  // Read at its first request, long after the manifest was: hashed again now, as the graphs are.
  if (options.verify_hashes && file_sha256(uncond_file.path) != uncond_file.sha256) {
    throw ArtifactError(manifest.manifest_file.string() + ": extra_files." + kind + "_uncond.sha256: " +
                        uncond_file.file + ": sha256 mismatch when it was read (the file changed after the "
                        "artifact was loaded)");
  }
  const Tensor uncond = SafetensorsFile(uncond_file.path).to_float32(uncond_name);
  if (const auto bad = first_non_finite(uncond.data_as<float>(), uncond.numel())) {
    throw ArtifactError(uncond_file.path.string() + ": tensor '" + uncond_name + "' is not finite: " +
                        non_finite_text(uncond.data_as<float>(), *bad, uncond.numel()));
  }

  const std::vector<int64_t> noise_shape = {n, 4, latent, latent};
  Array noise;
  if (o.noise) {
    if (o.noise->shape != noise_shape || o.noise->type != Array::Type::kFloat32) {
      throw InputError("noise: expected float32 of shape " + shape_text(noise_shape) + ", got " +
                       shape_text(o.noise->shape));
    }
    noise = *o.noise;
    require_finite(noise, "noise", Source::kCaller);
  } else {
    const std::vector<float> drawn = seeded_normal(o.seed, element_count(noise_shape));
    noise = float_array(drawn.data(), noise_shape);
  }
  std::vector<float> image_latents;
  if (kind == "edit") {
    if (f.image.empty()) throw InputError("[EDIT] needs an input image");
    const int64_t size = fact_int(unet_graph, "image_size");
    std::vector<uint8_t> resized(static_cast<size_t>(size * size * 3));
    resize_rgb(image_view(f.image), size, size, ResampleFilter::kBicubic, resized.data());
    std::vector<float> chw(static_cast<size_t>(3 * size * size));
    for (int64_t c = 0; c < 3; ++c) {
      for (int64_t i = 0; i < size * size; ++i) chw[static_cast<size_t>(c * size * size + i)] = resized[static_cast<size_t>(i * 3 + c)] / 255.0f;
    }
    auto enc = engine(kind + contract::graph::kVaeEncoderSuffix)
                   .run({{contract::io::kImages, {DType::kFloat32, {1, 3, size, size}, chw.data()}}}, {}, {contract::io::kLatents});
    const Tensor one = to_float(enc[0]);
    for (int64_t i = 0; i < n; ++i) image_latents.insert(image_latents.end(), one.data_as<float>(), one.data_as<float>() + one.numel());
  }
  Engine& unet = engine(unet_name);
  const UNetFn unet_fn = [&unet, &o](const TensorView& sample, const TensorView& timestep, const TensorView& context,
                                     const TensorView& noise_pred) {
    interruption_point(o, "in the denoising loop");
    unet.run({{contract::io::kSample, sample}, {contract::io::kTimestep, timestep},
              {contract::io::kEncoderHiddenStates, context}},
             {{contract::io::kNoisePred, noise_pred}}, {});
  };
  const auto scheduler = unet_graph.facts.find("scheduler");
  if (scheduler == unet_graph.facts.end()) {
    throw ArtifactError(manifest.manifest_file.string() + ": graphs." + unet_name + ".facts.scheduler: missing");
  }
  const DDIMConfig config = DDIMConfig::from_facts(*scheduler);
  std::optional<TensorView> image_view_latents;
  if (!image_latents.empty()) image_view_latents = TensorView{DType::kFloat32, noise_shape, image_latents.data()};
  Tensor latents;
  {
    StageTimer t(result, "denoise");
    latents = denoise(unet_fn, {DType::kFloat32, cond.shape, cond.data.get()}, uncond.view(),
                      {DType::kFloat32, noise_shape, noise.data.get()}, manifest.generation.diffusion_steps,
                      manifest.generation.guidance_scale, image_view_latents, manifest.generation.image_guidance_scale,
                      config, &step_ms);
  }
  auto decoded = engine(kind + contract::graph::kVaeDecoderSuffix)
                     .run({{contract::io::kLatents, latents.view()}}, {},
                          {contract::io::kImages});
  Array images = to_array(decoded[0]);
  require_finite(images, "graph '" + kind + contract::graph::kVaeDecoderSuffix + "' output 'images'");
  raw["noise"] = noise;  // the initial latents (not a graph tensor)
  raw[contract::io::kLatents] = to_array(latents);
  raw[contract::io::kImages] = images;
  for (Array& im : images_to_uint8(images)) result.images.push_back(std::move(im));
}

}  // namespace vle
