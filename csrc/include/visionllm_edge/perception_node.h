// A perception node: camera frames in, detections out, at a set rate on the newest frame, with no ROS
// dependency. A ROS 2 package wraps it in a few lines (docs/ros.md): a sensor_msgs/Image callback fills a
// CameraFrame and calls push(); the result callback fills a vision_msgs/Detection2DArray; a SetPrompt-like
// service calls set_prompt().
//
//   vle::NodeOptions options;  options.rate_hz = 5;  options.prompt = vle::NodePrompt::detect({"person"});
//   vle::PerceptionNode node(vle::Pipeline::load("artifact/"), options,
//                            [](const vle::NodeOutput& out) { /* publish */ },
//                            [](const vle::NodeFailure& f) { /* log f.message */ });
//   node.start();  ...  node.push(std::move(frame));  ...  node.stop();
//
// Scheduling: push() keeps one pending frame; a frame arriving while another is pending replaces it (the
// stale one is dropped and counted, never queued). The worker thread runs the task on the pending frame at
// most rate_hz times a second, so the answer is always about the newest picture. The task runs on the
// Pipeline's request loop, which reuses the KV rows of the prompt's image-independent prefix (the system
// prompt) across frames (`stats["reused_rows"]` in the output).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "visionllm_edge/errors.h"
#include "visionllm_edge/pipeline.h"
#include "visionllm_edge/result.h"

namespace vle {

// std_msgs/Header.
struct FrameHeader {
  int32_t stamp_sec = 0;
  uint32_t stamp_nanosec = 0;
  std::string frame_id;
};

// sensor_msgs/Image: `height` rows of `step` bytes each (step >= width * channels; the bytes past a row's
// pixels are padding). Encodings: rgb8, bgr8, rgba8, bgra8, mono8 (is_bigendian does not matter at 8 bits).
struct CameraFrame {
  FrameHeader header;
  uint32_t height = 0;
  uint32_t width = 0;
  std::string encoding;
  uint8_t is_bigendian = 0;
  uint32_t step = 0;
  std::vector<uint8_t> data;
};

// The supported encodings, for messages and for callers that want to check first.
const std::vector<std::string>& camera_encodings();
// Checks a frame (encoding, sizes, step, data length): an InputError naming what is wrong.
void check_camera_frame(const CameraFrame& frame);
// The frame's pixels as an RGB Image (copied; alpha dropped, mono replicated), after check_camera_frame.
Image camera_frame_rgb(const CameraFrame& frame);

// What the node asks about every frame: the SetPrompt call's payload.
struct NodePrompt {
  enum class Task { kDetect, kGround, kSegment, kPose, kQuestion };
  Task task = Task::kDetect;
  std::vector<std::string> names;               // detect, segment: class names; pose: keypoint names
  std::vector<std::string> objects{"person"};   // pose: the objects whose keypoints are wanted
  std::string text;                             // ground: the phrase; question: the question
  int64_t max_new_tokens = 64;                  // question: the answer's length limit

