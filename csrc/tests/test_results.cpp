// The results side: Result::to_json against the text the Python SDK writes for the same result, the
// decoders' raw tensors to detections / semantic map / poses, generated images to uint8, vle::Image
// (copies, views, files decoded with stb_image and the bad inputs) and the task templates.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <unistd.h>

#define STB_IMAGE_WRITE_IMPLEMENTATION
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wunused-function"
#include <stb/stb_image_write.h>
#pragma GCC diagnostic pop

#include "loop/templates.h"
#include "text/utf8.h"
#include "postprocess/results.h"
#include "visionllm_edge/pipeline.h"

namespace {

using vle::Array;

Array floats(std::vector<int64_t> shape, const std::vector<float>& values) {
  Array a = Array::make(Array::Type::kFloat32, std::move(shape));
  EXPECT_EQ(static_cast<size_t>(a.numel()), values.size());
  std::copy(values.begin(), values.end(), a.as<float>());
  return a;
}

int64_t count_true(const Array& mask) {
  int64_t n = 0;
  for (int64_t i = 0; i < mask.numel(); ++i) n += mask.as<bool>()[i];
  return n;
}

// A folder of its own under the system's temporary folder, removed at the end of the test.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    path = std::filesystem::temp_directory_path() /
           ("vle_test_results_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

// --- Result::to_json ------------------------------------------------------------------------------------

// The result the Python check below builds too (tests/test_core_results.py writes the same by hand).
vle::Result sample_result() {
  vle::Result r;
  r.text = "He said \"hi\" \u2013 caf\u00e9 \U0001F600\n\ttab\\";
  r.token_ids = {1, 29871, 32000};
  r.stop_reason = "length";
  r.links = {{"det", "person", 12, {}}, {"grd", "the red ball", 20, {}}};
  vle::Detection d1;
  d1.label = "person";
  d1.kind = "det";
  d1.score = 0.9f;  // a float32 score
  d1.box_xyxy = {1.5, 2.25, 10.0, 1e-05};
  d1.mask = Array::make(Array::Type::kBool, {2, 3});
  const bool bits[6] = {true, true, false, false, true, true};
  std::memcpy(d1.mask.as<bool>(), bits, sizeof bits);
  d1.query_index = 3;
  vle::Detection d2;
  d2.label = "the red ball";
  d2.kind = "grd";
  d2.score = 1.0 / (1.0 + std::exp(-1.0));
  d2.box_xyxy = {0.1, 0.2, 1e16, -0.0};
  d2.query_index = 0;
  r.detections = {d1, d2};
  r.has_segmentation = true;
  r.segmentation.label_map = Array::make(Array::Type::kInt32, {2, 2});
  const int32_t map[4] = {0, 2, 1, -1};
  std::memcpy(r.segmentation.label_map.as<int32_t>(), map, sizeof map);
  r.segmentation.labels = {"sky", "road", "sky"};
  vle::Pose p;
  p.label = "person";
  p.score = 0.75f;
  p.box_xyxy = {1.0, 2.0, 3.0, 4.0};
  p.keypoints = floats({2, 3}, {1.23456f, 2.0005f, 0.5f, 100.0f, 1e-4f, 0.9999f});
  p.keypoint_names = {"nose", "left_eye"};
  p.query_index = 5;
  r.poses = {p};
  r.images = {Array::make(Array::Type::kUInt8, {8, 6, 3})};
  r.timings_ms = {{"vision", 1.23456}, {"llm_prefill", 2.0005}, {"vision", 0.5}};
  return r;
}

// What Python's Result.to_json() writes for sample_result().
const char* kExpectedJson = R"JSON({
  "text": "He said \"hi\" \u2013 caf\u00e9 \ud83d\ude00\n\ttab\\",
  "token_ids": [
    1,
    29871,
    32000
  ],
  "stop_reason": "length",
  "links": [
    {
      "kind": "det",
      "label": "person",
      "position": 12
    },
    {
      "kind": "grd",
      "label": "the red ball",
      "position": 20
    }
  ],
  "detections": [
    {
      "label": "person",
      "kind": "det",
      "score": 0.8999999761581421,
      "box_xyxy": [
        1.5,
        2.25,
        10.0,
        1e-05
      ],
      "query_index": 3,
      "mask_area": 4
    },
    {
      "label": "the red ball",
      "kind": "grd",
      "score": 0.7310585786300049,
      "box_xyxy": [
        0.1,
        0.2,
        1e+16,
        -0.0
      ],
      "query_index": 0
    }
  ],
  "segmentation": {
    "labels": [
      "sky",
      "road",
      "sky"
    ],
    "pixels_per_label": {
      "sky": 1,
      "road": 1
    }
  },
  "poses": [
    {
      "label": "person",
      "score": 0.75,
      "box_xyxy": [
        1.0,
        2.0,
        3.0,
        4.0
      ],
      "keypoints": [
        [
          1.235,
          2.0,
          0.5
        ],
        [
          100.0,
          0.0,
          1.0
        ]
      ],
      "keypoint_names": [
        "nose",
        "left_eye"
      ]
    }
  ],
  "images": [
    [
      8,
      6,
      3
    ]
  ],
  "timings_ms": {
    "vision": 1.735,
    "llm_prefill": 2.001
  }
})JSON";

