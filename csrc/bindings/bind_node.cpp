// Bindings of the perception node (visionllm_edge/perception_node.h): conversion and GIL handling only.
// Outputs reach Python as dicts shaped like vision_msgs/Detection2DArray; the callbacks take the GIL, and
// every call that may wait for a run (process_pending, stop, the destructor) releases it, so a callback on the
// worker thread never waits for a thread that holds the GIL.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "bindings/bind_registry.h"
#include "visionllm_edge/perception_node.h"

namespace py = pybind11;

namespace {

py::dict header_dict(const vle::FrameHeader& h) {
  py::dict d;
  d["stamp"] = py::make_tuple(h.stamp_sec, h.stamp_nanosec);
  d["frame_id"] = h.frame_id;
  return d;
}

py::dict counters_dict(const vle::NodeCounters& c) {
  py::dict d;
  d["received"] = c.received;
  d["processed"] = c.processed;
  d["dropped"] = c.dropped;
  d["failed"] = c.failed;
  return d;
}

py::dict output_dict(const vle::NodeOutput& out) {
  py::list detections;
  for (const vle::NodeDetection& x : out.detections) {
    py::dict center;
    center["x"] = x.center.x;
    center["y"] = x.center.y;
    center["theta"] = x.center.theta;
    py::dict bbox;
    bbox["center"] = center;
    bbox["size_x"] = x.size_x;
    bbox["size_y"] = x.size_y;
    py::dict hypothesis;
    hypothesis["class_id"] = x.class_id;
    hypothesis["score"] = x.score;
    py::dict result;
    result["hypothesis"] = hypothesis;
    py::list keypoints;
    for (const auto& k : x.keypoints) {
      py::dict p;
      p["name"] = k.name;
      p["x"] = k.x;
      p["y"] = k.y;
      p["score"] = k.score;
      keypoints.append(p);
    }
    py::dict d;
    d["bbox"] = bbox;
    py::list results;
    results.append(result);
    d["results"] = results;
    d["id"] = x.id;
    d["keypoints"] = keypoints;
    if (x.mask.height > 0) {
      py::array_t<uint8_t> mask({static_cast<py::ssize_t>(x.mask.height), static_cast<py::ssize_t>(x.mask.width)});
      std::memcpy(mask.mutable_data(), x.mask.data.data(), x.mask.data.size());
      d["mask"] = mask;
    } else {
      d["mask"] = py::none();
    }
    detections.append(d);
  }
  py::dict d;
  d["header"] = header_dict(out.header);
  d["task"] = vle::node_task_name(out.task);
  d["detections"] = detections;
  d["answer"] = out.answer;
  d["latency_ms"] = out.latency_ms;
  d["run_ms"] = out.run_ms;
  d["counters"] = counters_dict(out.counters);
  d["stats"] = out.stats;
  return d;
}

vle::NodePrompt prompt_of(const std::string& task, const std::vector<std::string>& names,
                          const std::vector<std::string>& objects, const std::string& text, int64_t max_new_tokens) {
  vle::NodePrompt p;
  p.task = vle::node_task(task);
  p.names = names;
  p.objects = objects;
  p.text = text;
  p.max_new_tokens = max_new_tokens;
  return p;
}

// A Python callable run with the GIL; its exception goes back to the node as a C++ one (made while the GIL is
// held), which the node reports through the failure callback.
template <typename Arg, typename Convert>
std::function<void(const Arg&)> with_gil(std::shared_ptr<py::object> fn, Convert convert) {
  return [fn, convert](const Arg& arg) {
    py::gil_scoped_acquire gil;
    try {
      (*fn)(convert(arg));
    } catch (py::error_already_set& e) {
      throw std::runtime_error(e.what());
    }
  };
}

// The node and the Python callables it calls. The node is destroyed with the GIL released (its worker may be
// waiting for the GIL in a callback); the callables are released after, with the GIL held.
struct PyNode {
  std::shared_ptr<py::object> on_output, on_failure;
  std::unique_ptr<vle::PerceptionNode> node;

