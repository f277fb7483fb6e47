// The perception node (visionllm_edge/perception_node.h): camera frames checked and converted, the newest
// one run at a set rate on a worker thread, results shaped like vision_msgs/Detection2DArray.
#include "visionllm_edge/perception_node.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <exception>
#include <memory>
#include <utility>

namespace vle {

namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double, std::milli>(to - from).count();
}

// Bytes per pixel, and where R, G and B sit in a pixel (mono: all three read byte 0).
struct Layout {
  const char* encoding;
  int channels;
  int r, g, b;
};

constexpr Layout kLayouts[] = {
    {"rgb8", 3, 0, 1, 2}, {"bgr8", 3, 2, 1, 0}, {"rgba8", 4, 0, 1, 2}, {"bgra8", 4, 2, 1, 0}, {"mono8", 1, 0, 0, 0},
};

const Layout* find_layout(const std::string& encoding) {
  for (const Layout& l : kLayouts) {
    if (encoding == l.encoding) return &l;
  }
  return nullptr;
}

std::string frame_name(const CameraFrame& frame) {
  return "camera frame (frame_id '" + frame.header.frame_id + "', stamp " + std::to_string(frame.header.stamp_sec) +
         "." + std::to_string(frame.header.stamp_nanosec) + ")";
}

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

// Where `label_map` (the semantic map, [H, W] int32) is `index`, as a mono8 image of the frame's header (255
// inside, 0 outside), and the pixel extent of that region as corners; false when no pixel has that class.
bool class_region(const Array& label_map, int32_t index, const FrameHeader& header, CameraFrame& mask,
                  std::array<double, 4>& xyxy) {
  const int64_t h = label_map.shape.at(0), w = label_map.shape.at(1);
  mask = CameraFrame{};
  mask.header = header;
  mask.height = static_cast<uint32_t>(h);
  mask.width = static_cast<uint32_t>(w);
  mask.encoding = "mono8";
  mask.step = mask.width;
  mask.data.assign(static_cast<size_t>(h * w), 0);
  int64_t x0 = w, y0 = h, x1 = -1, y1 = -1;
  const int32_t* in = label_map.as<int32_t>();
  for (int64_t y = 0; y < h; ++y) {
    for (int64_t x = 0; x < w; ++x) {
      if (in[y * w + x] != index) continue;
      mask.data[static_cast<size_t>(y * w + x)] = 255;
      x0 = std::min(x0, x);
      y0 = std::min(y0, y);
      x1 = std::max(x1, x);
      y1 = std::max(y1, y);
    }
  }
  if (x1 < 0) return false;
  // Pixel (x, y) covers [x, x + 1) x [y, y + 1): the box's far corner is one past the last pixel.
  xyxy = {static_cast<double>(x0), static_cast<double>(y0), static_cast<double>(x1 + 1), static_cast<double>(y1 + 1)};
  return true;
}

// A box given as corners in pixels (Result's box_xyxy) as vision_msgs' centre and size.
void set_box(NodeDetection& d, const std::array<double, 4>& xyxy) {
  d.center.x = (xyxy[0] + xyxy[2]) / 2;
  d.center.y = (xyxy[1] + xyxy[3]) / 2;
  d.size_x = xyxy[2] - xyxy[0];
  d.size_y = xyxy[3] - xyxy[1];
}

}  // namespace

// --- frames -----------------------------------------------------------------------------------------------

const std::vector<std::string>& camera_encodings() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> out;
    for (const Layout& l : kLayouts) out.emplace_back(l.encoding);
    return out;
  }();
  return names;
}

