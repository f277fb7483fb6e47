"""The runtime's Python face: `Pipeline` over the C++ request loop (`_core.Pipeline`). No torch.

Every request runs in C++ (csrc/loop/pipeline.cpp) with the GIL released: preprocessing, the vision and
region encoders, the chat template and tokens, embedding assembly, prefill into the KV arena, decoding with
the super link, dispatch to the decoders, the diffusion loop, post-processing. This module only turns Python
inputs (paths, PIL images, numpy arrays, region tuples) into what the C++ API takes and its results into the
`Result` types of `visionllm_edge.results`. See docs/architecture.md for the loop itself.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from visionllm_edge import _core
from visionllm_edge.images import load_image
from visionllm_edge.manifest import Manifest, load_manifest
from visionllm_edge.results import Detection, Link, Pose, Result, SemanticMap
from visionllm_edge.runtime.engine import onnxruntime_library

#: The keywords a request takes besides the image and the prompt (those of `ReferencePipeline.run`).
_REQUEST_KEYS = (
    "history",
    "answer_prefix",
    "answer",
    "instruction",
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "seed",
    "noise",
)


def _text(value, option: str) -> str:
    """A str the C++ loop can take: pybind11 would refuse a lone surrogate without naming the option."""
    if not isinstance(value, str):
        raise TypeError(f"{option} must be a str, got {type(value).__name__} {value!r:.80}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{option} is not valid UTF-8: {e.reason} at index {e.start} ({value[e.start]!r})") from None
    return value


def _names(value, option: str) -> list[str]:
    """A list of names; a str is refused (it would be iterated into its letters)."""
    if isinstance(value, str):
        raise TypeError(f"{option} must be a list of names, got the string {value!r}; wrap it: [{value!r}]")
    return [_text(str(v), option) for v in value]


def _rgb(image, bgr: bool = False) -> np.ndarray | None:
    if image is None:
        return None
    return np.ascontiguousarray(np.asarray(load_image(image, bgr=bgr)))


def _regions(regions, region_frame: str) -> list[tuple[str, object]]:
    if region_frame not in ("image", "thumbnail"):
        raise ValueError(f"region_frame must be 'image' or 'thumbnail', got {region_frame!r}")
    out = []
    for r in regions or ():
        if region_frame == "thumbnail":
            out.append(("thumbnail", np.asarray(r) > 0.5))
        elif isinstance(r, np.ndarray) and r.ndim == 2:
            out.append(("mask", np.ascontiguousarray(r, dtype=bool)))
        else:
            try:
                coords = [float(v) for v in r]
            except (TypeError, ValueError, OverflowError):  # not numbers (Python's message names neither)
                coords = []
            if len(coords) == 4:
                out.append(("box", coords))
            elif len(coords) == 2:
                out.append(("point", coords))
            else:
                raise ValueError(f"region: expected a mask, a 4-number box or a 2-number point, got {r!r}")
    return out


def _det_input(det: dict) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """A prepared decoder input (the dict of `Pipeline.detection_input`'s three parts) as the C++ loop takes
    it; the loop checks the arrays' shapes and values."""
    if not {"pixel_values", "pixel_mask"} <= set(det) <= {"pixel_values", "pixel_mask", "resized_hw"}:
        raise ValueError(f"det_image: expected pixel_values, pixel_mask (and resized_hw), got {list(det)}")
    pixels = np.ascontiguousarray(det["pixel_values"], dtype=np.float32)
    given = det.get("resized_hw", pixels.shape[-2:])
    try:
        resized = tuple(int(v) for v in given)
    except (TypeError, ValueError, OverflowError):  # not numbers, NaN, inf
        resized = ()
    # Positive and within int32 (the C++ side takes int64 and compares with the mask's size).
    if len(resized) != 2 or not all(0 < v < 2**31 for v in resized):
        raise ValueError(f"det_image['resized_hw']: expected two positive ints (h, w), got {given!r:.80}")
    return pixels, np.ascontiguousarray(det["pixel_mask"], dtype=bool), resized


def _options(kwargs: dict) -> dict:
    """Request keywords as the C++ loop takes them."""
    unknown = sorted(
        set(kwargs) - set(_REQUEST_KEYS) - {"regions", "region_frame", "det_image", "decode", "bgr"}
    )
    if unknown:
        raise TypeError(f"unknown request keyword(s) {unknown}")
    options = {k: kwargs[k] for k in _REQUEST_KEYS if kwargs.get(k) is not None}
    if "history" in options:
        turns = options["history"]
        if not isinstance(turns, (list, tuple)):
            raise TypeError(f"history must be a list of (user, assistant) pairs, got {turns!r:.80}")
        history = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, (list, tuple)) or len(turn) != 2:
                raise ValueError(f"history[{i}]: expected a (user, assistant) pair, got {turn!r:.80}")
            history.append((_text(str(turn[0]), f"history[{i}]"), _text(str(turn[1]), f"history[{i}]")))
        options["history"] = history
    for key in ("answer_prefix", "answer", "instruction"):
        if key in options:
            options[key] = _text(options[key], key)
    if "noise" in options:
        options["noise"] = np.ascontiguousarray(options["noise"], dtype=np.float32)
    options["regions"] = _regions(kwargs.get("regions"), kwargs.get("region_frame", "image"))
    options["decode_images"] = bool(kwargs.get("decode", True))
    det = kwargs.get("det_image")
    if isinstance(det, dict):
        options["det_input"] = _det_input(det)
    elif det is not None:
        options["det_image"] = _rgb(det)
    return options