TEST(ResultJson, MatchesPythonToJson) {
  EXPECT_EQ(sample_result().to_json(), kExpectedJson);
}

TEST(ResultJson, OneLineLikePythonIndentNone) {
  // Python: result.to_json(indent=None).
  EXPECT_EQ(sample_result().to_json(-1), R"JSON({"text": "He said \"hi\" \u2013 caf\u00e9 \ud83d\ude00\n\ttab\\", "token_ids": [1, 29871, 32000], "stop_reason": "length", "links": [{"kind": "det", "label": "person", "position": 12}, {"kind": "grd", "label": "the red ball", "position": 20}], "detections": [{"label": "person", "kind": "det", "score": 0.8999999761581421, "box_xyxy": [1.5, 2.25, 10.0, 1e-05], "query_index": 3, "mask_area": 4}, {"label": "the red ball", "kind": "grd", "score": 0.7310585786300049, "box_xyxy": [0.1, 0.2, 1e+16, -0.0], "query_index": 0}], "segmentation": {"labels": ["sky", "road", "sky"], "pixels_per_label": {"sky": 1, "road": 1}}, "poses": [{"label": "person", "score": 0.75, "box_xyxy": [1.0, 2.0, 3.0, 4.0], "keypoints": [[1.235, 2.0, 0.5], [100.0, 0.0, 1.0]], "keypoint_names": ["nose", "left_eye"]}], "images": [[8, 6, 3]], "timings_ms": {"vision": 1.735, "llm_prefill": 2.001}})JSON");
}

TEST(ResultJson, FloatsAsPythonReprWritesThem) {
  // Python: repr() of each, and json.dumps' NaN / Infinity.
  const std::vector<std::pair<double, std::string>> cases = {
      {0.1, "0.1"}, {100.0, "100.0"}, {1e-4, "0.0001"}, {1e-5, "1e-05"}, {1.5e-7, "1.5e-07"},
      {1e16, "1e+16"}, {9999999999999998.0, "9999999999999998.0"}, {123456789.125, "123456789.125"},
      {-2.5, "-2.5"}, {0.1 + 0.2, "0.30000000000000004"}, {5e-324, "5e-324"}, {1.7976931348623157e308, "1.7976931348623157e+308"},
      {std::numeric_limits<double>::quiet_NaN(), "NaN"}, {-std::numeric_limits<double>::infinity(), "-Infinity"}};
  for (const auto& [value, text] : cases) {
    vle::Result r;
    vle::Detection d;
    d.score = value;
    r.detections = {d};
    const std::string json = r.to_json(-1);
    EXPECT_NE(json.find("\"score\": " + text + ","), std::string::npos) << text << " in " << json;
  }
}

