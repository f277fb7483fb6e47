// The perception node (visionllm_edge/perception_node.h) with synthetic frames and a fake runner: every
// encoding and its padding to RGB, the named errors of a bad frame or prompt, Result to the
// Detection2DArray-shaped output, and the scheduling (newest frame, dropping, rate, set_prompt on the next
// frame, stop/start, a throwing run reported and survived). The node on a real Pipeline is tests/test_node.py.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "visionllm_edge/perception_node.h"

namespace {

using Clock = std::chrono::steady_clock;
using vle::CameraFrame;
using vle::NodeOutput;
using vle::NodePrompt;
using vle::PerceptionNode;

// A W x H rgb8 frame whose every byte is `value` (the fake runner reads it back to know the frame), stamped
// `value` seconds.
CameraFrame solid_frame(uint8_t value, uint32_t width = 4, uint32_t height = 3) {
  CameraFrame f;
  f.header.stamp_sec = value;
  f.header.stamp_nanosec = 1000u * value;
  f.header.frame_id = "camera";
  f.width = width;
  f.height = height;
  f.encoding = "rgb8";
  f.step = width * 3;
  f.data.assign(static_cast<size_t>(f.step) * height, value);
  return f;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const vle::InputError& e) {
    return e.what();
  }
  return "(no InputError)";
}

// Polls until `done` or 5 s pass.
bool eventually(const std::function<bool()>& done) {
  const auto until = Clock::now() + std::chrono::seconds(5);
  while (Clock::now() < until) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return done();
}

// A runner that records what it ran (the frame's value, the prompt, when) and, while `hold` is set, blocks.
struct FakeRunner {
  std::mutex mutex;
  std::condition_variable changed;
  std::vector<int> values;
  std::vector<NodePrompt> prompts;
  std::vector<Clock::time_point> starts;
  bool hold = false;
  bool running = false;
  int throw_on = -1;  // a frame value whose run throws

  vle::Result run(const vle::Image& image, const NodePrompt& prompt) {
    std::unique_lock<std::mutex> lock(mutex);
    const int value = image.data()[0];
    values.push_back(value);
    prompts.push_back(prompt);
    starts.push_back(Clock::now());
    running = true;
    changed.notify_all();
    changed.wait(lock, [&] { return !hold; });
    running = false;
    if (value == throw_on) throw vle::EngineError("fake run failed on frame " + std::to_string(value));
    vle::Result r;
    r.text = "frame " + std::to_string(value);
    vle::Detection d;
    d.label = prompt.names.empty() ? prompt.text : prompt.names[0];
    d.score = 0.5;
    d.box_xyxy = {1, 1, 2, 2};
    r.detections.push_back(d);
    r.stats["reused_rows"] = 7;
    return r;
  }
  PerceptionNode::Runner runner() {
    return [this](const vle::Image& image, const NodePrompt& prompt) { return run(image, prompt); };
  }
  void set_hold(bool on) {
    std::lock_guard<std::mutex> lock(mutex);
    hold = on;
    changed.notify_all();
  }
  void wait_running() {
    std::unique_lock<std::mutex> lock(mutex);
    changed.wait(lock, [&] { return running; });
  }
  std::vector<int> seen() {
    std::lock_guard<std::mutex> lock(mutex);
    return values;
  }
};

// The outputs the node delivered, thread-safe.
struct Outputs {
  std::mutex mutex;
  std::vector<NodeOutput> outputs;
  std::vector<vle::NodeFailure> failures;
  PerceptionNode::OutputCallback on_output() {
    return [this](const NodeOutput& o) {
      std::lock_guard<std::mutex> lock(mutex);
      outputs.push_back(o);
    };
  }
  PerceptionNode::FailureCallback on_failure() {
    return [this](const vle::NodeFailure& f) {
      std::lock_guard<std::mutex> lock(mutex);
      failures.push_back(f);
    };
  }
  size_t count() {
    std::lock_guard<std::mutex> lock(mutex);
    return outputs.size() + failures.size();
  }
};

vle::NodeOptions options(double rate_hz = 0) {
  vle::NodeOptions o;
  o.rate_hz = rate_hz;
  o.prompt = NodePrompt::detect({"circle"});
  return o;
}

// --- frames -----------------------------------------------------------------------------------------------