  ~PyNode() {
    py::gil_scoped_release release;
    node.reset();
  }
};

void bind_node(py::module_& m) {
  m.attr("CAMERA_ENCODINGS") = vle::camera_encodings();
  py::class_<PyNode>(m, "PerceptionNode",
                     "The perception node over one artifact folder (visionllm_edge/perception_node.h).")
      .def(py::init([](const std::string& artifact_dir, const std::string& task, const std::vector<std::string>& names,
                       const std::vector<std::string>& objects, const std::string& text, int64_t max_new_tokens,
                       double rate_hz, int threads, const std::string& onnxruntime_library,
                       const std::map<std::string, double>& postprocess, const py::object& on_output,
                       const py::object& on_failure) {
             vle::NodeOptions options;
             options.rate_hz = rate_hz;
             options.prompt = prompt_of(task, names, objects, text, max_new_tokens);
             vle::LoadOptions load;
             load.threads = threads;
             load.onnxruntime_library = onnxruntime_library;
             load.postprocess = postprocess;
             auto handle = std::make_unique<PyNode>();
             handle->on_output = std::make_shared<py::object>(on_output);
             vle::PerceptionNode::FailureCallback failure;
             if (!on_failure.is_none()) {
               handle->on_failure = std::make_shared<py::object>(on_failure);
               failure = with_gil<vle::NodeFailure>(handle->on_failure, [](const vle::NodeFailure& f) {
                 return py::make_tuple(header_dict(f.header), f.message);
               });
             }
             auto output = with_gil<vle::NodeOutput>(handle->on_output, output_dict);
             {
               py::gil_scoped_release release;
               handle->node = std::make_unique<vle::PerceptionNode>(vle::Pipeline::load(artifact_dir, load), options,
                                                                    std::move(output), std::move(failure));
             }
             return handle;
           }),
           py::arg("artifact_dir"), py::arg("task"), py::arg("names"), py::arg("objects"), py::arg("text"),
           py::arg("max_new_tokens"), py::arg("rate_hz"), py::arg("threads"), py::arg("onnxruntime_library"),
           py::arg("postprocess"), py::arg("on_output"), py::arg("on_failure") = py::none())
      .def(
          "push",
          [](PyNode& n, const py::object& data, uint32_t height, uint32_t width, const std::string& encoding,
             uint32_t step, std::pair<int32_t, uint32_t> stamp, const std::string& frame_id, uint8_t is_bigendian) {
            std::vector<uint8_t> bytes;
            if (py::isinstance<py::bytes>(data)) {
              const std::string b = data.cast<std::string>();
              bytes.assign(b.begin(), b.end());
            } else if (py::isinstance<py::array>(data) &&
                       py::reinterpret_borrow<py::array>(data).dtype().equal(py::dtype::of<uint8_t>())) {
              const auto c = py::array_t<uint8_t, py::array::c_style>::ensure(data);
              bytes.assign(c.data(), c.data() + c.size());
            } else {
              throw py::type_error("push: data must be bytes or a uint8 numpy array, got " +
                                   std::string(py::str(py::type::of(data))));
            }
            vle::CameraFrame f;
            f.header.stamp_sec = stamp.first;
            f.header.stamp_nanosec = stamp.second;
            f.header.frame_id = frame_id;
            f.height = height;
            f.width = width;
            f.encoding = encoding;
            f.is_bigendian = is_bigendian;
            f.step = step;
            f.data = std::move(bytes);
            py::gil_scoped_release release;
            n.node->push(std::move(f));
          },
          py::arg("data"), py::arg("height"), py::arg("width"), py::arg("encoding"), py::arg("step"),
          py::arg("stamp") = std::pair<int32_t, uint32_t>{0, 0}, py::arg("frame_id") = "", py::arg("is_bigendian") = 0)
      .def(
          "set_prompt",
          [](PyNode& n, const std::string& task, const std::vector<std::string>& names,
             const std::vector<std::string>& objects, const std::string& text, int64_t max_new_tokens) {
            n.node->set_prompt(prompt_of(task, names, objects, text, max_new_tokens));
          },
          py::arg("task"), py::arg("names") = std::vector<std::string>{},
          py::arg("objects") = std::vector<std::string>{"person"}, py::arg("text") = "",
          py::arg("max_new_tokens") = 64)
      .def("process_pending",
           [](PyNode& n) {
             py::gil_scoped_release release;
             return n.node->process_pending();
           })
      .def("start", [](PyNode& n) { n.node->start(); })
      .def("stop",
           [](PyNode& n) {
             py::gil_scoped_release release;
             n.node->stop();
           })
      .def_property_readonly("running", [](const PyNode& n) { return n.node->running(); })
      .def_property_readonly("counters", [](const PyNode& n) { return counters_dict(n.node->counters()); });
}

const vle::BindRegistration registration(bind_node);

}  // namespace
