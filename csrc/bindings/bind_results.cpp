// Bindings of results.h, the task templates and Result::to_json, for the tests that hold them against the
// Python SDK: conversion only. Arrays come in as numpy arrays of exactly the dtype named (a TypeError
// otherwise) and are copied into vle::Array; results go out as tuples and numpy copies.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bindings/bind_registry.h"
#include "loop/templates.h"
#include "postprocess/results.h"

namespace py = pybind11;

namespace {

template <typename T>
vle::Array to_array(const py::array& a, const char* name, vle::Array::Type type) {
  if (!a.dtype().equal(py::dtype::of<T>())) {
    throw py::type_error(std::string(name) + " must be " + std::string(py::str(py::dtype::of<T>())) + ", got " +
                         std::string(py::str(a.dtype())));
  }
  const py::array c = py::array::ensure(a, py::array::c_style);
  vle::Array out = vle::Array::make(type, std::vector<int64_t>(c.shape(), c.shape() + c.ndim()));
  std::memcpy(out.data.get(), c.data(), out.bytes());
  return out;
}

template <typename T>
py::array to_numpy(const vle::Array& a) {
  py::array_t<T> out(std::vector<py::ssize_t>(a.shape.begin(), a.shape.end()));
  std::memcpy(out.mutable_data(), a.data.get(), a.bytes());
  return std::move(out);
}

vle::Postprocess settings_from(const py::dict& post) {
  vle::Postprocess s;
  s.det_top_k = post["det_top_k"].cast<int64_t>();
  s.det_score_threshold = post["det_score_threshold"].cast<double>();
  if (post.contains("nms_iou") && !post["nms_iou"].is_none()) s.nms_iou = post["nms_iou"].cast<double>();
  s.mask_threshold = post["mask_threshold"].cast<double>();
  s.seg_score_threshold = post["seg_score_threshold"].cast<double>();
  s.pose_top_k = post["pose_top_k"].cast<int64_t>();
  s.pose_score_threshold = post["pose_score_threshold"].cast<double>();
  return s;
}

using Box = std::array<double, 4>;

// Detections, the semantic map and poses of a result, as plain tuples.
py::dict result_parts(const vle::Result& r) {
  py::list detections, poses;
  for (const vle::Detection& d : r.detections) {
    detections.append(py::make_tuple(d.label, d.kind, d.score, d.box_xyxy,
                                     d.mask.empty() ? py::object(py::none()) : to_numpy<bool>(d.mask), d.query_index));
  }
  for (const vle::Pose& p : r.poses) {
    poses.append(py::make_tuple(p.label, p.score, p.box_xyxy, to_numpy<float>(p.keypoints), p.keypoint_names,
                                p.query_index));
  }
  py::dict out;
  out["detections"] = detections;
  out["segmentation"] = r.has_segmentation ? py::object(py::make_tuple(to_numpy<int32_t>(r.segmentation.label_map),
                                                                        r.segmentation.labels))
                                           : py::object(py::none());
  out["poses"] = poses;
  return out;
}

py::tuple pair(const vle::templates::TaskTemplate& t) { return py::make_tuple(t.question, t.answer); }

void bind_results(py::module_& m) {
  namespace t = vle::templates;
  m.def("template_detection", [](const std::vector<std::string>& classes) { return pair(t::detection(classes)); },
        py::arg("classes"), "(question, answer) of the detection shortcut.");
  m.def("template_grounding", [](const std::string& phrase) { return pair(t::grounding(phrase)); },
        py::arg("phrase"), "(question, answer) of the grounding shortcut.");
  m.def("template_segmentation",
        [](const std::vector<std::string>& classes) { return pair(t::segmentation(classes)); }, py::arg("classes"),
        "(question, answer) of the segmentation shortcut.");
  m.def(
      "template_pose",
      [](const std::vector<std::string>& names, const std::vector<std::string>& objects) {
        const t::TaskTemplate p = t::pose(names, objects);
        return py::make_tuple(p.history, p.question, p.answer);
      },
      py::arg("keypoint_names"), py::arg("objects"), "(history, question, answer) of the pose shortcut.");
  m.def("template_generation", [](const std::string& caption) { return pair(t::generation(caption)); },
        py::arg("caption"), "(question, answer) of the generation shortcut.");
  m.def("template_editing", [](const std::string& instruction) { return pair(t::editing(instruction)); },
        py::arg("instruction"), "(question, answer) of the editing shortcut.");

  m.def(
      "images_to_uint8",
      [](const py::array& images) {
        const vle::Array in = to_array<float>(images, "images", vle::Array::Type::kFloat32);
        std::vector<vle::Array> out;
        {
          py::gil_scoped_release release;
          out = vle::images_to_uint8(in);
        }
        py::list list;
        for (const vle::Array& im : out) list.append(to_numpy<uint8_t>(im));
        return list;
      },
      py::arg("images"), "[n, 3, H, W] float32 in [0, 1] to a list of [H, W, 3] uint8 arrays.");

  m.def(
      "object_results",
      [](const py::array& logits, const py::array& boxes, const py::array& masks,
         const std::vector<std::tuple<std::string, std::string, int64_t>>& groups, int64_t max_groups,
         std::pair<int64_t, int64_t> resized_hw, int64_t width, int64_t height, const py::dict& post) {
        const vle::Array lg = to_array<float>(logits, "logits", vle::Array::Type::kFloat32);
        const vle::Array bx = to_array<float>(boxes, "boxes", vle::Array::Type::kFloat32);
        const vle::Array mk = to_array<float>(masks, "masks", vle::Array::Type::kFloat32);
        std::vector<vle::ObjectGroup> object_groups;
        for (const auto& [kind, label, index] : groups) object_groups.push_back({kind, label, index});
        const vle::Postprocess s = settings_from(post);
        vle::Result r;
        {
          py::gil_scoped_release release;
          vle::object_results(lg, bx, mk, object_groups, max_groups, resized_hw, width, height, s, r);
        }
        return result_parts(r);
      },
      py::arg("logits"), py::arg("boxes"), py::arg("masks"), py::arg("groups"), py::arg("max_groups"),
      py::arg("resized_hw"), py::arg("width"), py::arg("height"), py::arg("post"),
      "The object decoder's outputs to {'detections', 'segmentation', 'poses'}; groups are (kind, label, slot).");
  m.def(
      "pose_results",
      [](const py::array& logits, const py::array& boxes, const py::array& keypoints,
         const std::vector<std::string>& object_labels, const std::vector<std::string>& keypoint_names,
         std::pair<int64_t, int64_t> padded_hw, std::pair<int64_t, int64_t> resized_hw, int64_t width,
         int64_t height, const py::dict& post) {
        const vle::Array lg = to_array<float>(logits, "logits", vle::Array::Type::kFloat32);
        const vle::Array bx = to_array<float>(boxes, "boxes", vle::Array::Type::kFloat32);
        const vle::Array kp = to_array<float>(keypoints, "keypoints", vle::Array::Type::kFloat32);
        const vle::Postprocess s = settings_from(post);
        vle::Result r;
        {
          py::gil_scoped_release release;
          vle::pose_results(lg, bx, kp, object_labels, keypoint_names, padded_hw, resized_hw, width, height, s, r);
        }
        return result_parts(r);
      },
      py::arg("logits"), py::arg("boxes"), py::arg("keypoints"), py::arg("object_labels"),
      py::arg("keypoint_names"), py::arg("padded_hw"), py::arg("resized_hw"), py::arg("width"),
      py::arg("height"), py::arg("post"), "The keypoint decoder's outputs to {'detections', 'segmentation', 'poses'}.");

  m.def(
      "result_to_json",
      [](const std::string& text, const std::vector<int64_t>& token_ids, const std::string& stop_reason,
         const std::vector<std::tuple<std::string, std::string, int64_t>>& links,
         const std::vector<std::tuple<std::string, std::string, double, Box, std::optional<py::array>, int64_t>>&
             detections,
         const std::optional<std::tuple<py::array, std::vector<std::string>>>& segmentation,
         const std::vector<std::tuple<std::string, double, Box, py::array, std::vector<std::string>, int64_t>>& poses,
         const std::vector<std::vector<int64_t>>& image_shapes,
         const std::vector<std::pair<std::string, double>>& timings, std::optional<int> indent) {
        vle::Result r;
        r.text = text;
        r.token_ids = token_ids;
        r.stop_reason = stop_reason;
        for (const auto& [kind, label, position] : links) r.links.push_back({kind, label, position, {}});
        for (const auto& [label, kind, score, box, mask, query] : detections) {
          vle::Detection d;
          d.label = label;
          d.kind = kind;
          d.score = score;
          d.box_xyxy = box;
          if (mask) d.mask = to_array<bool>(*mask, "mask", vle::Array::Type::kBool);
          d.query_index = query;
          r.detections.push_back(std::move(d));
        }
        if (segmentation) {
          r.has_segmentation = true;
          r.segmentation.label_map =
              to_array<int32_t>(std::get<0>(*segmentation), "label_map", vle::Array::Type::kInt32);
          r.segmentation.labels = std::get<1>(*segmentation);
        }
        for (const auto& [label, score, box, keypoints, names, query] : poses) {
          vle::Pose p;
          p.label = label;
          p.score = score;
          p.box_xyxy = box;
          p.keypoints = to_array<float>(keypoints, "keypoints", vle::Array::Type::kFloat32);
          p.keypoint_names = names;
          p.query_index = query;
          r.poses.push_back(std::move(p));
        }
        for (const auto& shape : image_shapes) r.images.push_back(vle::Array::make(vle::Array::Type::kUInt8, shape));
        r.timings_ms = timings;
        return r.to_json(indent ? *indent : -1);
      },
      py::arg("text"), py::arg("token_ids"), py::arg("stop_reason"), py::arg("links"), py::arg("detections"),
      py::arg("segmentation"), py::arg("poses"), py::arg("image_shapes"), py::arg("timings"), py::arg("indent"),
      "vle::Result::to_json of a result given by its parts (indent None: one line).");
}

const vle::BindRegistration registration(&bind_results);

}  // namespace
