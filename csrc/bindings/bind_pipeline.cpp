// Bindings of the public C++ API (visionllm_edge/pipeline.h): conversion and GIL release only. The Python
// `visionllm_edge.Pipeline` wraps these; every request runs in C++ with the GIL released (a streaming
// callback takes it back for each piece). Arrays go out as numpy views that keep the C++ buffer alive.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "bindings/bind_registry.h"
#include "visionllm_edge/pipeline.h"

namespace py = pybind11;

namespace {

py::dtype dtype_of(vle::Array::Type type) {
  switch (type) {
    case vle::Array::Type::kFloat32: return py::dtype::of<float>();
    case vle::Array::Type::kInt32: return py::dtype::of<int32_t>();
    case vle::Array::Type::kInt64: return py::dtype::of<int64_t>();
    case vle::Array::Type::kUInt8: return py::dtype::of<uint8_t>();
    case vle::Array::Type::kBool: return py::dtype::of<bool>();
  }
  throw std::logic_error("unknown array type");
}

// A numpy view of a result array; the capsule keeps the shared buffer alive.
py::object to_numpy(const vle::Array& a) {
  if (a.empty()) return py::none();
  auto* owner = new std::shared_ptr<void>(a.data);
  py::capsule capsule(owner, [](void* p) { delete static_cast<std::shared_ptr<void>*>(p); });
  return py::array(dtype_of(a.type), a.shape, a.data.get(), capsule);
}

// A C-contiguous numpy array of `dtype` as a result array (copied: requests keep their inputs).
vle::Array from_numpy(const py::handle& obj, vle::Array::Type type, const std::string& name) {
  const py::dtype want = dtype_of(type);
  if (!py::isinstance<py::array>(obj)) throw py::type_error(name + " must be a numpy array");
  const auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!arr.dtype().equal(want)) {
    throw py::type_error(name + " must be " + std::string(py::str(want)) + ", got " + std::string(py::str(arr.dtype())));
  }
  const auto c = py::array::ensure(arr, py::array::c_style);
  std::vector<int64_t> shape(c.shape(), c.shape() + c.ndim());
  vle::Array out = vle::Array::make(type, shape);
  std::memcpy(out.data.get(), c.data(), out.bytes());
  return out;
}

// An H x W x 3 uint8 C-contiguous array as a borrowed image (the caller holds the array for the call).
vle::Image image_of(const py::object& obj) {
  if (obj.is_none()) return vle::Image();
  if (!py::isinstance<py::array_t<uint8_t>>(obj)) throw py::type_error("image must be an H x W x 3 uint8 array");
  const auto arr = py::reinterpret_borrow<py::array>(obj);
  if (arr.ndim() != 3 || arr.shape(2) != 3 || !(arr.flags() & py::array::c_style) || !arr.dtype().equal(py::dtype::of<uint8_t>())) {
    throw py::value_error("image must be a C-contiguous H x W x 3 uint8 array");
  }
  return vle::Image::view(static_cast<const uint8_t*>(arr.data()), arr.shape(1), arr.shape(0));
}

// ("box", [x0, y0, x1, y1]) / ("point", [x, y]) / ("mask", H x W bool) / ("thumbnail", S x S bool).
vle::Region region_of(const py::handle& item) {
  const auto pair = item.cast<py::tuple>();
  const std::string kind = pair[0].cast<std::string>();
  if (kind == "box" || kind == "point") {
    const auto c = pair[1].cast<std::vector<float>>();
    vle::Region r;
    r.kind = kind == "box" ? vle::Region::Kind::kBox : vle::Region::Kind::kPoint;
    r.coords = c;
    return r;
  }
  const auto arr = py::array::ensure(pair[1], py::array::c_style);
  if (!arr || arr.ndim() != 2 || !arr.dtype().equal(py::dtype::of<bool>())) {
    throw py::value_error("region masks must be 2-D bool arrays");
  }
  vle::Region r;
  r.kind = kind == "mask" ? vle::Region::Kind::kMask : vle::Region::Kind::kThumbnailMask;
  r.mask.assign(static_cast<const uint8_t*>(arr.data()), static_cast<const uint8_t*>(arr.data()) + arr.size());
  r.mask_height = arr.shape(0);
  r.mask_width = arr.shape(1);
  return r;
}