TEST(ResultJson, EmptyResultAndTimings) {
  vle::Result r;
  EXPECT_EQ(r.to_json(-1),
            "{\"text\": \"\", \"token_ids\": [], \"stop_reason\": \"eos\", \"links\": [], \"detections\": [], "
            "\"segmentation\": null, \"poses\": [], \"images\": [], \"timings_ms\": {}}");
  r.timings_ms = {{"vision", 1.0}, {"decode", 2.5}, {"vision", 0.25}};
  EXPECT_DOUBLE_EQ(r.timing("vision"), 1.25);
  EXPECT_DOUBLE_EQ(r.timing("decode"), 2.5);
  EXPECT_EQ(r.timing("diffusion"), 0.0);
}

TEST(ResultArray, MakeNumelBytes) {
  Array a = Array::make(Array::Type::kInt64, {2, 3});
  EXPECT_EQ(a.numel(), 6);
  EXPECT_EQ(a.bytes(), 48u);
  EXPECT_FALSE(a.empty());
  for (int i = 0; i < 6; ++i) EXPECT_EQ(a.as<int64_t>()[i], 0);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data.get()) % 64, 0u);
  const Array none = Array::make(Array::Type::kFloat32, {0, 3});  // no elements, still an array
  EXPECT_EQ(none.numel(), 0);
  EXPECT_FALSE(none.empty());
  EXPECT_TRUE(Array{}.empty());
  EXPECT_EQ(vle::element_size(Array::Type::kBool), 1u);
  EXPECT_EQ(vle::element_size(Array::Type::kInt32), 4u);
  EXPECT_THROW(Array::make(Array::Type::kUInt8, {2, -1}), std::invalid_argument);
}

// --- object_results / pose_results ------------------------------------------------------------------------

vle::Postprocess settings() {
  vle::Postprocess s;
  s.det_top_k = 4;
  s.det_score_threshold = 0.6;
  s.mask_threshold = 0.5;
  s.seg_score_threshold = 0.5;
  s.pose_top_k = 2;
  s.pose_score_threshold = 0.5;
  return s;
}

// Mask logits [chunks, queries, 2, 2]: a constant plane per query (a quarter of an 8 x 8 padded image).
Array constant_masks(int64_t chunks, const std::vector<float>& per_query) {
  std::vector<float> v;
  for (float x : per_query) v.insert(v.end(), 4, x);
  return floats({chunks, static_cast<int64_t>(per_query.size()) / chunks, 2, 2}, v);
}

TEST(ObjectResults, GroundingDetectionTopKThresholdAndMasks) {
  // Q = 4 queries, 3 group columns: grd "ball" (slot 0), det "cat" (slot 1), det "dog" (slot 2).
  const Array logits = floats({1, 4, 3}, {
      -1, 3, -5,   // q0
      2, -5, 1,    // q1
      0.5, 0, -5,  // q2
      2, -5, 4});  // q3
  const Array boxes = floats({1, 4, 4}, {0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.5, 0.5, 0.5, 0.5, 1, 1, 0.75, 0.75, 0.25, 0.5});
  const Array masks = constant_masks(1, {10, 10, -10, -10});
  const std::vector<vle::ObjectGroup> groups = {{"grd", "ball", 0}, {"det", "cat", 1}, {"det", "dog", 2}};
  vle::Result r;
  vle::object_results(logits, boxes, masks, groups, 3, {8, 8}, 8, 8, settings(), r);

  // [GRD] first: the first of the two best queries (q1 and q3 both have logit 2), its float64 sigmoid.
  ASSERT_EQ(r.detections.size(), 4u);
  EXPECT_EQ(r.detections[0].kind, "grd");
  EXPECT_EQ(r.detections[0].label, "ball");
  EXPECT_EQ(r.detections[0].query_index, 1);
  EXPECT_EQ(r.detections[0].score, 1.0 / (1.0 + std::exp(-2.0)));
  EXPECT_EQ(r.detections[0].box_xyxy, (std::array<double, 4>{0.0, 0.0, 4.0, 4.0}));
  EXPECT_EQ(count_true(r.detections[0].mask), 64);
  // Then the [DET] top-k over (query, group), best first; sigmoid(0) = 0.5 for cat q2 is under 0.6.
  EXPECT_EQ(r.detections[1].label, "dog");
  EXPECT_EQ(r.detections[1].query_index, 3);
  EXPECT_EQ(r.detections[1].score, static_cast<double>(1.0f / (1.0f + std::exp(-4.0f))));
  EXPECT_EQ(r.detections[1].box_xyxy, (std::array<double, 4>{5.0, 4.0, 7.0, 8.0}));
  EXPECT_EQ(count_true(r.detections[1].mask), 0);
  EXPECT_EQ(r.detections[2].label, "cat");
  EXPECT_EQ(r.detections[2].query_index, 0);
  EXPECT_EQ(r.detections[2].box_xyxy, (std::array<double, 4>{2.0, 2.0, 6.0, 6.0}));
  EXPECT_EQ(r.detections[3].label, "dog");
  EXPECT_EQ(r.detections[3].query_index, 1);
  for (const auto& d : r.detections) EXPECT_EQ(d.mask.shape, (std::vector<int64_t>{8, 8}));
  EXPECT_FALSE(r.has_segmentation);

  // A tighter top-k keeps the best two only.
  vle::Postprocess two = settings();
  two.det_top_k = 2;
  vle::Result r2;
  vle::object_results(logits, boxes, masks, groups, 3, {8, 8}, 8, 8, two, r2);
  ASSERT_EQ(r2.detections.size(), 3u);
  EXPECT_EQ(r2.detections[2].label, "cat");
}