  static NodePrompt detect(std::vector<std::string> classes);
  static NodePrompt ground(std::string phrase);
  static NodePrompt segment(std::vector<std::string> classes);
  static NodePrompt pose(std::vector<std::string> keypoint_names, std::vector<std::string> objects = {"person"});
  static NodePrompt question(std::string text, int64_t max_new_tokens = 64);
};
// "detect" "ground" "segment" "pose" "question" and back; an unknown name is an InputError naming the known.
NodePrompt::Task node_task(const std::string& name);
const char* node_task_name(NodePrompt::Task task);
// An InputError when the prompt cannot run (no classes to detect, an empty phrase or question, ...).
void check_node_prompt(const NodePrompt& prompt);

// vision_msgs/Detection2D, with the pose's keypoints and the segment's mask beside it. detect and ground: one
// per detection; pose: one per pose (its box and keypoints); segment: one per class of the semantic map that
// covers a pixel (the box is the region's pixel extent); question: none.
struct NodeDetection {
  struct {
    double x = 0, y = 0, theta = 0;             // the box's centre in the frame's pixels; theta is always 0
  } center;
  double size_x = 0, size_y = 0;                // width and height in pixels
  std::string class_id;                         // the label
  double score = 0;                             // segment: 1 (a semantic map scores no region)
  std::string id;                               // the detection's index in this output, as text
  struct Keypoint {
    std::string name;
    double x = 0, y = 0;                        // the frame's pixels
    double score = 0;                           // the keypoint decoder's visibility
  };
  std::vector<Keypoint> keypoints;              // pose: one per keypoint name; otherwise empty
  CameraFrame mask;                             // segment: mono8, the frame's size, 255 where the semantic
                                                // map has this class, 0 elsewhere; otherwise empty (height 0)
};

struct NodeCounters {
  uint64_t received = 0;   // frames push() accepted
  uint64_t processed = 0;  // frames the task ran on (successfully or not)
  uint64_t dropped = 0;    // frames replaced by a newer one before they ran
  uint64_t failed = 0;     // runs, or output callbacks, that threw (reported through the failure callback)
};

// vision_msgs/Detection2DArray (header = the frame's), plus the answer and the node's bookkeeping.
struct NodeOutput {
  FrameHeader header;
  NodePrompt::Task task = NodePrompt::Task::kDetect;
  std::vector<NodeDetection> detections;
  std::string answer;                           // question: the answer's text; otherwise the forced answer
  double latency_ms = 0;                        // from push() of the frame to this output
  double run_ms = 0;                            // the task alone
  NodeCounters counters;                        // after this frame
  std::map<std::string, double> stats;          // the request loop's counters (reused_rows, ...)
};

struct NodeFailure {
  FrameHeader header;                           // the frame whose run failed
  std::string message;
};

struct NodeOptions {
  double rate_hz = 10;                          // at most this many runs a second; 0: as fast as frames come
  NodePrompt prompt;
};

// Converts one request's Result into the node's output for a frame of width x height (boxes and keypoints are
// in the original image's pixels already; masks become mono8). Public for tests and for callers with their
// own scheduling.
NodeOutput node_output(const Result& result, const NodePrompt& prompt, const CameraFrame& frame);

class PerceptionNode {
 public:
  // Runs the prompt's task on one frame's RGB image.
  using Runner = std::function<Result(const Image& image, const NodePrompt& prompt)>;
  using OutputCallback = std::function<void(const NodeOutput& output)>;
  using FailureCallback = std::function<void(const NodeFailure& failure)>;

  // Production: the task runs on `pipeline` (detect, ground, segment, pose, or a question through run()).
  PerceptionNode(Pipeline pipeline, NodeOptions options, OutputCallback on_output, FailureCallback on_failure = nullptr);
  // Any runner (tests use a fake one).
  PerceptionNode(Runner runner, NodeOptions options, OutputCallback on_output, FailureCallback on_failure = nullptr);
  PerceptionNode(const PerceptionNode&) = delete;
  PerceptionNode& operator=(const PerceptionNode&) = delete;
  ~PerceptionNode();  // stops the worker

  // Checks the frame (an InputError, nothing else changes) and makes it the pending one.
  void push(CameraFrame frame);
  // Changes the task from the next frame the node takes on (a run in progress keeps its prompt).
  void set_prompt(NodePrompt prompt);
  NodePrompt prompt() const;

  // The worker thread: start() when stopped; stop() wakes and joins it (a run in progress finishes first).
  // The pending frame stays pending across stop() and start().
  void start();
  void stop();
  bool running() const;

  // Runs the pending frame now, on the calling thread, ignoring the rate; false when none is pending. Runs
  // never overlap: this waits for the worker's run to finish.
  bool process_pending();

  NodeCounters counters() const;

 private:
  struct Pending {
    CameraFrame frame;
    std::chrono::steady_clock::time_point received;
  };
  void worker();
  void run_one(Pending pending, const NodePrompt& prompt);
  void fail(const FrameHeader& header, std::string message, bool count_processed);

  Runner runner_;
  OutputCallback on_output_;
  FailureCallback on_failure_;
  std::chrono::steady_clock::duration period_{};

  mutable std::mutex mutex_;             // guards everything below
  std::condition_variable wake_;
  std::optional<Pending> pending_;
  NodePrompt prompt_;
  NodeCounters counters_;
  bool stopping_ = false;
  std::thread thread_;
  std::mutex run_mutex_;                 // one run at a time (the worker's and process_pending's)
};

}  // namespace vle