// `value` as T, or a TypeError naming the option, the type wanted and the value given (pybind11's own cast
// error names neither: "Unable to cast Python instance of type <class 'str'> to C++ type '?'").
template <typename T>
T option(const py::handle& value, const std::string& key, const char* wanted) {
  try {
    return value.cast<T>();
  } catch (const py::cast_error&) {
    const std::string shown = py::repr(value).cast<std::string>();
    // Cut at a character's first byte: a cut inside a multi-byte character makes the message invalid UTF-8,
    // and Python then raises UnicodeDecodeError in place of this TypeError.
    size_t cut = std::min<size_t>(shown.size(), 80);
    while (cut > 0 && cut < shown.size() && (static_cast<unsigned char>(shown[cut]) & 0xC0) == 0x80) --cut;
    throw py::type_error("request option '" + key + "' must be " + wanted + ", got " +
                         std::string(py::str(py::type::of(value).attr("__name__"))) + " " +
                         (cut < shown.size() ? shown.substr(0, cut) + "..." : shown));
  }
}

vle::RunOptions options_of(const py::dict& kw) {
  vle::RunOptions o;
  for (const auto& [key_obj, value] : kw) {
    const std::string key = py::str(key_obj);
    if (value.is_none()) continue;
    if (key == "regions") {
      for (const auto& r : value) o.regions.push_back(region_of(r));
    } else if (key == "history") {
      o.history = option<std::vector<std::pair<std::string, std::string>>>(value, key, "a list of (user, assistant) str pairs");
    } else if (key == "answer_prefix") {
      o.answer_prefix = option<std::string>(value, key, "a str");
    } else if (key == "answer") {
      o.answer = option<std::string>(value, key, "a str");
    } else if (key == "instruction") {
      o.instruction = option<std::string>(value, key, "a str");
    } else if (key == "max_new_tokens") {
      o.max_new_tokens = option<int64_t>(value, key, "an int that fits int64");
    } else if (key == "do_sample") {
      o.do_sample = option<bool>(value, key, "a bool");
    } else if (key == "temperature") {
      o.temperature = option<double>(value, key, "a float");
    } else if (key == "top_k") {
      o.top_k = option<int64_t>(value, key, "an int that fits int64");
    } else if (key == "top_p") {
      o.top_p = option<double>(value, key, "a float");
    } else if (key == "repetition_penalty") {
      o.repetition_penalty = option<double>(value, key, "a float");
    } else if (key == "seed") {
      o.seed = option<uint64_t>(value, key, "an int in [0, 2**64)");
    } else if (key == "noise") {
      o.noise = from_numpy(value, vle::Array::Type::kFloat32, "noise");
    } else if (key == "decode_images") {
      o.decode_images = option<bool>(value, key, "a bool");
    } else if (key == "det_input") {
      const auto t = value.cast<py::tuple>();
      vle::DetectionInput d;
      d.pixel_values = from_numpy(t[0], vle::Array::Type::kFloat32, "det_image['pixel_values']");
      d.pixel_mask = from_numpy(t[1], vle::Array::Type::kBool, "det_image['pixel_mask']");
      d.resized_hw = t[2].cast<std::pair<int64_t, int64_t>>();
      o.det_input = std::move(d);
    } else if (key == "det_image") {
      const vle::Image view = image_of(py::reinterpret_borrow<py::object>(value));
      o.det_image = vle::Image::rgb(view.data(), view.width(), view.height());
    } else {
      throw py::type_error("unknown request option '" + key + "'");
    }
  }
  return o;
}