void check_camera_frame(const CameraFrame& frame) {
  const Layout* layout = find_layout(frame.encoding);
  if (layout == nullptr) {
    throw InputError(frame_name(frame) + ": encoding '" + frame.encoding + "' is not supported; supported: " +
                     joined(camera_encodings()));
  }
  if (frame.width == 0 || frame.height == 0) {
    throw InputError(frame_name(frame) + ": width and height must be positive, got " + std::to_string(frame.width) +
                     "x" + std::to_string(frame.height));
  }
  const uint64_t row = static_cast<uint64_t>(frame.width) * static_cast<uint64_t>(layout->channels);
  if (frame.step < row) {
    throw InputError(frame_name(frame) + ": step " + std::to_string(frame.step) + " is less than width " +
                     std::to_string(frame.width) + " x " + std::to_string(layout->channels) + " bytes (" +
                     frame.encoding + ") = " + std::to_string(row));
  }
  // The last row needs only its pixels, but sensor_msgs/Image promises step * height bytes: hold senders to it.
  const uint64_t need = static_cast<uint64_t>(frame.step) * static_cast<uint64_t>(frame.height);
  if (frame.data.size() < need) {
    throw InputError(frame_name(frame) + ": data has " + std::to_string(frame.data.size()) +
                     " bytes, expected at least step " + std::to_string(frame.step) + " x height " +
                     std::to_string(frame.height) + " = " + std::to_string(need));
  }
}

Image camera_frame_rgb(const CameraFrame& frame) {
  check_camera_frame(frame);
  const Layout& l = *find_layout(frame.encoding);
  const size_t w = frame.width, h = frame.height;
  std::vector<uint8_t> rgb(w * h * 3);
  for (size_t y = 0; y < h; ++y) {
    const uint8_t* src = frame.data.data() + y * frame.step;
    uint8_t* dst = rgb.data() + y * w * 3;
    for (size_t x = 0; x < w; ++x, src += l.channels, dst += 3) {
      dst[0] = src[l.r];
      dst[1] = src[l.g];
      dst[2] = src[l.b];
    }
  }
  return Image::rgb(rgb.data(), static_cast<int64_t>(w), static_cast<int64_t>(h));
}

// --- prompts ----------------------------------------------------------------------------------------------

NodePrompt NodePrompt::detect(std::vector<std::string> classes) {
  NodePrompt p;
  p.task = Task::kDetect;
  p.names = std::move(classes);
  return p;
}

NodePrompt NodePrompt::ground(std::string phrase) {
  NodePrompt p;
  p.task = Task::kGround;
  p.text = std::move(phrase);
  return p;
}

NodePrompt NodePrompt::segment(std::vector<std::string> classes) {
  NodePrompt p;
  p.task = Task::kSegment;
  p.names = std::move(classes);
  return p;
}

NodePrompt NodePrompt::pose(std::vector<std::string> keypoint_names, std::vector<std::string> objects) {
  NodePrompt p;
  p.task = Task::kPose;
  p.names = std::move(keypoint_names);
  p.objects = std::move(objects);
  return p;
}

NodePrompt NodePrompt::question(std::string text, int64_t max_new_tokens) {
  NodePrompt p;
  p.task = Task::kQuestion;
  p.text = std::move(text);
  p.max_new_tokens = max_new_tokens;
  return p;
}

namespace {

constexpr std::pair<NodePrompt::Task, const char*> kTaskNames[] = {
    {NodePrompt::Task::kDetect, "detect"}, {NodePrompt::Task::kGround, "ground"},
    {NodePrompt::Task::kSegment, "segment"}, {NodePrompt::Task::kPose, "pose"},
    {NodePrompt::Task::kQuestion, "question"},
};

}  // namespace

NodePrompt::Task node_task(const std::string& name) {
  std::string known;
  for (const auto& [task, text] : kTaskNames) {
    if (name == text) return task;
    known += (known.empty() ? "" : ", ") + std::string(text);
  }
  throw InputError("node prompt: unknown task '" + name + "'; known: " + known);
}

const char* node_task_name(NodePrompt::Task task) {
  for (const auto& [t, text] : kTaskNames) {
    if (t == task) return text;
  }
  throw std::logic_error("unknown node task");
}

void check_node_prompt(const NodePrompt& p) {
  const std::string what = std::string("node prompt (") + node_task_name(p.task) + ")";
  auto no_empty = [&](const std::vector<std::string>& names, const char* field) {
    if (names.empty()) throw InputError(what + ": " + field + " is empty; give at least one name");
    for (const std::string& n : names) {
      if (n.empty()) throw InputError(what + ": " + field + " has an empty name: [" + joined(names) + "]");
    }
  };
  switch (p.task) {
    case NodePrompt::Task::kDetect:
    case NodePrompt::Task::kSegment: no_empty(p.names, "names (the classes)"); break;
    case NodePrompt::Task::kPose:
      no_empty(p.names, "names (the keypoint names)");
      no_empty(p.objects, "objects");
      break;
    case NodePrompt::Task::kGround:
    case NodePrompt::Task::kQuestion:
      if (p.text.empty()) throw InputError(what + ": text is empty");
      break;
  }
  if (p.task == NodePrompt::Task::kQuestion && p.max_new_tokens <= 0) {
    throw InputError(what + ": max_new_tokens must be positive, got " + std::to_string(p.max_new_tokens));
  }
}