TEST(ObjectResults, ClassAwareNms) {
  // One det group: q0 and q1 overlap (same box), q2 is elsewhere; a second label on q1's box survives.
  const Array logits = floats({1, 3, 2}, {3, -9, 2, 1, 1, -9});
  const Array boxes = floats({1, 3, 4}, {0.3, 0.3, 0.2, 0.2, 0.3, 0.3, 0.2, 0.2, 0.8, 0.8, 0.2, 0.2});
  const Array masks = constant_masks(1, {1, 1, 1});
  vle::Postprocess s = settings();
  s.det_score_threshold = 0.6;
  s.nms_iou = 0.5;
  vle::Result r;
  vle::object_results(logits, boxes, masks, {{"det", "cat", 0}, {"det", "dog", 1}}, 2, {8, 8}, 8, 8, s, r);
  // Top-k order: cat q0, cat q1, then the tie sigmoid(1) to the lower class: cat q2, dog q1. NMS drops
  // cat q1 (the box of cat q0) and keeps dog q1 on the same box: another label.
  ASSERT_EQ(r.detections.size(), 3u);
  EXPECT_EQ(r.detections[0].label, "cat");
  EXPECT_EQ(r.detections[0].query_index, 0);
  EXPECT_EQ(r.detections[1].label, "cat");
  EXPECT_EQ(r.detections[1].query_index, 2);
  EXPECT_EQ(r.detections[2].label, "dog");
  EXPECT_EQ(r.detections[2].query_index, 1);
  s.nms_iou.reset();
  vle::Result all;
  vle::object_results(logits, boxes, masks, {{"det", "cat", 0}, {"det", "dog", 1}}, 2, {8, 8}, 8, 8, s, all);
  EXPECT_EQ(all.detections.size(), 4u);
}

TEST(ObjectResults, GroupsInALaterChunk) {
  // max_groups 2: slot 3 is the second call's second column.
  const Array logits = floats({2, 2, 2}, {9, 9, 9, 9, /* chunk 1 */ 0, -1, 0, 5});
  const Array boxes = floats({2, 2, 4}, {0.5, 0.5, 1, 1, 0.5, 0.5, 1, 1, 0.5, 0.5, 1, 1, 0.25, 0.25, 0.5, 0.5});
  const Array masks = constant_masks(2, {-10, -10, -10, 10});
  vle::Result r;
  vle::object_results(logits, boxes, masks, {{"grd", "it", 3}}, 2, {8, 8}, 16, 8, settings(), r);
  ASSERT_EQ(r.detections.size(), 1u);
  EXPECT_EQ(r.detections[0].query_index, 1);
  EXPECT_EQ(r.detections[0].box_xyxy, (std::array<double, 4>{0.0, 0.0, 8.0, 4.0}));  // x * 16, y * 8
  EXPECT_EQ(count_true(r.detections[0].mask), 16 * 8);
  EXPECT_THROW(vle::object_results(logits, boxes, masks, {{"grd", "far", 4}}, 2, {8, 8}, 16, 8, settings(), r),
               vle::InputError);
  EXPECT_THROW(vle::object_results(logits, boxes, masks, {{"box", "odd", 0}}, 2, {8, 8}, 16, 8, settings(), r),
               vle::InputError);
}

