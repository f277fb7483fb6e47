// Bindings of image_ops.h and postprocess.h: conversion only. Arrays are read in place through their
// strides (a wrong dtype is a TypeError, never a silent copy), outputs are allocated as numpy arrays (or
// wrap the C++ vector that holds them) and the work runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bindings/bind_registry.h"
#include "preprocess/image_ops.h"
#include "postprocess/postprocess.h"

namespace py = pybind11;

namespace {

std::string shape_text(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    s += std::to_string(a.shape(i));
    if (a.ndim() == 1 || i + 1 < a.ndim()) s += a.ndim() == 1 ? "," : ", ";
  }
  return s + ")";
}

// TypeError unless `a` has dtype T; ValueError unless it has `ndim` dimensions. `what` describes the
// expected array in the message, e.g. "[Q, K] float32".
template <typename T>
void check_array(const char* fn, const char* arg, const py::array& a, py::ssize_t ndim, const char* what) {
  if (!py::isinstance<py::array_t<T>>(a)) {
    throw py::type_error(std::string(fn) + ": " + arg + ": expected dtype " +
                         std::string(py::str(py::dtype::of<T>())) + ", got " +
                         std::string(py::str(a.dtype())));
  }
  if (a.ndim() != ndim) {
    throw py::value_error(std::string(fn) + ": " + arg + ": expected " + what + ", got shape " +
                          shape_text(a));
  }
}

// TypeError unless `a` is float32 or float64 (the functions instantiated for both).
void check_float_dtype(const char* fn, const char* arg, const py::array& a) {
  if (!py::isinstance<py::array_t<float>>(a) && !py::isinstance<py::array_t<double>>(a)) {
    throw py::type_error(std::string(fn) + ": " + arg + ": expected dtype float32 or float64, got " +
                         std::string(py::str(a.dtype())));
  }
}

// Element stride of dimension `dim` (numpy strides are in bytes).
template <typename T>
int64_t element_stride(const char* fn, const char* arg, const py::array& a, py::ssize_t dim) {
  const py::ssize_t s = a.strides(dim);
  if (s % static_cast<py::ssize_t>(sizeof(T)) != 0) {
    throw py::value_error(std::string(fn) + ": " + arg + ": strides must be multiples of the item size");
  }
  return s / static_cast<py::ssize_t>(sizeof(T));
}

vle::ImageView image_view(const char* fn, const py::array& image) {
  check_array<uint8_t>(fn, "image", image, 3, "an H x W x 3 uint8 RGB array");
  if (image.shape(2) != 3) {
    throw py::value_error(std::string(fn) + ": image: expected an H x W x 3 uint8 RGB array, got shape " +
                          shape_text(image));
  }
  if (image.shape(0) == 0 || image.shape(1) == 0) {
    throw py::value_error(std::string(fn) + ": image has zero size, shape " + shape_text(image));
  }
  return {static_cast<const uint8_t*>(image.data()), image.shape(0), image.shape(1), image.strides(0),
          image.strides(1), image.strides(2)};
}

template <typename T>
vle::View1<T> view1(const char* fn, const char* arg, const py::array& a, const char* what) {
  check_array<T>(fn, arg, a, 1, what);
  return {static_cast<const T*>(a.data()), a.shape(0), element_stride<T>(fn, arg, a, 0)};
}

template <typename T>
vle::View2<T> view2(const char* fn, const char* arg, const py::array& a, const char* what) {
  check_array<T>(fn, arg, a, 2, what);
  return {static_cast<const T*>(a.data()), a.shape(0), a.shape(1), element_stride<T>(fn, arg, a, 0),
          element_stride<T>(fn, arg, a, 1)};
}

template <typename T>
vle::View3<T> view3(const char* fn, const char* arg, const py::array& a, const char* what) {
  check_array<T>(fn, arg, a, 3, what);
  return {static_cast<const T*>(a.data()), a.shape(0), a.shape(1), a.shape(2),
          element_stride<T>(fn, arg, a, 0), element_stride<T>(fn, arg, a, 1),
          element_stride<T>(fn, arg, a, 2)};
}