TEST(CameraFrame, EveryEncodingWithRowPaddingGivesTheSameRgb) {
  const uint32_t w = 3, h = 2;
  std::vector<uint8_t> rgb(w * h * 3);
  for (size_t i = 0; i < rgb.size(); ++i) rgb[i] = static_cast<uint8_t>(10 + 7 * i);
  struct Case {
    std::string encoding;
    int channels;
  };
  for (const Case& c : {Case{"rgb8", 3}, Case{"bgr8", 3}, Case{"rgba8", 4}, Case{"bgra8", 4}}) {
    CameraFrame f;
    f.encoding = c.encoding;
    f.width = w;
    f.height = h;
    f.step = w * c.channels + 5;  // padding the conversion must skip
    f.data.assign(static_cast<size_t>(f.step) * h, 0xEE);
    const bool bgr = c.encoding[0] == 'b';
    for (uint32_t y = 0; y < h; ++y) {
      for (uint32_t x = 0; x < w; ++x) {
        const uint8_t* px = &rgb[(y * w + x) * 3];
        uint8_t* dst = &f.data[y * f.step + x * c.channels];
        dst[0] = bgr ? px[2] : px[0];
        dst[1] = px[1];
        dst[2] = bgr ? px[0] : px[2];
        if (c.channels == 4) dst[3] = 0x11;
      }
    }
    const vle::Image img = vle::camera_frame_rgb(f);
    ASSERT_EQ(img.width(), w);
    ASSERT_EQ(img.height(), h);
    EXPECT_EQ(std::vector<uint8_t>(img.data(), img.data() + rgb.size()), rgb) << c.encoding;
  }
  CameraFrame mono;
  mono.encoding = "mono8";
  mono.width = w;
  mono.height = h;
  mono.step = w + 1;
  mono.data = {1, 2, 3, 0xEE, 4, 5, 6, 0xEE};
  const vle::Image img = vle::camera_frame_rgb(mono);
  EXPECT_EQ(std::vector<uint8_t>(img.data(), img.data() + w * h * 3),
            (std::vector<uint8_t>{1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6}));
}

TEST(CameraFrame, BadFramesAreNamedInputErrors) {
  CameraFrame f = solid_frame(1);
  f.encoding = "rgb16";
  std::string m = error_of([&] { vle::check_camera_frame(f); });
  EXPECT_NE(m.find("'rgb16' is not supported; supported: rgb8, bgr8, rgba8, bgra8, mono8"), std::string::npos) << m;
  EXPECT_NE(m.find("frame_id 'camera'"), std::string::npos) << m;

  f = solid_frame(1);
  f.step = 11;  // 4 pixels x 3 bytes = 12
  m = error_of([&] { vle::check_camera_frame(f); });
  EXPECT_NE(m.find("step 11 is less than width 4 x 3 bytes (rgb8) = 12"), std::string::npos) << m;

  f = solid_frame(1);
  f.data.pop_back();
  m = error_of([&] { vle::check_camera_frame(f); });
  EXPECT_NE(m.find("data has 35 bytes, expected at least step 12 x height 3 = 36"), std::string::npos) << m;

  f = solid_frame(1);
  f.width = 0;
  m = error_of([&] { vle::check_camera_frame(f); });
  EXPECT_NE(m.find("width and height must be positive, got 0x3"), std::string::npos) << m;

  EXPECT_NO_THROW(vle::check_camera_frame(solid_frame(1)));
}

TEST(PerceptionNode, ABadFrameIsRefusedAtPushAndCountsNothing) {
  FakeRunner fake;
  Outputs got;
  PerceptionNode node(fake.runner(), options(), got.on_output());
  CameraFrame bad = solid_frame(1);
  bad.encoding = "yuv422";
  EXPECT_THROW(node.push(bad), vle::InputError);
  EXPECT_EQ(node.counters().received, 0u);
  EXPECT_FALSE(node.process_pending());
}

// --- prompts ----------------------------------------------------------------------------------------------