// --- results ----------------------------------------------------------------------------------------------

NodeOutput node_output(const Result& result, const NodePrompt& prompt, const CameraFrame& frame) {
  NodeOutput out;
  out.header = frame.header;
  out.task = prompt.task;
  out.answer = result.text;
  out.stats = result.stats;
  if (prompt.task == NodePrompt::Task::kPose) {
    for (const Pose& p : result.poses) {
      NodeDetection d;
      set_box(d, p.box_xyxy);
      d.class_id = p.label;
      d.score = p.score;
      const int64_t k = p.keypoints.empty() ? 0 : p.keypoints.shape.at(0);
      const float* kp = p.keypoints.as<float>();
      for (int64_t i = 0; i < k; ++i) {
        NodeDetection::Keypoint point;
        point.name = i < static_cast<int64_t>(p.keypoint_names.size()) ? p.keypoint_names[static_cast<size_t>(i)] : "";
        point.x = kp[i * 3];
        point.y = kp[i * 3 + 1];
        point.score = kp[i * 3 + 2];
        d.keypoints.push_back(std::move(point));
      }
      out.detections.push_back(std::move(d));
    }
  } else if (prompt.task == NodePrompt::Task::kSegment) {
    // [SEG] answers a semantic map: one detection per class that covers at least one pixel.
    if (result.has_segmentation) {
      const Array& map = result.segmentation.label_map;
      if (map.shape != std::vector<int64_t>{frame.height, frame.width}) {
        throw EngineError("node: the semantic map is " + std::to_string(map.shape.at(0)) + "x" +
                          std::to_string(map.shape.at(1)) + ", expected the frame's " + std::to_string(frame.height) +
                          "x" + std::to_string(frame.width));
      }
      for (size_t k = 0; k < result.segmentation.labels.size(); ++k) {
        NodeDetection d;
        std::array<double, 4> xyxy{};
        if (!class_region(map, static_cast<int32_t>(k), frame.header, d.mask, xyxy)) continue;
        set_box(d, xyxy);
        d.class_id = result.segmentation.labels[k];
        d.score = 1;
        out.detections.push_back(std::move(d));
      }
    }
  } else {
    // Every object-decoder detection has a mask too; only a segmentation request is asked for masks.
    for (const Detection& r : result.detections) {
      NodeDetection d;
      set_box(d, r.box_xyxy);
      d.class_id = r.label;
      d.score = r.score;
      out.detections.push_back(std::move(d));
    }
  }
  for (size_t i = 0; i < out.detections.size(); ++i) out.detections[i].id = std::to_string(i);
  return out;
}

// --- the node ---------------------------------------------------------------------------------------------

namespace {

PerceptionNode::Runner pipeline_runner(Pipeline pipeline) {
  // std::function needs a copyable target; the Pipeline moves in once and is shared by the copies.
  auto pipe = std::make_shared<Pipeline>(std::move(pipeline));
  return [pipe](const Image& image, const NodePrompt& p) {
    switch (p.task) {
      case NodePrompt::Task::kDetect: return pipe->detect(image, p.names);
      case NodePrompt::Task::kGround: return pipe->ground(image, p.text);
      case NodePrompt::Task::kSegment: return pipe->segment(image, p.names);
      case NodePrompt::Task::kPose: return pipe->pose(image, p.names, p.objects);
      case NodePrompt::Task::kQuestion: {
        RunOptions o;
        o.max_new_tokens = p.max_new_tokens;
        return pipe->run(image, p.text, o);
      }
    }
    throw std::logic_error("unknown node task");
  };
}

}  // namespace

PerceptionNode::PerceptionNode(Pipeline pipeline, NodeOptions options, OutputCallback on_output,
                               FailureCallback on_failure)
    : PerceptionNode(pipeline_runner(std::move(pipeline)), std::move(options), std::move(on_output),
                     std::move(on_failure)) {}