py::dict result_dict(const vle::Result& r) {
  py::dict d;
  d["text"] = r.text;
  d["token_ids"] = r.token_ids;
  d["stop_reason"] = r.stop_reason;
  py::list links;
  for (const auto& l : r.links) links.append(py::make_tuple(l.kind, l.label, l.position, to_numpy(l.states)));
  d["links"] = links;
  py::list dets;
  for (const auto& x : r.detections) {
    dets.append(py::make_tuple(x.label, x.kind, x.score, py::make_tuple(x.box_xyxy[0], x.box_xyxy[1], x.box_xyxy[2], x.box_xyxy[3]),
                               to_numpy(x.mask), x.query_index));
  }
  d["detections"] = dets;
  d["segmentation"] = r.has_segmentation ? py::object(py::make_tuple(to_numpy(r.segmentation.label_map), r.segmentation.labels))
                                         : py::object(py::none());
  py::list poses;
  for (const auto& p : r.poses) {
    poses.append(py::make_tuple(p.label, p.score, py::make_tuple(p.box_xyxy[0], p.box_xyxy[1], p.box_xyxy[2], p.box_xyxy[3]),
                                to_numpy(p.keypoints), p.keypoint_names, p.query_index));
  }
  d["poses"] = poses;
  py::list images;
  for (const auto& im : r.images) images.append(to_numpy(im));
  d["images"] = images;
  py::dict timings;
  for (const auto& [stage, ms] : r.timings_ms) timings[py::str(stage)] = ms;
  d["timings"] = timings;
  py::dict decoders;
  for (const auto& [decoder, tensors] : r.decoders) {
    py::dict t;
    for (const auto& [name, a] : tensors) t[py::str(name)] = to_numpy(a);
    decoders[py::str(decoder)] = t;
  }
  d["decoders"] = decoders;
  d["input_ids"] = py::array_t<int64_t>(static_cast<py::ssize_t>(r.input_ids.size()), r.input_ids.data());
  d["stats"] = r.stats;
  return d;
}

// On Python's main thread, the request polls Python's signal handlers (about every 20 ms, taking the GIL only
// then) so that Ctrl-C interrupts it between steps: the handler's exception (KeyboardInterrupt) stays set and
// `interruptible` raises it once the request has unwound. Other threads get no signals from Python, so
// nothing is polled there.
void poll_python_signals(vle::RunOptions& o) {
  const py::module_ threading = py::module_::import("threading");
  if (!threading.attr("current_thread")().is(threading.attr("main_thread")())) return;
  auto last = std::make_shared<std::chrono::steady_clock::time_point>(std::chrono::steady_clock::now());
  o.interrupted = [last] {
    const auto now = std::chrono::steady_clock::now();
    if (now - *last < std::chrono::milliseconds(20)) return false;
    *last = now;
    py::gil_scoped_acquire gil;
    return PyErr_CheckSignals() != 0;
  };
}

// Runs `request` with the GIL released; an interruption raised by a Python signal handler re-raises that
// handler's exception instead of the InterruptedError.
template <typename F>
vle::Result interruptible(F&& request) {
  try {
    py::gil_scoped_release release;
    return request();
  } catch (const vle::InterruptedError&) {
    if (PyErr_Occurred()) throw py::error_already_set();
    throw;
  }
}

// A streaming callback that takes the GIL for each piece.
vle::TextCallback text_callback(const py::object& fn) {
  if (fn.is_none()) return nullptr;
  auto holder = std::make_shared<py::object>(fn);
  return [holder](std::string_view piece) {
    py::gil_scoped_acquire gil;
    (*holder)(py::str(piece.data(), piece.size()));
  };
}

