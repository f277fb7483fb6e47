"""The perception node from Python (`_core.PerceptionNode`, csrc/node/; docs/ros.md). No torch.

A camera stream in, one task on the newest frame at a set rate, outputs shaped like
`vision_msgs/Detection2DArray` (dicts) to a callback. This module only turns numpy pictures and
`sensor_msgs/Image`-like messages (rclpy's, or anything with the same fields) into the frames the C++ node
takes; checking, scheduling, dropping and conversion are the C++ node's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from visionllm_edge import _core
from visionllm_edge.runtime.engine import onnxruntime_library

#: The encodings a frame may have (as `sensor_msgs/Image` spells them).
ENCODINGS: tuple[str, ...] = tuple(_core.CAMERA_ENCODINGS)

_CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}


class PerceptionNode:
    """One task on the newest camera frame at `rate_hz`, on a worker thread (`start()` / `stop()`) or on the
    caller's (`process_pending()`).

    Args:
        artifact_dir: a folder written by `visionllm-edge export`.
        on_output: called with each output dict: `header` {stamp (sec, nanosec), frame_id}, `task`,
            `detections` [{bbox {center {x, y, theta}, size_x, size_y}, results [{hypothesis {class_id,
            score}}], id, keypoints [{name, x, y, score}], mask (H x W uint8, 255 inside) or None}], `answer`,
            `latency_ms`, `run_ms`, `counters` {received, processed, dropped, failed}, `stats` (the loop's).
        task, names, objects, text, max_new_tokens: the prompt (see `set_prompt`).
        rate_hz: at most this many runs a second (0: as fast as frames come).
        on_failure: called with (header, message) when a run fails; the node goes on.
        threads: intra-op threads per engine (0: ONNX Runtime's default).
        postprocess: overrides of the manifest's post-processing defaults, as `Pipeline.load` takes them.
    """

    def __init__(
        self,
        artifact_dir,
        on_output: Callable[[dict], None],
        task: str = "detect",
        names: Sequence[str] = (),
        objects: Sequence[str] = ("person",),
        text: str = "",
        max_new_tokens: int = 64,
        rate_hz: float = 10.0,
        on_failure: Callable[[dict, str], None] | None = None,
        threads: int = 0,
        postprocess: dict[str, float | None] | None = None,
    ):
        self._core = _core.PerceptionNode(
            str(Path(artifact_dir)),
            str(task),
            [str(n) for n in names],
            [str(o) for o in objects],
            str(text),
            int(max_new_tokens),
            float(rate_hz),
            int(threads),
            onnxruntime_library(),
            {k: -1.0 if v is None else float(v) for k, v in (postprocess or {}).items()},
            on_output,
            on_failure,
        )

    def push(
        self, image: np.ndarray, encoding: str = "rgb8", stamp: tuple[int, int] = (0, 0), frame_id: str = ""
    ):
        """Makes a picture the pending frame: `H x W x C` (or `H x W` for mono8) uint8, in `encoding`."""
        pixels = np.asarray(image)
        if pixels.dtype != np.uint8:
            raise TypeError(f"push: the picture must be uint8, got {pixels.dtype}")
        channels = _CHANNELS.get(encoding)
        if channels is None:
            raise ValueError(
                f"push: encoding {encoding!r} is not supported; supported: {', '.join(ENCODINGS)}"
            )
        if pixels.ndim == 2 and channels == 1:
            pixels = pixels[..., None]
        if pixels.ndim != 3 or pixels.shape[2] != channels:
            raise ValueError(f"push: a {encoding} picture is H x W x {channels}, got shape {pixels.shape}")
        h, w, _ = pixels.shape
        self._core.push(
            np.ascontiguousarray(pixels).reshape(-1), h, w, encoding, w * channels, tuple(stamp), frame_id
        )

    def push_message(self, msg):
        """Makes a `sensor_msgs/Image`-like message (header.stamp.sec/nanosec, header.frame_id, height, width,
        encoding, is_bigendian, step, data) the pending frame."""
        self._core.push(
            np.frombuffer(bytes(msg.data), dtype=np.uint8),
            int(msg.height),
            int(msg.width),
            str(msg.encoding),
            int(msg.step),
            (int(msg.header.stamp.sec), int(msg.header.stamp.nanosec)),
            str(msg.header.frame_id),
            int(msg.is_bigendian),
        )

    def set_prompt(
        self,
        task: str,
        names: Sequence[str] = (),
        objects: Sequence[str] = ("person",),
        text: str = "",
        max_new_tokens: int = 64,
    ):
        """The task from the next frame on: detect / segment (`names`: classes), ground (`text`: the phrase),
        pose (`names`: keypoint names, `objects`), question (`text`, `max_new_tokens`)."""
        self._core.set_prompt(
            str(task), [str(n) for n in names], [str(o) for o in objects], str(text), int(max_new_tokens)
        )

    def process_pending(self) -> bool:
        """Runs the pending frame now on this thread (the output callback is called before it returns)."""
        return self._core.process_pending()

    def start(self):
        self._core.start()

    def stop(self):
        self._core.stop()

    @property
    def running(self) -> bool:
        return self._core.running

    @property
    def counters(self) -> dict[str, int]:
        return self._core.counters