PerceptionNode::PerceptionNode(Runner runner, NodeOptions options, OutputCallback on_output, FailureCallback on_failure)
    : runner_(std::move(runner)), on_output_(std::move(on_output)), on_failure_(std::move(on_failure)) {
  if (!runner_) throw InputError("perception node: the runner is empty");
  if (!on_output_) throw InputError("perception node: the output callback is empty");
  if (!std::isfinite(options.rate_hz) || options.rate_hz < 0) {
    throw InputError("perception node: rate_hz must be a finite number >= 0 (0: as fast as frames come), got " +
                     std::to_string(options.rate_hz));
  }
  check_node_prompt(options.prompt);
  prompt_ = std::move(options.prompt);
  if (options.rate_hz > 0) {
    period_ = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(1.0 / options.rate_hz));
  }
}

PerceptionNode::~PerceptionNode() { stop(); }

void PerceptionNode::push(CameraFrame frame) {
  check_camera_frame(frame);
  const auto now = Clock::now();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ++counters_.received;
    if (pending_) ++counters_.dropped;
    pending_ = Pending{std::move(frame), now};
  }
  wake_.notify_all();
}

void PerceptionNode::set_prompt(NodePrompt prompt) {
  check_node_prompt(prompt);
  std::lock_guard<std::mutex> lock(mutex_);
  prompt_ = std::move(prompt);
}

NodePrompt PerceptionNode::prompt() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return prompt_;
}

NodeCounters PerceptionNode::counters() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return counters_;
}

void PerceptionNode::start() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (thread_.joinable()) return;
  stopping_ = false;
  thread_ = std::thread([this] { worker(); });
}

void PerceptionNode::stop() {
  std::thread worker;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!thread_.joinable()) return;
    if (thread_.get_id() == std::this_thread::get_id()) {
      throw InputError("perception node: stop() was called from the node's own callback (it would join itself)");
    }
    stopping_ = true;
    worker = std::move(thread_);
  }
  wake_.notify_all();
  worker.join();
}

bool PerceptionNode::running() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return thread_.joinable();
}

bool PerceptionNode::process_pending() {
  std::lock_guard<std::mutex> run(run_mutex_);
  std::optional<Pending> taken;
  NodePrompt prompt;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!pending_) return false;
    taken.swap(pending_);
    prompt = prompt_;
  }
  run_one(std::move(*taken), prompt);
  return true;
}

void PerceptionNode::worker() {
  Clock::time_point next_run = Clock::now();
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      // Wait for a frame, then for the rate's next slot; frames arriving meanwhile replace the pending one.
      wake_.wait(lock, [&] { return stopping_ || pending_.has_value(); });
      if (stopping_) return;
      if (wake_.wait_until(lock, next_run, [&] { return stopping_; })) return;
    }
    const auto started = Clock::now();
    if (process_pending()) next_run = started + period_;
  }
}

void PerceptionNode::run_one(Pending pending, const NodePrompt& prompt) {
  const auto started = Clock::now();
  NodeOutput out;
  try {
    const Result result = runner_(camera_frame_rgb(pending.frame), prompt);
    const auto finished = Clock::now();
    out = node_output(result, prompt, pending.frame);
    out.run_ms = ms_between(started, finished);
  } catch (const std::exception& e) {
    fail(pending.frame.header, e.what(), true);
    return;
  } catch (...) {
    fail(pending.frame.header, "the runner threw something that is not a std::exception", true);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ++counters_.processed;
    out.counters = counters_;
  }
  out.latency_ms = ms_between(pending.received, Clock::now());
  try {
    on_output_(out);
  } catch (const std::exception& e) {
    fail(pending.frame.header, std::string("output callback: ") + e.what(), false);
  } catch (...) {
    fail(pending.frame.header, "output callback: threw something that is not a std::exception", false);
  }
}

void PerceptionNode::fail(const FrameHeader& header, std::string message, bool count_processed) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (count_processed) ++counters_.processed;
    ++counters_.failed;
  }
  // Nothing may end the worker: a failure callback that throws has no one left to tell.
  if (on_failure_) {
    try {
      on_failure_({header, std::move(message)});
    } catch (...) {
    }
  }
}

}  // namespace vle