TEST(ObjectResults, SemanticMap) {
  // Two [SEG] groups: "wall" scores on q0, whose mask covers everything; "floor" nowhere.
  const Array logits = floats({1, 4, 3}, {9, 5, -5, 9, -9, -9, 9, -9, -9, 9, -9, -9});
  const Array boxes = floats({1, 4, 4}, std::vector<float>(16, 0.5f));
  const Array masks = constant_masks(1, {10, -10, -10, -10});
  vle::Result r;
  vle::object_results(logits, boxes, masks, {{"seg", "wall", 1}, {"seg", "floor", 2}}, 3, {8, 8}, 8, 8,
                      settings(), r);
  EXPECT_TRUE(r.detections.empty());
  ASSERT_TRUE(r.has_segmentation);
  EXPECT_EQ(r.segmentation.labels, (std::vector<std::string>{"wall", "floor"}));
  ASSERT_EQ(r.segmentation.label_map.shape, (std::vector<int64_t>{8, 8}));
  for (int i = 0; i < 64; ++i) EXPECT_EQ(r.segmentation.label_map.as<int32_t>()[i], 0);
  // Above every class's score: -1 everywhere.
  vle::Postprocess high = settings();
  high.seg_score_threshold = 1.5;
  vle::Result none;
  vle::object_results(logits, boxes, masks, {{"seg", "wall", 1}, {"seg", "floor", 2}}, 3, {8, 8}, 8, 8, high,
                      none);
  for (int i = 0; i < 64; ++i) EXPECT_EQ(none.segmentation.label_map.as<int32_t>()[i], -1);
}

TEST(ObjectResults, ShapesAreChecked) {
  const Array logits = floats({1, 2, 2}, {0, 0, 0, 0});
  const Array boxes = floats({1, 3, 4}, std::vector<float>(12, 0.5f));
  const Array masks = constant_masks(1, {0, 0, 0});
  vle::Result r;
  try {
    vle::object_results(logits, boxes, masks, {{"grd", "x", 0}}, 2, {8, 8}, 8, 8, settings(), r);
    FAIL() << "mismatched shapes were accepted";
  } catch (const vle::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("pred_boxes [1, 3, 4]"), std::string::npos) << e.what();
  }
}

TEST(PoseResults, QueryMajorTopKAndKeypointsToPixels) {
  // 3 queries, 100 object slots of which 1 is real; 2 keypoint slots, 1 named.
  std::vector<float> lg(3 * 100, -std::numeric_limits<float>::infinity());
  lg[0] = 2;
  lg[100] = -3;
  lg[200] = 1;
  const Array logits = floats({1, 3, 100}, lg);
  const Array boxes = floats({1, 3, 4}, {0.5, 0.5, 0.25, 0.25, 0, 0, 0, 0, 0.25, 0.25, 0.5, 0.5});
  // x0, y0, x1, y1, v0, v1
  const Array kps = floats({1, 3, 6}, {0.25, 0.5, 0, 0, 0.9, 0, 0, 0, 0, 0, 0, 0, 0.75, 0.125, 0, 0, 0.2, 0});
  vle::Result r;
  vle::pose_results(logits, boxes, kps, {"person"}, {"nose"}, {8, 8}, {8, 8}, 16, 8, settings(), r);
  ASSERT_EQ(r.poses.size(), 2u);
  EXPECT_EQ(r.poses[0].label, "person");
  EXPECT_EQ(r.poses[0].query_index, 0);
  EXPECT_EQ(r.poses[0].score, static_cast<double>(1.0f / (1.0f + std::exp(-2.0f))));
  EXPECT_EQ(r.poses[0].box_xyxy, (std::array<double, 4>{6.0, 3.0, 10.0, 5.0}));  // x * 16, y * 8
  ASSERT_EQ(r.poses[0].keypoints.shape, (std::vector<int64_t>{1, 3}));
  EXPECT_FLOAT_EQ(r.poses[0].keypoints.as<float>()[0], 4.0f);
  EXPECT_FLOAT_EQ(r.poses[0].keypoints.as<float>()[1], 4.0f);
  EXPECT_FLOAT_EQ(r.poses[0].keypoints.as<float>()[2], 0.9f);
  EXPECT_EQ(r.poses[0].keypoint_names, (std::vector<std::string>{"nose"}));
  EXPECT_EQ(r.poses[1].query_index, 2);
  EXPECT_FLOAT_EQ(r.poses[1].keypoints.as<float>()[0], 12.0f);
  EXPECT_FLOAT_EQ(r.poses[1].keypoints.as<float>()[1], 1.0f);
  EXPECT_THROW(vle::pose_results(logits, boxes, kps, {}, {"nose"}, {8, 8}, {8, 8}, 16, 8, settings(), r),
               vle::InputError);
}

