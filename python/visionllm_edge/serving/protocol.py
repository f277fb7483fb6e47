"""The serving protocol: the tensors of the `visionllm` and `visionllm_stream` models and the two conversions.

`visionllm-edge serve` (PyTriton, `server.py`), the model repository (`repository.py`, Triton's Python
backend) and the client (`client.py`) all speak through this module, so a request means the same on every
path. No Triton import here: the server side calls `run_request` / `stream_request` on numpy arrays, the
client side `encode_request` / `decode_response`.

Inputs (all but `prompt` optional):

    image      UINT8  [-1]          encoded PNG/JPEG bytes
    image_raw  UINT8  [-1, -1, 3]   an H x W x 3 RGB array
    prompt     BYTES  [1]           UTF-8
    regions    FP32   [-1, 4]       boxes x0 y0 x1 y1 in image pixels, one per <region> of the prompt
    options    BYTES  [1]           UTF-8 JSON object, keys in `OPTION_TYPES`

Outputs of `visionllm`:

    result     BYTES  [1]              Result.to_json()
    masks      UINT8  [-1, -1, -1]     N x H x W: one per detection with a mask, in detection order, then one
                                       per label of the semantic map (label_map == k) when there is one
                                       (0 x 0 x 0 when none)
    images     UINT8  [-1, -1, -1, 3]  generated / edited images, each padded to the largest at its bottom
                                       and right (the JSON's `images` holds each one's shape); 0 x 0 x 0 x 3
                                       when none

`visionllm_stream` answers with a stream: `text` (BYTES [1], the next piece) per decoded piece, then one
response with `result`, `masks` and `images`.

The semantic map travels as its labels' masks because its classes never overlap: `label_map` is rebuilt
exactly (-1 where no mask is set). A rebuilt `Result` equals the direct one in text, token ids, stop reason,
links (without their states), detections (boxes and scores are the float32 values, exactly; masks), the
semantic map, poses (keypoints to 3 decimals, as `to_json` writes them) and images.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionllm_edge.results import Detection, Link, Pose, Result, SemanticMap


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor of the protocol. BYTES tensors are numpy object arrays of `bytes`."""

    name: str
    dtype: type
    shape: tuple[int, ...]
    optional: bool = False


BYTES = np.object_

INPUTS = (
    TensorSpec("image", np.uint8, (-1,), optional=True),
    TensorSpec("image_raw", np.uint8, (-1, -1, 3), optional=True),
    TensorSpec("prompt", BYTES, (1,)),
    TensorSpec("regions", np.float32, (-1, 4), optional=True),
    TensorSpec("options", BYTES, (1,), optional=True),
)
OUTPUTS = (
    TensorSpec("result", BYTES, (1,)),
    TensorSpec("masks", np.uint8, (-1, -1, -1)),
    TensorSpec("images", np.uint8, (-1, -1, -1, 3)),
)
STREAM_OUTPUTS = (TensorSpec("text", BYTES, (1,)), *OUTPUTS)

#: The request options and the JSON types each takes (bool is not an int here: `"seed": true` is refused).
OPTION_TYPES = {
    "task": "str",
    "classes": "names",
    "phrase": "str",
    "keypoints": "names",
    "objects": "names",
    "instruction": "str",
    "max_new_tokens": "int",
    "do_sample": "bool",
    "temperature": "number",
    "top_k": "int",
    "top_p": "number",
    "repetition_penalty": "number",
    "seed": "int",
}
#: Task shortcut -> the option naming what it looks for (None: the prompt is the text it works on).
TASKS = {
    "detect": "classes",
    "ground": "phrase",
    "segment": "classes",
    "pose": "keypoints",
    "generate": None,
    "edit": None,
}
#: Options that belong to one task shortcut each (or, for `instruction`, to a free request only).
_TASK_OPTIONS = {
    "classes": ("detect", "segment"),
    "phrase": ("ground",),
    "keypoints": ("pose",),
    "objects": ("pose",),
}
_GENERATION_OPTIONS = (
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "seed",
)


class RequestError(ValueError):
    """A malformed request; the message names the input or option, what was expected and what came."""


def error_message(error: BaseException) -> str:
    """The message an error response carries: our refusals as they are, anything else with its type."""
    if isinstance(error, RequestError):
        return str(error)
    return f"{type(error).__name__}: {error}"


# --- the server side ----------------------------------------------------------------------------------------