void bind_pipeline(py::module_& m) {
  py::class_<vle::Chat>(m, "Chat", "A conversation about one image (visionllm_edge/pipeline.h).")
      .def(
          "ask",
          [](vle::Chat& c, const std::string& prompt, const py::dict& options, const py::object& on_text) {
            vle::RunOptions o = options_of(options);
            poll_python_signals(o);
            const vle::TextCallback cb = text_callback(on_text);
            return result_dict(interruptible([&] { return c.ask(prompt, o, cb); }));
          },
          py::arg("prompt"), py::arg("options"), py::arg("on_text") = py::none())
      .def_property_readonly("history", &vle::Chat::history);
  py::class_<vle::Pipeline>(m, "Pipeline", "The C++ request loop over one artifact folder (visionllm_edge/pipeline.h).")
      .def_static(
          "load",
          [](const std::string& dir, const std::string& backend, const std::vector<std::string>& providers,
             const std::map<std::string, std::map<std::string, std::string>>& provider_options, int threads,
             int64_t max_context, const std::vector<std::string>& components, bool verify_hashes,
             const std::string& onnxruntime_library, const std::map<std::string, double>& postprocess, bool fp16,
             const std::string& engine_cache, int device_id, const std::string& profile_dir) {
            vle::LoadOptions o;
            o.profile_dir = profile_dir;
            o.fp16 = fp16;
            o.engine_cache = engine_cache;
            o.device_id = device_id;
            o.backend = backend;
            o.providers = providers;
            o.provider_options = provider_options;
            o.threads = threads;
            o.max_context = max_context;
            o.components = components;
            o.verify_hashes = verify_hashes;
            o.onnxruntime_library = onnxruntime_library;
            o.postprocess = postprocess;
            py::gil_scoped_release release;
            return vle::Pipeline::load(dir, o);
          },
          py::arg("artifact_dir"), py::arg("backend"), py::arg("providers"), py::arg("provider_options"),
          py::arg("threads"), py::arg("max_context"), py::arg("components"), py::arg("verify_hashes"),
          py::arg("onnxruntime_library"), py::arg("postprocess"), py::arg("fp16") = false,
          py::arg("engine_cache") = "", py::arg("device_id") = 0, py::arg("profile_dir") = "")
      .def(
          "run",
          [](vle::Pipeline& p, const py::object& image, const std::string& prompt, const py::dict& options,
             const py::object& on_text) {
            const vle::Image img = image_of(image);
            vle::RunOptions o = options_of(options);
            poll_python_signals(o);
            const vle::TextCallback cb = text_callback(on_text);
            return result_dict(interruptible([&] { return p.run(img, prompt, o, cb); }));
          },
          py::arg("image"), py::arg("prompt"), py::arg("options"), py::arg("on_text") = py::none())
      .def(
          "task",
          [](vle::Pipeline& p, const std::string& task, const py::object& image, const std::vector<std::string>& names,
             const std::vector<std::string>& objects, const py::dict& options) {
            const vle::Image img = image_of(image);
            vle::RunOptions o = options_of(options);
            poll_python_signals(o);
            return result_dict(interruptible([&] {
              if (task == "detect") return p.detect(img, names, o);
              if (task == "ground") return p.ground(img, names.at(0), o);
              if (task == "segment") return p.segment(img, names, o);
              if (task == "pose") return p.pose(img, names, objects, o);
              if (task == "generate_image") return p.generate_image(names.at(0), o);
              if (task == "edit_image") return p.edit_image(img, names.at(0), o);
              throw vle::InputError("unknown task '" + task + "'");
            }));
          },
          py::arg("task"), py::arg("image"), py::arg("names"), py::arg("objects"), py::arg("options"))
      .def("detection_input",
           [](vle::Pipeline& p, const py::object& image) {
             const vle::Image img = image_of(image);
             vle::DetectionInput d;
             {
               py::gil_scoped_release release;
               d = p.detection_input(img);
             }
             return py::make_tuple(to_numpy(d.pixel_values), to_numpy(d.pixel_mask), d.resized_hw);
           })
      .def(
          "chat",
          [](vle::Pipeline& p, const py::object& image) {
            const vle::Image img = image_of(image);
            return p.chat(img);
          },
          py::arg("image"), py::keep_alive<0, 1>())
      .def_property_readonly("context_capacity", &vle::Pipeline::context_capacity)
      .def_property_readonly("context_length", &vle::Pipeline::context_length)
      .def_property_readonly("arena_bytes", &vle::Pipeline::arena_bytes)
      .def("end_profiling", &vle::Pipeline::end_profiling,
           "Ends the profile of every engine made so far (load's profile_dir); returns {graph: file}.")
      .def_property_readonly("artifact_dir", &vle::Pipeline::artifact_dir)
      .def_property_readonly("components", &vle::Pipeline::components);
}

const vle::BindRegistration registration(bind_pipeline);

}  // namespace