// --- images_to_uint8 ------------------------------------------------------------------------------------

TEST(ImagesToUint8, ClipScaleRoundTruncateInFloat32) {
  // [1, 3, 1, 4]: R, G, B planes of 4 pixels.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const Array images = floats({1, 3, 1, 4}, {0.0f, 1.0f, 2.0f, -1.0f, 0.5f, 0.25f, nan, 0.1f,
                                             0.998f, 0.002f, 0.5f / 255, 1.5f / 255});
  const std::vector<Array> out = vle::images_to_uint8(images);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].type, Array::Type::kUInt8);
  EXPECT_EQ(out[0].shape, (std::vector<int64_t>{1, 4, 3}));
  const uint8_t* px = out[0].as<uint8_t>();
  auto expected = [](float v) {  // the same float32 steps, written out
    if (std::isnan(v)) return 0;
    float c = v < 0 ? 0.0f : v > 1 ? 1.0f : v;
    volatile float scaled = c * 255.0f;
    volatile float shifted = scaled + 0.5f;
    return static_cast<int>(shifted);
  };
  const float r[4] = {0.0f, 1.0f, 2.0f, -1.0f}, g[4] = {0.5f, 0.25f, nan, 0.1f},
              b[4] = {0.998f, 0.002f, 0.5f / 255, 1.5f / 255};
  for (int x = 0; x < 4; ++x) {
    EXPECT_EQ(px[x * 3 + 0], expected(r[x])) << x;
    EXPECT_EQ(px[x * 3 + 1], expected(g[x])) << x;
    EXPECT_EQ(px[x * 3 + 2], expected(b[x])) << x;
  }
  EXPECT_EQ(px[0], 0);
  EXPECT_EQ(px[3], 255);
  EXPECT_EQ(px[6], 255);
  EXPECT_EQ(px[9], 0);
  EXPECT_EQ(px[1], 128);  // 127.5 + 0.5
  EXPECT_EQ(px[4], 64);   // 63.75 + 0.5
  EXPECT_EQ(px[7], 0);    // NaN
  EXPECT_EQ(px[10], 26);  // 25.5 + 0.5
  EXPECT_THROW(vle::images_to_uint8(floats({1, 1, 1, 1}, {0})), vle::InputError);
}

// --- vle::Image -----------------------------------------------------------------------------------------

TEST(Image, CopiesConvertsAndBorrows) {
  const uint8_t px[6] = {1, 2, 3, 4, 5, 6};
  const vle::Image rgb = vle::Image::rgb(px, 2, 1);
  EXPECT_EQ(rgb.width(), 2);
  EXPECT_EQ(rgb.height(), 1);
  EXPECT_NE(rgb.data(), px);
  EXPECT_EQ(std::vector<uint8_t>(rgb.data(), rgb.data() + 6), std::vector<uint8_t>(px, px + 6));
  const vle::Image bgr = vle::Image::bgr(px, 2, 1);
  EXPECT_EQ(std::vector<uint8_t>(bgr.data(), bgr.data() + 6), (std::vector<uint8_t>{3, 2, 1, 6, 5, 4}));
  const vle::Image view = vle::Image::view(px, 2, 1);
  EXPECT_EQ(view.data(), px);
  EXPECT_TRUE(vle::Image().empty());
}