TEST(NodePrompt, TaskNamesAndBadPromptsAreNamedErrors) {
  for (const char* name : {"detect", "ground", "segment", "pose", "question"}) {
    EXPECT_STREQ(vle::node_task_name(vle::node_task(name)), name);
  }
  EXPECT_NE(error_of([] { vle::node_task("track"); }).find("unknown task 'track'; known: detect, ground, segment, pose, question"),
            std::string::npos);
  EXPECT_NE(error_of([] { vle::check_node_prompt(NodePrompt::detect({})); }).find("node prompt (detect): names"),
            std::string::npos);
  EXPECT_NE(error_of([] { vle::check_node_prompt(NodePrompt::segment({"a", ""})); }).find("has an empty name: [a, ]"),
            std::string::npos);
  EXPECT_NE(error_of([] { vle::check_node_prompt(NodePrompt::ground("")); }).find("node prompt (ground): text is empty"),
            std::string::npos);
  EXPECT_NE(error_of([] { vle::check_node_prompt(NodePrompt::pose({"nose"}, {})); }).find("objects is empty"),
            std::string::npos);
  EXPECT_NE(error_of([] { vle::check_node_prompt(NodePrompt::question("What?", 0)); })
                .find("max_new_tokens must be positive, got 0"),
            std::string::npos);
  EXPECT_NO_THROW(vle::check_node_prompt(NodePrompt::pose({"nose"})));
}

TEST(PerceptionNode, ConstructorAndSetPromptRefuseBadSettings) {
  FakeRunner fake;
  Outputs got;
  EXPECT_NE(error_of([&] { PerceptionNode(fake.runner(), options(-1), got.on_output()); }).find("rate_hz must be"),
            std::string::npos);
  vle::NodeOptions empty = options();
  empty.prompt = NodePrompt::detect({});
  EXPECT_THROW(PerceptionNode(fake.runner(), empty, got.on_output()), vle::InputError);
  EXPECT_THROW(PerceptionNode(PerceptionNode::Runner(), options(), got.on_output()), vle::InputError);

  PerceptionNode node(fake.runner(), options(), got.on_output());
  EXPECT_THROW(node.set_prompt(NodePrompt::ground("")), vle::InputError);
  EXPECT_EQ(node.prompt().task, NodePrompt::Task::kDetect);  // the refused prompt changed nothing
  EXPECT_EQ(node.prompt().names, std::vector<std::string>{"circle"});
}

// --- results ----------------------------------------------------------------------------------------------

TEST(NodeOutput, BoxesBecomeCentreAndSizeInPixelsWithTheFramesHeader) {
  vle::Result r;
  vle::Detection d;
  d.label = "cat";
  d.score = 0.75;
  d.box_xyxy = {10.5, 20, 50, 80.25};
  d.mask = vle::Array::make(vle::Array::Type::kBool, {3, 4});
  r.detections = {d};
  r.text = "cat[DET]";
  r.stats["reused_rows"] = 12;
  const CameraFrame frame = solid_frame(9);
  const NodeOutput out = vle::node_output(r, NodePrompt::detect({"cat"}), frame);
  EXPECT_EQ(out.header.stamp_sec, 9);
  EXPECT_EQ(out.header.stamp_nanosec, 9000u);
  EXPECT_EQ(out.header.frame_id, "camera");
  ASSERT_EQ(out.detections.size(), 1u);
  const vle::NodeDetection& got = out.detections[0];
  EXPECT_DOUBLE_EQ(got.center.x, 30.25);
  EXPECT_DOUBLE_EQ(got.center.y, 50.125);
  EXPECT_DOUBLE_EQ(got.center.theta, 0);
  EXPECT_DOUBLE_EQ(got.size_x, 39.5);
  EXPECT_DOUBLE_EQ(got.size_y, 60.25);
  // Back to corners: the conversion loses nothing.
  EXPECT_DOUBLE_EQ(got.center.x - got.size_x / 2, 10.5);
  EXPECT_DOUBLE_EQ(got.center.y + got.size_y / 2, 80.25);
  EXPECT_EQ(got.class_id, "cat");
  EXPECT_DOUBLE_EQ(got.score, 0.75);
  EXPECT_EQ(got.id, "0");
  EXPECT_EQ(got.mask.height, 0u);  // a detection request carries no masks
  EXPECT_TRUE(got.keypoints.empty());
  EXPECT_EQ(out.answer, "cat[DET]");
  EXPECT_EQ(out.stats.at("reused_rows"), 12);
}