def _one_string(inputs: dict, name: str) -> str | None:
    value = inputs.get(name)
    if value is None:
        return None
    array = np.asarray(value)
    if array.size != 1:
        raise RequestError(f"{name}: expected one UTF-8 string (BYTES [1]), got shape {list(array.shape)}")
    item = array.reshape(-1)[0]
    if isinstance(item, str):
        return item
    if not isinstance(item, (bytes, np.bytes_)):
        raise RequestError(f"{name}: expected BYTES, got {array.dtype} {item!r:.40}")
    try:
        return bytes(item).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"{name}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _image(inputs: dict) -> np.ndarray | None:
    encoded, raw = inputs.get("image"), inputs.get("image_raw")
    if encoded is not None and raw is not None:
        raise RequestError("image and image_raw: give one image, got both")
    if encoded is not None:
        data = np.asarray(encoded)
        if data.dtype != np.uint8 or data.ndim != 1:
            raise RequestError(
                f"image: expected UINT8 [-1] (encoded PNG/JPEG bytes), got {data.dtype} {list(data.shape)}"
            )
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data.tobytes())) as picture:
                picture.load()
                return np.asarray(picture.convert("RGB"))
        except UnidentifiedImageError:
            raise RequestError(
                f"image: cannot decode the {data.size} bytes as PNG or JPEG (no image format's header)"
            ) from None
        except (OSError, ValueError, SyntaxError) as e:  # what Pillow raises for a truncated or corrupt file
            raise RequestError(f"image: cannot decode the {data.size} bytes as PNG or JPEG ({e})") from None
    if raw is not None:
        array = np.asarray(raw)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise RequestError(
                f"image_raw: expected an H x W x 3 UINT8 RGB array, got {array.dtype} {list(array.shape)}"
            )
        return np.ascontiguousarray(array)
    return None


def _regions(inputs: dict) -> list[tuple[float, float, float, float]] | None:
    value = inputs.get("regions")
    if value is None:
        return None
    array = np.asarray(value)
    if array.dtype != np.float32 or array.ndim != 2 or array.shape[1] != 4:
        raise RequestError(
            f"regions: expected FP32 [R, 4] boxes x0 y0 x1 y1, got {array.dtype} {list(array.shape)}"
        )
    return [tuple(float(v) for v in row) for row in array]


def _check_type(key: str, value, kind: str) -> None:
    ok = {
        "str": isinstance(value, str),
        "names": isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
    }[kind]
    if not ok:
        wanted = {
            "str": "a string",
            "names": "a non-empty list of strings",
            "int": "an integer",
            "bool": "true or false",
            "number": "a finite number",
        }[kind]
        raise RequestError(f"options.{key}: expected {wanted}, got {json.dumps(value)[:80]}")


def check_options(options: dict) -> dict:
    """Refuses unknown keys (by name), values of the wrong type, and task options that do not fit the task."""
    unknown = sorted(set(options) - set(OPTION_TYPES))
    if unknown:
        raise RequestError(f"options: unknown key(s) {unknown}; known: {sorted(OPTION_TYPES)}")
    for key, value in options.items():
        _check_type(key, value, OPTION_TYPES[key])
    task = options.get("task")
    if task is not None and task not in TASKS:
        raise RequestError(f"options.task: expected one of {sorted(TASKS)}, got {task!r}")
    for key, tasks in _TASK_OPTIONS.items():
        if key in options and task not in tasks:
            raise RequestError(f"options.{key}: only with task {' or '.join(tasks)}, got task {task!r}")
    if task is not None and "instruction" in options:
        raise RequestError(f"options.instruction: only for a free request (task {task!r} takes the prompt)")
    needed = TASKS.get(task)
    if needed is not None and needed not in options:
        raise RequestError(f"options.{needed}: task {task!r} needs it")
    return options


def _options(inputs: dict) -> dict:
    text = _one_string(inputs, "options")
    if text is None:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"options: not JSON ({e.msg} at character {e.pos}): {text[:80]!r}") from None
    if not isinstance(options, dict):
        raise RequestError(f"options: expected a JSON object, got {text[:80]!r}")
    return check_options(options)


@dataclass
class _Request:
    image: np.ndarray | None
    prompt: str
    regions: list | None
    task: str | None
    names: list[str]
    objects: list[str] | None
    keywords: dict