def _result(d: dict) -> Result:
    result = Result(
        text=d["text"],
        token_ids=list(d["token_ids"]),
        stop_reason=d["stop_reason"],
        links=[Link(kind, label, position, states) for kind, label, position, states in d["links"]],
        detections=[
            Detection(label, kind, score, tuple(box), mask, q)
            for label, kind, score, box, mask, q in d["detections"]
        ],
        segmentation=None if d["segmentation"] is None else SemanticMap(*d["segmentation"]),
        poses=[
            Pose(label, score, tuple(box), kps, list(names), q)
            for label, score, box, kps, names, q in d["poses"]
        ],
        images=list(d["images"]),
        timings=dict(d["timings"]),
    )
    result.raw = {"decoders": d["decoders"], "input_ids": d["input_ids"], "stats": d["stats"]}
    return result


class Pipeline:
    """VisionLLM v2 from an artifact folder, on the C++ loop with ONNX Runtime (TensorRT: not yet).

    Use `Pipeline.load(artifact_dir)`; then `pipe(image, prompt)`, `pipe.stream(...)`, `pipe.chat(image)`, or
    the task shortcuts `detect`, `ground`, `segment`, `pose`, `generate_image`, `edit_image`.
    """

    def __init__(self, core: _core.Pipeline, manifest: Manifest):
        self._core = core
        self.manifest = manifest
        self.folder = manifest.artifact_dir

    @classmethod
    def load(
        cls,
        artifact_dir,
        backend: str = "onnxruntime",
        providers: list[str] | None = None,
        max_context: int | None = None,
        components=None,
        threads: int = 0,
        verify_hashes: bool = True,
        provider_options: dict[str, dict[str, str]] | None = None,
        postprocess: dict[str, float] | None = None,
        fp16: bool = False,
        engine_cache=None,
        device_id: int = 0,
        profile_dir=None,
    ) -> Pipeline:
        """Opens an artifact folder.

        Args:
            artifact_dir: a folder written by `visionllm-edge export`.
            backend: "onnxruntime", or "tensorrt" (ONNX Runtime's TensorRT provider with profiles, precision
                and engine caches planned from the manifest; a BackendUnavailableError naming what the
                installed onnxruntime has when it lacks that provider).
            providers: ONNX Runtime execution providers, e.g. ["CUDAExecutionProvider",
                "CPUExecutionProvider"].
            max_context: cap on the KV arena (default: the manifest's max context).
            components: graphs to load now (e.g. ("vision", "llm", "det")); the rest load on first use.
            threads: intra-op threads per engine (0: ONNX Runtime's default).
            verify_hashes: check every file's sha256 against the manifest.
            provider_options: per-provider options, passed through to ONNX Runtime.
            postprocess: overrides of the manifest's post-processing defaults (det_top_k,
                det_score_threshold, nms_iou (None: off), mask_threshold, seg_score_threshold, pose_top_k,
                pose_score_threshold).
            fp16: tensorrt backend: fp16 kernels by TensorRT 10's builder flag (TensorRT 11 takes the
                precision from the graphs: export with --precision fp16). A ValueError with onnxruntime.
            engine_cache: tensorrt backend: the folder of the stamped engines, one sub-folder per graph
                (default: the artifact's engines/). A ValueError with onnxruntime.
            device_id: the CUDA device of the CUDA and TensorRT providers.
            profile_dir: a folder where each engine writes ONNX Runtime's session profile (every node's op,
                shapes and time; `end_profiling` completes the files). The bench counts FLOPs from them.
        """
        folder = Path(artifact_dir)
        # Parsed here for its facts; the core's load below checks the hashes (once), and again for each graph
        # whose engine it makes later.
        manifest = load_manifest(folder, verify_hashes=False)
        if max_context is not None and int(max_context) <= 0:
            raise ValueError(f"max_context must be positive, got {max_context}")
        core = _core.Pipeline.load(
            str(folder),
            backend,
            list(providers or []),
            dict(provider_options or {}),
            int(threads),
            int(max_context or 0),
            list(components or ()),
            bool(verify_hashes),
            onnxruntime_library(),
            {k: -1.0 if v is None else float(v) for k, v in (postprocess or {}).items()},
            bool(fp16),
            "" if engine_cache is None else str(engine_cache),
            int(device_id),
            "" if profile_dir is None else str(profile_dir),
        )
        return cls(core, manifest)

    # --- requests -----------------------------------------------------------------------------------------

    def __call__(
        self, image, prompt: str, regions=None, bgr: bool = False, _on_text=None, **kwargs
    ) -> Result:
        """Answers one request (the keywords of `ReferencePipeline.run`).

        Args:
            image: path, PIL image, `H x W x 3` uint8 array (RGB; BGR with `bgr=True`), or None (text only).
            prompt: the user's text; `<image>\\n` is put in front when it has none.
            regions: one visual prompt per `<region>` (bool mask, `(x0, y0, x1, y1)` box or `(x, y)` point).
            **kwargs: history, answer_prefix, answer (a complete forced answer: one prefill, no decoding),
                instruction, max_new_tokens (64), do_sample, temperature, top_k, top_p, repetition_penalty,
                seed, det_image, region_frame ("image" | "thumbnail"), noise (initial latents for
                [GEN]/[EDIT]), decode (False: [GEN]/[EDIT] stop at the conditioning).
        """
        options = _options({**kwargs, "regions": regions})
        return _result(self._core.run(_rgb(image, bgr), _text(prompt, "prompt"), options, _on_text))

    def stream(self, image, prompt: str, **kwargs) -> Iterator[str | Result]:
        """Yields the answer's text pieces as they are decoded, then the `Result`."""
        pieces: queue.Queue = queue.Queue()
        done = object()
        outcome: dict = {}

        def work():
            try:
                outcome["value"] = self(image, prompt, _on_text=pieces.put, **kwargs)
            except BaseException as e:  # re-raised in the caller's thread
                outcome["error"] = e
            pieces.put(done)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        while (piece := pieces.get()) is not done:
            yield piece
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        yield outcome["value"]

    def chat(self, image, **defaults) -> ChatSession:
        """A multi-turn conversation about one image; each turn reuses the KV rows of the earlier ones."""
        return ChatSession(self, self._core.chat(_rgb(image)), defaults)

    def detection_input(self, image) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """The decoders' input for an image: (pixels [1,3,H,W] float32, mask [1,H,W] bool, resized (h, w))."""
        pixels, mask, resized = self._core.detection_input(_rgb(image))
        return pixels, mask, tuple(resized)

    @property
    def context_capacity(self) -> int:
        """Rows the KV arena holds."""
        return self._core.context_capacity

    def end_profiling(self) -> dict[str, str]:
        """With `load(profile_dir=...)`: ends the profile of every engine made so far; {graph: file}."""
        return dict(self._core.end_profiling())

    @property
    def arena_bytes(self) -> int:
        """Bytes the KV arena reserves (K and V, every layer)."""
        return self._core.arena_bytes

    # --- task shortcuts (no free generation: one prefill with the official forced answer) ----------------

    def _task(self, task: str, image, names, objects=(), bgr: bool = False, **kw) -> Result:
        options = _options(kw)
        return _result(self._core.task(task, _rgb(image, bgr), list(names), list(objects), options))

    def detect(self, image, classes, **kw) -> Result:
        return self._task("detect", image, _names(classes, "classes"), **kw)

    def ground(self, image, phrase: str, **kw) -> Result:
        return self._task("ground", image, [_text(phrase, "phrase")], **kw)

    def segment(self, image, classes, **kw) -> Result:
        return self._task("segment", image, _names(classes, "classes"), **kw)

    def pose(self, image, keypoint_names, objects=("person",), **kw) -> Result:
        names = _names(keypoint_names, "keypoint_names")
        return self._task("pose", image, names, _names(objects, "objects"), **kw)

    def generate_image(self, prompt: str, **kw) -> Result:
        return self._task("generate_image", None, [_text(prompt, "prompt")], **kw)

    def edit_image(self, image, instruction: str, **kw) -> Result:
        return self._task("edit_image", image, [_text(instruction, "instruction")], **kw)


class ChatSession:
    """Multi-turn chat about one image. `ask(prompt)` returns the `Result`; the history grows by one turn."""

    def __init__(self, pipeline: Pipeline, chat: _core.Chat, defaults: dict):
        self.pipeline = pipeline
        self._chat = chat
        self.defaults = defaults

    @property
    def history(self) -> list[tuple[str, str]]:
        return [tuple(turn) for turn in self._chat.history]

    def ask(self, prompt: str, **kw) -> Result:
        return _result(self._chat.ask(_text(prompt, "prompt"), _options({**self.defaults, **kw})))