TEST(Image, BadPixelsAreInputErrors) {
  const uint8_t px[3] = {0, 0, 0};
  EXPECT_THROW(vle::Image::rgb(nullptr, 1, 1), vle::InputError);
  EXPECT_THROW(vle::Image::view(px, 0, 1), vle::InputError);
  EXPECT_THROW(vle::Image::bgr(px, 1, -2), vle::InputError);
  try {
    vle::Image::rgb(px, 20000, 1);
    FAIL() << "a 20000-pixel side was accepted";
  } catch (const vle::InputError& e) {
    EXPECT_STREQ(e.what(), "Image::rgb: image is 20000x1; the largest side allowed is 16384");
  }
}

TEST(Image, LoadsPngJpegBmpAsRgb) {
  TempDir dir;
  // 2 x 2: gray, gray + alpha, RGB and RGBA PNGs, a BMP; and a JPEG written by Pillow (make_fixtures.py says
  // why not by stb_image_write).
  const uint8_t gray[4] = {0, 85, 170, 255};
  const uint8_t gray_alpha[8] = {10, 255, 20, 0, 30, 128, 40, 7};
  const uint8_t rgb[12] = {255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 8, 7};
  const uint8_t rgba[16] = {255, 0, 0, 1, 0, 255, 0, 2, 0, 0, 255, 3, 9, 8, 7, 4};
  ASSERT_TRUE(stbi_write_png(dir.file("gray.png").c_str(), 2, 2, 1, gray, 2));
  ASSERT_TRUE(stbi_write_png(dir.file("gray_alpha.png").c_str(), 2, 2, 2, gray_alpha, 4));
  ASSERT_TRUE(stbi_write_png(dir.file("rgb.png").c_str(), 2, 2, 3, rgb, 6));
  ASSERT_TRUE(stbi_write_png(dir.file("rgba.png").c_str(), 2, 2, 4, rgba, 8));
  ASSERT_TRUE(stbi_write_bmp(dir.file("rgb.bmp").c_str(), 2, 2, 3, rgb));

  auto pixels = [](const vle::Image& im) {
    return std::vector<uint8_t>(im.data(), im.data() + im.width() * im.height() * 3);
  };
  const vle::Image g = vle::Image::load(dir.file("gray.png"));
  EXPECT_EQ(pixels(g), (std::vector<uint8_t>{0, 0, 0, 85, 85, 85, 170, 170, 170, 255, 255, 255}));
  EXPECT_EQ(pixels(vle::Image::load(dir.file("gray_alpha.png"))),
            (std::vector<uint8_t>{10, 10, 10, 20, 20, 20, 30, 30, 30, 40, 40, 40}));  // alpha dropped
  EXPECT_EQ(pixels(vle::Image::load(dir.file("rgb.png"))), std::vector<uint8_t>(rgb, rgb + 12));
  EXPECT_EQ(pixels(vle::Image::load(dir.file("rgba.png"))), std::vector<uint8_t>(rgb, rgb + 12));
  EXPECT_EQ(pixels(vle::Image::load(dir.file("rgb.bmp"))), std::vector<uint8_t>(rgb, rgb + 12));
  const vle::Image jpg = vle::Image::load(VLE_SOURCE_DIR "/csrc/tests/data/flat_200.jpg");
  EXPECT_EQ(jpg.width(), 16);
  EXPECT_EQ(jpg.height(), 16);
  for (uint8_t v : pixels(jpg)) EXPECT_NEAR(v, 200, 2);  // lossy
}