TEST(NodeOutput, SegmentationClassesBecomeMono8MasksWithTheirPixelExtent) {
  // A 3 x 4 semantic map: class 0 ("sky") in two pixels, class 2 ("road") in one, class 1 ("grass") nowhere.
  vle::Result r;
  r.has_segmentation = true;
  r.segmentation.labels = {"sky", "grass", "road"};
  r.segmentation.label_map = vle::Array::make(vle::Array::Type::kInt32, {3, 4});
  int32_t* map = r.segmentation.label_map.as<int32_t>();
  std::fill(map, map + 12, -1);
  map[1 * 4 + 1] = 0;  // (x 1, y 1)
  map[2 * 4 + 3] = 0;  // (x 3, y 2)
  map[0 * 4 + 2] = 2;  // (x 2, y 0)
  const NodeOutput out = vle::node_output(r, NodePrompt::segment({"sky", "grass", "road"}), solid_frame(2));
  ASSERT_EQ(out.detections.size(), 2u);  // grass covers nothing
  const vle::NodeDetection& sky = out.detections[0];
  EXPECT_EQ(sky.class_id, "sky");
  EXPECT_EQ(sky.id, "0");
  // Pixels x 1..3, y 1..2 cover [1, 4) x [1, 3).
  EXPECT_DOUBLE_EQ(sky.center.x, 2.5);
  EXPECT_DOUBLE_EQ(sky.center.y, 2);
  EXPECT_DOUBLE_EQ(sky.size_x, 3);
  EXPECT_DOUBLE_EQ(sky.size_y, 2);
  const vle::NodeDetection& road = out.detections[1];
  EXPECT_EQ(road.class_id, "road");
  EXPECT_EQ(road.id, "1");
  EXPECT_DOUBLE_EQ(road.size_x, 1);
  EXPECT_DOUBLE_EQ(road.center.x, 2.5);
  EXPECT_DOUBLE_EQ(road.center.y, 0.5);
  for (const vle::NodeDetection* d : {&sky, &road}) {
    EXPECT_EQ(d->mask.encoding, "mono8");
    EXPECT_EQ(d->mask.width, 4u);
    EXPECT_EQ(d->mask.height, 3u);
    EXPECT_EQ(d->mask.step, 4u);
    EXPECT_EQ(d->mask.header.stamp_sec, 2);
  }
  std::vector<uint8_t> want(12, 0);
  want[5] = want[11] = 255;
  EXPECT_EQ(sky.mask.data, want);
  want.assign(12, 0);
  want[2] = 255;
  EXPECT_EQ(road.mask.data, want);

  // A map of another size than the frame is a decoder that disagrees with the request: a named error.
  r.segmentation.label_map = vle::Array::make(vle::Array::Type::kInt32, {2, 4});
  try {
    vle::node_output(r, NodePrompt::segment({"sky"}), solid_frame(2));
    ADD_FAILURE() << "no error";
  } catch (const vle::EngineError& e) {
    EXPECT_NE(std::string(e.what()).find("the semantic map is 2x4, expected the frame's 3x4"), std::string::npos)
        << e.what();
  }
}

TEST(NodeOutput, PosesBecomeDetectionsWithNamedKeypoints) {
  vle::Result r;
  vle::Detection person;  // the [DET] object the pose answer names: not what a pose request reports
  person.label = "person";
  r.detections = {person};
  vle::Pose p;
  p.label = "person";
  p.score = 0.5;
  p.box_xyxy = {0, 10, 20, 50};
  p.keypoint_names = {"nose", "left eye"};
  p.keypoints = vle::Array::make(vle::Array::Type::kFloat32, {2, 3});
  const float kp[] = {1.5f, 2.5f, 0.25f, 3.5f, 4.5f, 0.75f};
  std::copy(kp, kp + 6, p.keypoints.as<float>());
  r.poses = {p};
  const NodeOutput out = vle::node_output(r, NodePrompt::pose({"nose", "left eye"}), solid_frame(1));
  ASSERT_EQ(out.detections.size(), 1u);
  const vle::NodeDetection& d = out.detections[0];
  EXPECT_DOUBLE_EQ(d.center.x, 10);
  EXPECT_DOUBLE_EQ(d.center.y, 30);
  EXPECT_DOUBLE_EQ(d.size_x, 20);
  EXPECT_DOUBLE_EQ(d.size_y, 40);
  ASSERT_EQ(d.keypoints.size(), 2u);
  EXPECT_EQ(d.keypoints[1].name, "left eye");
  EXPECT_DOUBLE_EQ(d.keypoints[1].x, 3.5);
  EXPECT_DOUBLE_EQ(d.keypoints[1].y, 4.5);
  EXPECT_DOUBLE_EQ(d.keypoints[1].score, 0.75);
}