// A numpy view of a C++ vector that takes ownership of it.
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& values) {
  auto* owned = new std::vector<T>(std::move(values));
  py::capsule owner(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(owned->size())}, owned->data(), owner);
}

vle::Size2 hw(const std::pair<int64_t, int64_t>& p) { return {p.first, p.second}; }

py::array_t<uint8_t> resize(const char* fn, const py::array& image, int64_t out_w, int64_t out_h,
                            vle::ResampleFilter filter) {
  const vle::ImageView view = image_view(fn, image);
  if (out_w <= 0 || out_h <= 0) {
    throw py::value_error(std::string(fn) + ": out_w and out_h must be positive, got " +
                          std::to_string(out_w) + " and " + std::to_string(out_h));
  }
  py::array_t<uint8_t> out({out_h, out_w, int64_t{3}});
  uint8_t* dst = out.mutable_data();
  py::gil_scoped_release release;
  vle::resize_rgb(view, out_w, out_h, filter, dst);
  return out;
}

py::array_t<float> region_out(int64_t thumb_size) {
  if (thumb_size <= 0) {
    throw py::value_error("thumb_size must be positive, got " + std::to_string(thumb_size));
  }
  return py::array_t<float>({thumb_size, thumb_size});
}

void bind_image(py::module_& m) {
  // --- preprocessing -------------------------------------------------------------------------------------
  m.def(
      "resize_bicubic",
      [](const py::array& image, int64_t out_w, int64_t out_h) {
        return resize("resize_bicubic", image, out_w, out_h, vle::ResampleFilter::kBicubic);
      },
      py::arg("image"), py::arg("out_w"), py::arg("out_h"),
      "PIL Image.resize((out_w, out_h), BICUBIC) of an H x W x 3 uint8 RGB array, bit-exact; "
      "returns [out_h, out_w, 3] uint8.");
  m.def(
      "resize_bilinear",
      [](const py::array& image, int64_t out_w, int64_t out_h) {
        return resize("resize_bilinear", image, out_w, out_h, vle::ResampleFilter::kBilinear);
      },
      py::arg("image"), py::arg("out_w"), py::arg("out_h"),
      "PIL Image.resize((out_w, out_h), BILINEAR) of an H x W x 3 uint8 RGB array, bit-exact; "
      "returns [out_h, out_w, 3] uint8.");
  m.def(
      "clip_tiles",
      [](const py::array& image, int64_t grid_cols, int64_t grid_rows, int64_t tile_size,
         const vle::Channels& mean, const vle::Channels& std) {
        const vle::ImageView view = image_view("clip_tiles", image);
        if (grid_cols <= 0 || grid_rows <= 0 || tile_size <= 0) {
          throw py::value_error("clip_tiles: grid_cols, grid_rows and tile_size must be positive, got " +
                                std::to_string(grid_cols) + ", " + std::to_string(grid_rows) + " and " +
                                std::to_string(tile_size));
        }
        const int64_t tiles = vle::clip_tile_count(grid_cols, grid_rows);
        py::array_t<float> out({tiles, int64_t{3}, tile_size, tile_size});
        float* dst = out.mutable_data();
        py::gil_scoped_release release;
        vle::clip_tiles(view, grid_cols, grid_rows, tile_size, mean, std, dst);
        return out;
      },
      py::arg("image"), py::arg("grid_cols"), py::arg("grid_rows"), py::arg("tile_size"), py::arg("mean"),
      py::arg("std"),
      "Anyres tiles [T, 3, S, S] float32: bicubic resize to the grid, tiles row-major, thumbnail last when "
      "T > 1, CLIP normalisation.");
  m.def(
      "detection_input",
      [](const py::array& image, int64_t short_side, int64_t max_long_side, const vle::Channels& mean,
         const vle::Channels& std, std::optional<std::pair<int64_t, int64_t>> pad_to,
         int64_t size_divisibility) {
        const vle::ImageView view = image_view("detection_input", image);
        const vle::Size2 resized =
            vle::detection_resized_size(view.width, view.height, short_side, max_long_side);
        std::optional<vle::Size2> bucket;
        if (pad_to) bucket = hw(*pad_to);
        const vle::Size2 padded = vle::detection_padded_size(resized, size_divisibility, bucket);
        py::array_t<float> pixels({int64_t{1}, int64_t{3}, padded.height, padded.width});
        py::array_t<bool> mask({int64_t{1}, padded.height, padded.width});
        float* pixels_ptr = pixels.mutable_data();
        bool* mask_ptr = mask.mutable_data();
        {
          py::gil_scoped_release release;
          vle::detection_input(view, resized, padded, mean, std, pixels_ptr, mask_ptr);
        }
        return py::make_tuple(pixels, mask, py::make_tuple(resized.height, resized.width));
      },
      py::arg("image"), py::arg("short_side"), py::arg("max_long_side"), py::arg("mean"), py::arg("std"),
      py::arg("pad_to") = py::none(), py::arg("size_divisibility") = 32,
      "The decoders' image: (pixels [1, 3, Hp, Wp] float32, mask [1, Hp, Wp] bool, resized (h, w)). "
      "Bilinear keep-ratio resize, (v - mean*255) / (std*255), zero pad to size_divisibility or into pad_to "
      "(H, W).");
  m.def(
      "region_mask_box",
      [](const std::array<double, 4>& box, const std::pair<int64_t, int64_t>& image_size,
         int64_t thumb_size) {
        py::array_t<float> out = region_out(thumb_size);
        vle::region_mask_box(box, image_size.first, image_size.second, thumb_size, out.mutable_data());
        return out;
      },
      py::arg("box"), py::arg("image_size"), py::arg("thumb_size"),
      "A box (x0, y0, x1, y1) in original pixels, image_size (w, h), to a [S, S] float32 mask in the "
      "thumbnail frame.");
  m.def(
      "region_mask_point",
      [](const std::array<double, 2>& point, const std::pair<int64_t, int64_t>& image_size,
         int64_t thumb_size) {
        py::array_t<float> out = region_out(thumb_size);
        vle::region_mask_point(point, image_size.first, image_size.second, thumb_size, out.mutable_data());
        return out;
      },
      py::arg("point"), py::arg("image_size"), py::arg("thumb_size"),
      "A point (x, y) in original pixels, image_size (w, h), to a [S, S] float32 mask with one cell set.");
  m.def(
      "region_mask_mask",
      [](const py::array& mask, const std::pair<int64_t, int64_t>& image_size, int64_t thumb_size) {
        check_array<bool>("region_mask_mask", "mask", mask, 2, "an H x W bool mask");
        const vle::BoolMaskView view{static_cast<const bool*>(mask.data()), mask.shape(0), mask.shape(1),
                                     mask.strides(0), mask.strides(1)};
        py::array_t<float> out = region_out(thumb_size);
        float* dst = out.mutable_data();
        py::gil_scoped_release release;
        vle::region_mask_from_mask(view, image_size.first, image_size.second, thumb_size, dst);
        return out;
      },
      py::arg("mask"), py::arg("image_size"), py::arg("thumb_size"),
      "An H x W bool mask in the original frame, image_size (w, h), to a [S, S] float32 mask (PIL NEAREST).");

  // --- post-processing -----------------------------------------------------------------------------------
  m.def(
      "topk_query_class",
      [](const py::array& logits, int64_t k, double threshold, bool query_major) {
        const auto view = view2<float>("topk_query_class", "logits", logits, "[Q, K] float32 logits");
        vle::TopK top;
        {
          py::gil_scoped_release release;
          top = vle::topk_query_class(view, k, threshold, query_major);
        }
        return py::make_tuple(to_numpy(std::move(top.scores)), to_numpy(std::move(top.queries)),
                              to_numpy(std::move(top.classes)));
      },
      py::arg("logits"), py::arg("k"), py::arg("threshold"), py::arg("query_major") = false,
      "Sigmoid, then the best k (query, class) pairs with score >= threshold: (scores float32, query int64, "
      "class int64), ordered by (-score, class, query), or (-score, query, class) with query_major.");
  m.def(
      "boxes_cxcywh_to_xyxy",
      [](const py::array& boxes, double scale_w, double scale_h) {
        const auto view = view2<float>("boxes_cxcywh_to_xyxy", "boxes", boxes, "[n, 4] float32 boxes");
        py::array_t<double> out({view.rows, int64_t{4}});
        vle::boxes_cxcywh_to_xyxy(view, scale_w, scale_h, out.mutable_data());
        return out;
      },
      py::arg("boxes"), py::arg("scale_w"), py::arg("scale_h"),
      "Normalised (cx, cy, w, h) [n, 4] float32 to (x0, y0, x1, y1) * (scale_w, scale_h), float64 [n, 4].");
  m.def(
      "nms_class_aware",
      [](const py::array& boxes, const py::array& scores, const py::array& labels, double iou) {
        const char* fn = "nms_class_aware";
        check_float_dtype(fn, "boxes", boxes);
        check_float_dtype(fn, "scores", scores);
        const auto label_view = view1<int64_t>(fn, "labels", labels, "[n] int64 labels");
        const bool boxes64 = py::isinstance<py::array_t<double>>(boxes);
        const bool scores64 = py::isinstance<py::array_t<double>>(scores);
        const char* box_what = "[n, 4] float32 or float64 boxes";
        const char* score_what = "[n] float32 or float64 scores";
        std::vector<int64_t> keep;
        if (boxes64 && scores64) {
          const auto b = view2<double>(fn, "boxes", boxes, box_what);
          const auto s = view1<double>(fn, "scores", scores, score_what);
          py::gil_scoped_release release;
          keep = vle::nms_class_aware(b, s, label_view, iou);
        } else if (boxes64) {
          const auto b = view2<double>(fn, "boxes", boxes, box_what);
          const auto s = view1<float>(fn, "scores", scores, score_what);
          py::gil_scoped_release release;
          keep = vle::nms_class_aware(b, s, label_view, iou);
        } else if (scores64) {
          const auto b = view2<float>(fn, "boxes", boxes, box_what);
          const auto s = view1<double>(fn, "scores", scores, score_what);
          py::gil_scoped_release release;
          keep = vle::nms_class_aware(b, s, label_view, iou);
        } else {
          const auto b = view2<float>(fn, "boxes", boxes, box_what);
          const auto s = view1<float>(fn, "scores", scores, score_what);
          py::gil_scoped_release release;
          keep = vle::nms_class_aware(b, s, label_view, iou);
        }
        return to_numpy(std::move(keep));
      },
      py::arg("boxes"), py::arg("scores"), py::arg("labels"), py::arg("iou"),
      "Class-aware greedy NMS over xyxy boxes: indices kept (int64), by descending score (stable); a box is "
      "dropped when its IoU with a kept box of the same label is > iou.");
  m.def(
      "masks_to_image",
      [](const py::array& mask_logits, const std::pair<int64_t, int64_t>& resized_hw,
         const std::pair<int64_t, int64_t>& out_hw, double threshold) {
        const auto view = view3<float>("masks_to_image", "mask_logits", mask_logits,
                                       "[n, h/4, w/4] float32 mask logits");
        if (out_hw.first <= 0 || out_hw.second <= 0) {
          throw py::value_error("masks_to_image: out_hw must be positive, got (" +
                                std::to_string(out_hw.first) + ", " + std::to_string(out_hw.second) + ")");
        }
        py::array_t<bool> out({view.dim0, out_hw.first, out_hw.second});
        bool* dst = out.mutable_data();
        py::gil_scoped_release release;
        vle::masks_to_image(view, hw(resized_hw), hw(out_hw), threshold, dst);
        return out;
      },
      py::arg("mask_logits"), py::arg("resized_hw"), py::arg("out_hw"), py::arg("threshold"),
      "Mask logits of the padded image [n, h/4, w/4] to bool masks [n, H, W] in the original frame: "
      "bilinear x4, crop to resized_hw, bilinear to out_hw (PyTorch, align_corners=False), sigmoid > "
      "threshold.");
  m.def(
      "semantic_map",
      [](const py::array& class_logits, const py::array& mask_logits,
         const std::pair<int64_t, int64_t>& resized_hw, const std::pair<int64_t, int64_t>& out_hw,
         double threshold) {
        const auto classes = view2<float>("semantic_map", "class_logits", class_logits,
                                          "[Q, C] float32 class logits");
        const auto masks = view3<float>("semantic_map", "mask_logits", mask_logits,
                                        "[Q, h/4, w/4] float32 mask logits");
        if (out_hw.first <= 0 || out_hw.second <= 0) {
          throw py::value_error("semantic_map: out_hw must be positive, got (" + std::to_string(out_hw.first) +
                                ", " + std::to_string(out_hw.second) + ")");
        }
        py::array_t<int32_t> out({out_hw.first, out_hw.second});
        int32_t* dst = out.mutable_data();
        py::gil_scoped_release release;
        vle::semantic_map(classes, masks, hw(resized_hw), hw(out_hw), threshold, dst);
        return out;
      },
      py::arg("class_logits"), py::arg("mask_logits"), py::arg("resized_hw"), py::arg("out_hw"),
      py::arg("threshold"),
      "Label map [H, W] int32: argmax over classes of sum_q sigmoid(class) * sigmoid(upsampled mask), -1 "
      "where the best is below threshold.");
  m.def(
      "keypoints_to_pixels",
      [](const py::array& boxes, const py::array& keypoints, int64_t num_keypoints,
         const std::pair<int64_t, int64_t>& padded_hw, const std::pair<int64_t, int64_t>& resized_hw,
         const std::pair<int64_t, int64_t>& image_size) {
        const char* fn = "keypoints_to_pixels";
        const auto box_view = view2<float>(fn, "boxes", boxes, "[n, 4] float32 boxes");
        const auto kp_view = view2<float>(fn, "keypoints", keypoints, "[n, 3 * K] float32 keypoints");
        if (box_view.cols != 4) {
          throw py::value_error(std::string(fn) + ": boxes: expected [n, 4] float32 boxes, got shape " +
                                shape_text(boxes));
        }
        if (num_keypoints < 0) {
          throw py::value_error(std::string(fn) + ": num_keypoints must be >= 0, got " +
                                std::to_string(num_keypoints));
        }
        py::array_t<double> boxes_out({box_view.rows, int64_t{4}});
        py::array_t<float> keypoints_out({kp_view.rows, num_keypoints, int64_t{3}});
        vle::keypoints_to_pixels(box_view, kp_view, num_keypoints, hw(padded_hw), hw(resized_hw),
                                 image_size.first, image_size.second, boxes_out.mutable_data(),
                                 keypoints_out.mutable_data());
        return py::make_tuple(boxes_out, keypoints_out);
      },
      py::arg("boxes"), py::arg("keypoints"), py::arg("num_keypoints"), py::arg("padded_hw"),
      py::arg("resized_hw"), py::arg("image_size"),
      "Pose boxes [n, 4] (cx, cy, w, h) and keypoints [n, 3 * Kmax] normalised to the padded image, to "
      "original pixels: (boxes_xyxy float64 [n, 4], keypoints float32 [n, num_keypoints, 3]).");
}

const vle::BindRegistration registration(&bind_image);

}  // namespace