std::string load_error(const std::string& path) {
  try {
    vle::Image::load(path);
  } catch (const vle::InputError& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Image, LoadErrorsNameTheFile) {
  TempDir dir;
  EXPECT_EQ(load_error(dir.file("missing.png")), "image file not found: " + dir.file("missing.png"));
  std::ofstream(dir.file("notes.png")) << "not an image at all";
  EXPECT_EQ(load_error(dir.file("notes.png")), "cannot read image " + dir.file("notes.png") + ": unknown image type");
  EXPECT_EQ(load_error(dir.path.string()).rfind("cannot read image " + dir.path.string(), 0), 0u);

  // A BMP header that claims 16000 x 16000 (within the side limit, over the pixel limit) and holds no
  // pixels: refused from the header, before decoding.
  std::vector<uint8_t> bmp(54, 0);
  auto put32 = [&](size_t at, uint32_t v) {
    for (int i = 0; i < 4; ++i) bmp[at + i] = static_cast<uint8_t>(v >> (8 * i));
  };
  bmp[0] = 'B';
  bmp[1] = 'M';
  put32(2, 54);
  put32(10, 54);
  put32(14, 40);
  put32(18, 16000);
  put32(22, 16000);
  bmp[26] = 1;
  bmp[28] = 24;
  std::ofstream(dir.file("huge.bmp"), std::ios::binary).write(reinterpret_cast<const char*>(bmp.data()), bmp.size());
  EXPECT_EQ(load_error(dir.file("huge.bmp")), "cannot read image " + dir.file("huge.bmp") +
                                                  ": 16000x16000 is 256000000 pixels; the most allowed is 178956970");
  put32(18, 17000);
  put32(22, 2);
  std::ofstream(dir.file("wide.bmp"), std::ios::binary).write(reinterpret_cast<const char*>(bmp.data()), bmp.size());
  EXPECT_EQ(load_error(dir.file("wide.bmp")),
            "cannot read image " + dir.file("wide.bmp") + ": image is 17000x2; the largest side allowed is 16384");
  // A PNG cut short: stb's reason after the name.
  const uint8_t rgb[12] = {255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 8, 7};
  ASSERT_TRUE(stbi_write_png(dir.file("cut.png").c_str(), 2, 2, 3, rgb, 6));
  std::filesystem::resize_file(dir.file("cut.png"), 40);
  EXPECT_EQ(load_error(dir.file("cut.png")).rfind("cannot read image " + dir.file("cut.png") + ": ", 0), 0u);
}

// --- templates ------------------------------------------------------------------------------------------

TEST(Templates, OfficialTexts) {
  namespace t = vle::templates;
  const t::TaskTemplate det = t::detection({" person", "car\t"});
  EXPECT_EQ(det.question, "Can you analyze the image and identify the person, car present?");
  EXPECT_EQ(det.answer, "Yes, here are the results for person[DET], car[DET] in the image.");
  EXPECT_TRUE(det.history.empty());
  EXPECT_EQ(t::grounding("the red ball").question, "Where can we locate the the red ball in the image?");
  EXPECT_EQ(t::grounding("x").answer, "Yes, it is [GRD].");
  EXPECT_EQ(t::segmentation({"sky"}).answer, "Yes, here are the results for sky[SEG] in the image.");
  const t::TaskTemplate pose = t::pose({"nose", "left eye"});
  ASSERT_EQ(pose.history.size(), 1u);
  EXPECT_EQ(pose.history[0].second, "Yes, here are the results for person[DET] in the image.");
  EXPECT_EQ(pose.answer,
            "Utilizing keypoints detection, the image analysis reveals the location of nose[POSE], left eye[POSE].");
  EXPECT_EQ(t::generation(" a red circle... ").question, "Generate image with caption: a red circle.");
  EXPECT_EQ(t::editing("make it blue.").question, "make it blue.");
  EXPECT_EQ(t::editing("make it blue.").answer, "Here it is [EDIT].");
}

TEST(Templates, NamesAreChecked) {
  namespace t = vle::templates;
  try {
    t::detection({"cat", " \u3000"});
    FAIL() << "an empty name was accepted";
  } catch (const vle::InputError& e) {
    EXPECT_STREQ(e.what(), "expected one or more non-empty names, got ['cat', '']");
  }
  EXPECT_THROW(t::segmentation({}), vle::InputError);
  EXPECT_THROW(t::pose({"nose"}, {}), vle::InputError);
  EXPECT_EQ(vle::utf8::python_repr("it's"), "\"it's\"");
  EXPECT_EQ(vle::utf8::python_repr("a\n\x01\xc2\xa0\\"), "'a\\n\\x01\\xa0\\\\'");
  EXPECT_EQ(vle::utf8::rstrip(vle::utf8::lstrip("\xc2\xa0 caf\xc3\xa9 \n")), "caf\xc3\xa9");
}

}  // namespace