def _decode(inputs: dict) -> _Request:
    names = {spec.name for spec in INPUTS}
    unknown = sorted(set(inputs) - names)
    if unknown:
        raise RequestError(f"inputs: unknown input(s) {unknown}; known: {sorted(names)}")
    prompt = _one_string(inputs, "prompt")
    if prompt is None:
        raise RequestError(
            "prompt: missing (a BYTES [1] UTF-8 input; empty for the detect/ground/segment/pose tasks)"
        )
    image, regions, options = _image(inputs), _regions(inputs), _options(inputs)
    task = options.get("task")
    keywords = {k: options[k] for k in (*_GENERATION_OPTIONS, "instruction") if k in options}
    request = _Request(image, prompt, regions, task, [], options.get("objects"), keywords)
    if task is None:
        return request
    if regions is not None:
        raise RequestError(f"regions: only for a free request, not task {task!r}")
    needed = TASKS[task]
    if needed is not None:
        if prompt:
            raise RequestError(
                f"prompt: must be empty for task {task!r} (options.{needed} says what), got {prompt[:80]!r}"
            )
        request.names = [options[needed]] if needed == "phrase" else list(options[needed])
    elif not prompt:
        raise RequestError(
            f"prompt: task {task!r} needs the {'instruction' if task == 'edit' else 'description'}"
        )
    if task == "generate" and image is not None:
        raise RequestError("image: task 'generate' takes no image (use task 'edit' to change one)")
    if task != "generate" and image is None:
        raise RequestError(f"image: task {task!r} needs an image (image or image_raw)")
    return request


def _call(pipeline, request: _Request):
    kw = request.keywords
    task = request.task
    if task is None:
        return pipeline(request.image, request.prompt, regions=request.regions, **kw)
    if task == "generate":
        return pipeline.generate_image(request.prompt, **kw)
    if task == "edit":
        return pipeline.edit_image(request.image, request.prompt, **kw)
    if task == "pose" and request.objects is not None:
        return pipeline.pose(request.image, request.names, objects=request.objects, **kw)
    shortcut = {"detect": pipeline.detect, "segment": pipeline.segment, "pose": pipeline.pose}.get(task)
    if shortcut is not None:
        return shortcut(request.image, request.names, **kw)
    return pipeline.ground(request.image, request.names[0], **kw)


def _stack(arrays: list[np.ndarray], empty_shape: tuple[int, ...], what: str) -> np.ndarray:
    if not arrays:
        return np.zeros(empty_shape, dtype=np.uint8)
    shape = arrays[0].shape
    if any(a.shape != shape for a in arrays):
        raise RuntimeError(f"{what}: expected one size, got {sorted({a.shape for a in arrays})}")
    return np.ascontiguousarray(np.stack(arrays).astype(np.uint8))


def encode_result(result: Result) -> dict[str, np.ndarray]:
    """A `Result` as the outputs of `visionllm`."""
    masks = [d.mask for d in result.detections if d.mask is not None]
    if result.segmentation is not None:
        label_map = result.segmentation.label_map
        masks += [label_map == k for k in range(len(result.segmentation.labels))]
    images = []
    if result.images:
        height = max(im.shape[0] for im in result.images)
        width = max(im.shape[1] for im in result.images)
        for im in result.images:
            padded = np.zeros((height, width, 3), dtype=np.uint8)
            padded[: im.shape[0], : im.shape[1]] = im
            images.append(padded)
    return {
        "result": np.array([result.to_json(indent=None).encode("utf-8")], dtype=BYTES),
        "masks": _stack(masks, (0, 0, 0), "masks"),
        "images": _stack(images, (0, 0, 0, 3), "images"),
    }