// --- scheduling -------------------------------------------------------------------------------------------

TEST(PerceptionNode, OnlyTheNewestFrameRunsAndTheStaleOnesAreCounted) {
  FakeRunner fake;
  Outputs got;
  PerceptionNode node(fake.runner(), options(), got.on_output());
  for (uint8_t v : {1, 2, 3}) node.push(solid_frame(v));
  EXPECT_TRUE(node.process_pending());
  EXPECT_FALSE(node.process_pending());  // nothing is queued behind the newest frame
  EXPECT_EQ(fake.seen(), std::vector<int>{3});
  ASSERT_EQ(got.outputs.size(), 1u);
  const NodeOutput& out = got.outputs[0];
  EXPECT_EQ(out.header.stamp_sec, 3);
  EXPECT_EQ(out.counters.received, 3u);
  EXPECT_EQ(out.counters.dropped, 2u);
  EXPECT_EQ(out.counters.processed, 1u);
  EXPECT_EQ(out.stats.at("reused_rows"), 7);
  EXPECT_GE(out.latency_ms, out.run_ms);
  EXPECT_GE(out.run_ms, 0);
}

TEST(PerceptionNode, SetPromptTakesEffectFromTheNextFrameNotTheRunningOne) {
  FakeRunner fake;
  Outputs got;
  PerceptionNode node(fake.runner(), options(), got.on_output());
  node.start();
  fake.set_hold(true);
  node.push(solid_frame(1));
  fake.wait_running();
  node.set_prompt(NodePrompt::ground("the red circle"));  // while frame 1 runs
  fake.set_hold(false);
  ASSERT_TRUE(eventually([&] { return got.count() == 1; }));
  node.push(solid_frame(2));
  ASSERT_TRUE(eventually([&] { return got.count() == 2; }));
  node.stop();
  ASSERT_EQ(fake.prompts.size(), 2u);
  EXPECT_EQ(fake.prompts[0].task, NodePrompt::Task::kDetect);
  EXPECT_EQ(fake.prompts[1].task, NodePrompt::Task::kGround);
  EXPECT_EQ(fake.prompts[1].text, "the red circle");
  EXPECT_EQ(got.outputs[0].task, NodePrompt::Task::kDetect);
  EXPECT_EQ(got.outputs[1].task, NodePrompt::Task::kGround);
  EXPECT_EQ(got.outputs[1].detections.at(0).class_id, "the red circle");
}

TEST(PerceptionNode, FramesArrivingDuringARunReplaceEachOther) {
  FakeRunner fake;
  Outputs got;
  PerceptionNode node(fake.runner(), options(), got.on_output());
  node.start();
  fake.set_hold(true);
  node.push(solid_frame(1));
  fake.wait_running();
  for (uint8_t v : {2, 3, 4}) node.push(solid_frame(v));
  fake.set_hold(false);
  ASSERT_TRUE(eventually([&] { return got.count() == 2; }));
  node.stop();
  EXPECT_EQ(fake.seen(), (std::vector<int>{1, 4}));
  const vle::NodeCounters c = node.counters();
  EXPECT_EQ(c.received, 4u);
  EXPECT_EQ(c.dropped, 2u);
  EXPECT_EQ(c.processed, 2u);
  EXPECT_EQ(c.received, c.processed + c.dropped);
}