def run_request(pipeline, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Answers one request of the `visionllm` model with `pipeline` (a `Pipeline`).

    Raises:
        RequestError: a malformed input or option (named in the message).
        ValueError: what the Pipeline refuses (a prompt over the context, max_new_tokens 0, a region count
            that does not match the prompt, ...), with its message.
    """
    return encode_result(_call(pipeline, _decode(inputs)))


def _text_output(piece: str) -> dict[str, np.ndarray]:
    return {"text": np.array([piece.encode("utf-8")], dtype=BYTES)}


def stream_request(pipeline, inputs: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """Answers one request of the `visionllm_stream` model: `{"text": ...}` per decoded piece, then the
    outputs of `visionllm`. A task shortcut decodes nothing (its answer is forced in one prefill): its text
    comes as one piece. The request is checked before anything is yielded."""
    request = _decode(inputs)
    if request.task is not None:
        result = _call(pipeline, request)
        if result.text:
            yield _text_output(result.text)
        yield encode_result(result)
        return
    for item in pipeline.stream(request.image, request.prompt, regions=request.regions, **request.keywords):
        if isinstance(item, str):
            yield _text_output(item)
        else:
            yield encode_result(item)


# --- the client side ----------------------------------------------------------------------------------------


def _bytes_tensor(text: str) -> np.ndarray:
    return np.array([text.encode("utf-8")], dtype=BYTES)


def encode_request(image=None, prompt: str = "", regions=None, **options) -> dict[str, np.ndarray]:
    """The inputs of one request.

    Args:
        image: None, encoded bytes (PNG/JPEG), a path to such a file, a PIL image or an H x W x 3 uint8 RGB
            array (sent as `image_raw`).
        prompt: the user's text (empty for the detect/ground/segment/pose tasks).
        regions: boxes (x0, y0, x1, y1) in image pixels, one per `<region>` of the prompt.
        **options: the keys of `OPTION_TYPES` (None values are left out), checked here as the server does.
    """
    inputs = {"prompt": _bytes_tensor(prompt)}
    if isinstance(image, (bytes, bytearray, memoryview)):
        inputs["image"] = np.frombuffer(bytes(image), dtype=np.uint8)
    elif isinstance(image, (str, Path)):
        inputs["image"] = np.frombuffer(Path(image).read_bytes(), dtype=np.uint8)
    elif image is not None:
        if not isinstance(image, np.ndarray):  # a PIL image
            image = np.asarray(image.convert("RGB"))
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(
                f"image: expected an H x W x 3 uint8 RGB array, got {array.dtype} {list(array.shape)}"
            )
        inputs["image_raw"] = np.ascontiguousarray(array)
    if regions is not None:
        boxes = np.asarray(regions, dtype=np.float32)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"regions: expected boxes (x0, y0, x1, y1), got shape {list(boxes.shape)}")
        inputs["regions"] = boxes
    options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items() if v is not None}
    if options:
        inputs["options"] = _bytes_tensor(json.dumps(check_options(options)))
    return inputs


def _as_string(value) -> str:
    item = np.asarray(value).reshape(-1)[0]
    return item.decode("utf-8") if isinstance(item, (bytes, np.bytes_)) else str(item)


def decode_response(outputs: dict[str, np.ndarray]) -> Result:
    """The `Result` of a `visionllm` response (or a stream's last one): the JSON with masks and images.
    An absent or None `masks` / `images` is read as empty (PyTriton cannot send an empty tensor)."""
    d = json.loads(_as_string(outputs["result"]))
    masks = outputs.get("masks")
    masks = np.zeros((0, 0, 0), dtype=np.uint8) if masks is None else np.asarray(masks)
    images = outputs.get("images")
    images = np.zeros((0, 0, 0, 3), dtype=np.uint8) if images is None else np.asarray(images)
    has_mask = ["mask_area" in det for det in d["detections"]]
    labels = [] if d["segmentation"] is None else d["segmentation"]["labels"]
    if masks.shape[0] != sum(has_mask) + len(labels):
        raise ValueError(
            f"masks: expected {sum(has_mask)} detection masks and {len(labels)} semantic-map masks, "
            f"got {masks.shape[0]}"
        )
    if images.shape[0] != len(d["images"]):
        raise ValueError(f"images: the result names {len(d['images'])}, got {images.shape[0]}")
    mask_iter = iter(masks.astype(bool))
    detections = [
        Detection(
            det["label"],
            det["kind"],
            det["score"],
            tuple(det["box_xyxy"]),
            next(mask_iter) if with_mask else None,
            det["query_index"],
        )
        for det, with_mask in zip(d["detections"], has_mask)
    ]
    segmentation = None
    if d["segmentation"] is not None:
        class_masks = list(mask_iter)
        label_map = np.full(masks.shape[1:], -1, dtype=np.int32)
        for k, m in enumerate(class_masks):
            label_map[m] = k
        segmentation = SemanticMap(label_map, list(labels))
    poses = [
        Pose(
            p["label"],
            p["score"],
            tuple(p["box_xyxy"]),
            np.asarray(p["keypoints"], dtype=np.float32).reshape(-1, 3),
            list(p["keypoint_names"]),
        )
        for p in d["poses"]
    ]
    return Result(
        text=d["text"],
        token_ids=list(d["token_ids"]),
        stop_reason=d["stop_reason"],
        links=[Link(lk["kind"], lk["label"], lk["position"]) for lk in d["links"]],
        detections=detections,
        segmentation=segmentation,
        poses=poses,
        images=[np.ascontiguousarray(images[i, :h, :w]) for i, (h, w, _) in enumerate(d["images"])],
        timings=dict(d["timings_ms"]),
    )