TEST(PerceptionNode, RunsNoMoreOftenThanTheRate) {
  FakeRunner fake;
  Outputs got;
  const double rate = 20;  // a run every 50 ms at most
  PerceptionNode node(fake.runner(), options(rate), got.on_output());
  node.start();
  const auto begin = Clock::now();
  uint8_t v = 0;
  while (Clock::now() - begin < std::chrono::milliseconds(400)) {
    node.push(solid_frame(++v));
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  node.stop();
  std::vector<Clock::time_point> starts;
  {
    std::lock_guard<std::mutex> lock(fake.mutex);
    starts = fake.starts;
  }
  ASSERT_GE(starts.size(), 2u) << "the worker ran " << starts.size() << " time(s) in 400 ms at 20 Hz";
  EXPECT_LE(starts.size(), 9u);  // 400 ms at 20 Hz: 8 slots, plus the first at once
  // The node spaces the runs' starts by 50 ms; the fake records its start a little later, by an amount that
  // varies with the machine's load, hence the 5 ms of slack (without the rate the gaps are ~2 ms).
  for (size_t i = 1; i < starts.size(); ++i) {
    const double gap = std::chrono::duration<double, std::milli>(starts[i] - starts[i - 1]).count();
    EXPECT_GE(gap, 45.0) << "runs " << i - 1 << " and " << i;
  }
  const vle::NodeCounters c = node.counters();
  EXPECT_EQ(c.processed, starts.size());
  EXPECT_GT(c.dropped, 0u);
  // Every frame was either run, dropped, or is still pending (at most one).
  EXPECT_LE(c.received - c.processed - c.dropped, 1u);
}

TEST(PerceptionNode, AThrowingRunIsReportedAndTheWorkerGoesOn) {
  FakeRunner fake;
  fake.throw_on = 2;
  Outputs got;
  PerceptionNode node(fake.runner(), options(), got.on_output(), got.on_failure());
  node.start();
  for (uint8_t v : {1, 2, 3}) {
    node.push(solid_frame(v));
    ASSERT_TRUE(eventually([&] { return got.count() == v; })) << "frame " << int(v);
  }
  node.stop();
  ASSERT_EQ(got.failures.size(), 1u);
  EXPECT_EQ(got.failures[0].header.stamp_sec, 2);
  EXPECT_EQ(got.failures[0].message, "fake run failed on frame 2");
  ASSERT_EQ(got.outputs.size(), 2u);
  EXPECT_EQ(got.outputs[1].header.stamp_sec, 3);
  EXPECT_EQ(got.outputs[1].counters.failed, 1u);
  EXPECT_EQ(got.outputs[1].counters.processed, 3u);
}

TEST(PerceptionNode, AThrowingOutputCallbackOrStopFromItIsReported) {
  FakeRunner fake;
  std::vector<std::string> failures;
  PerceptionNode* self = nullptr;
  PerceptionNode node(
      fake.runner(), options(), [&](const NodeOutput&) { self->stop(); },
      [&](const vle::NodeFailure& f) { failures.push_back(f.message); });
  self = &node;
  node.start();
  node.push(solid_frame(1));
  ASSERT_TRUE(eventually([&] { return node.counters().failed == 1; }));
  EXPECT_TRUE(node.running());
  node.stop();
  ASSERT_EQ(failures.size(), 1u);
  EXPECT_NE(failures[0].find("output callback: perception node: stop() was called from the node's own callback"),
            std::string::npos)
      << failures[0];
}

TEST(PerceptionNode, StopKeepsThePendingFrameForTheNextStart) {
  FakeRunner fake;
  Outputs got;
  PerceptionNode node(fake.runner(), options(), got.on_output());
  EXPECT_FALSE(node.running());
  node.start();
  node.start();  // a second start is a no-op, not a second worker
  EXPECT_TRUE(node.running());
  node.push(solid_frame(1));
  ASSERT_TRUE(eventually([&] { return got.count() == 1; }));
  node.stop();
  EXPECT_FALSE(node.running());
  node.push(solid_frame(2));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(got.count(), 1u);  // stopped: the frame waits
  node.start();
  ASSERT_TRUE(eventually([&] { return got.count() == 2; }));
  node.stop();
  EXPECT_EQ(fake.seen(), (std::vector<int>{1, 2}));
}

TEST(PerceptionNode, TheDestructorStopsARunningWorker) {
  FakeRunner fake;
  Outputs got;
  {
    PerceptionNode node(fake.runner(), options(1), got.on_output());
    node.start();
    node.push(solid_frame(1));
    ASSERT_TRUE(eventually([&] { return got.count() == 1; }));
    node.push(solid_frame(2));  // waits for the 1 Hz slot; the destructor must not wait for it
  }
  EXPECT_EQ(fake.seen(), std::vector<int>{1});
}

}  // namespace
