"""`visionllm-edge bench ARTIFACT`: per-stage latency, decode ms/token at set KV lengths, memory, each stage
against the hardware floor measured in the same run, and optionally the PyTorch reference on the same
requests.

**Times.** Every runtime time comes from the C++ loop's own clocks: `result.timings` per stage (preprocess,
vision, region, tokenize, prefill = time to first token, decode, link = the super-link hand-off,
object_decoder, pose_decoder, gen_decoder / edit_decoder with denoise = the DDIM loop inside them,
postprocess, total) and
`result.raw["stats"]` (decode_steps, decode_engine_ms, reused_rows, diffusion_steps and the per-step
diffusion_step_ms_min / _median / _max). Stages the loop does not report are absent, not zero. Each
repetition of a task uses a fresh picture, so the frame cache does not hide the vision encoder; the system
prompt's KV rows are reused as they are in use (`reused_rows` is reported).

**Decode at a past of P rows.** A text prompt of filler words is sized (two probe requests give the rows per
word) so that it fills about P rows, then `--new-tokens` steps are decoded; ms/token is the decode stage over
the decode steps (the engine's share is reported too). The past reached is reported as measured.

**Floors** (each measured by this tool in the same run, on this machine, with the bench's threads; every rate
is the best of samples taken before the timed work, after the decode runs, after each task and at the end,
since on a shared machine one busy moment would lower a rate and so raise its floor above the truth):
- Read bandwidth: BLAS's dot product of each part of a random array with itself, the parts split across
  the threads (one read of each value; best of 5), 256 MiB for DRAM. The decode floor at a past = (the
  LLM graph's bytes, external data included, + the KV bytes read at that past) ÷ the read rate of a
  working set of that size: DRAM's once it is 256 MiB or more, else that of an array of that size read
  over and over, which the caches serve (a small model's weights stay in L2 / L3, where a
  DRAM floor would not bound its decode).
- GEMM rates, through ONNX Runtime itself (the library the runtime opens, through the runtime's own engine,
  with intra-op threads = `--threads`): fp32 `MatMul`, int8 `DynamicQuantizeMatMul` (A quantized to u8 per
  call, s8 weights: what ONNX Runtime makes of the exporter's dynamic int8 MatMuls) and 4-bit `MatMulNBits`
  (block 32, accuracy level 4: the exporter's setting) on square products of 1024 and 2048, the median of 5
  tries each (a single try can be timed short), the better size kept.
  The int8 and 4-bit rates are measured only when the artifact has an int8 / int4 graph. The graphs are
  built here as ONNX bytes (`_onnx_model`: a few protobuf fields written by hand), so neither the `onnx`
  package nor a committed binary is needed, and the weights are initializers, as in an exported graph (ONNX
  Runtime pre-packs constant weights; a weight fed as an input would time a slower path).
- Compute floors for prefill, vision, region, each decoder, the denoising loop, each diffusion step and end
  to end: FLOPs ÷ the GEMM rate of their class (fp32 / int8 / 4-bit). The FLOPs are counted from the graphs
  at the shapes that ran: each task's request is repeated once in a pipeline loaded with ONNX Runtime's
  session profile on (`Pipeline.load(profile_dir=...)`), after one unprofiled-shape warm request and a
  pause, and `_core.profile_flops` (csrc/engines/ort_profile.h) counts every matrix kernel (MatMul, Gemm,
  Conv, ConvTranspose, their fused and quantized forms) of the last request's runs; the pause separates the
  two requests in each graph's timeline. Element-wise work is not counted, so a floor is a lower bound; a
  ratio below 1 means a wrong floor and is flagged.

**--compare reference.** The PyTorch `ReferencePipeline` (torch needed: the `[export]` extra) runs the same
requests in the same run, interleaved with the runtime's (runtime, reference, runtime, ...); per task its
stages (the reference times preprocess, vision, region, tokenize, prefill, decode, each decoder,
postprocess) and end to end, and the runtime's speed-up. The perception shortcuts are the official forced
answers (one prefill); the reference runs them as `run(..., answer_prefix=answer, max_new_tokens=1)`, the
same prefill plus one greedy token. Its weights: the artifact's `model.name` when the reference can rebuild
it (tiny-random, visionllmv2-7b-2layer: seeded; shapes-tiny: the bundled checkpoint), or
`--reference-source PATH|NAME`; either way the reference's token table must equal the artifact's
`embeddings.safetensors`, or the source is refused by name.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: Task -> components it needs (contract.COMPONENT_GRAPHS keys).
TASKS: dict[str, tuple[str, ...]] = {
    "vqa": ("vision", "llm"),
    "caption": ("vision", "llm"),
    "detect": ("vision", "llm", "det"),
    "ground": ("vision", "llm", "det"),
    "segment": ("vision", "llm", "det"),
    "pose": ("vision", "llm", "pose"),
    "generate": ("llm", "gen"),
    "edit": ("vision", "llm", "edit"),
}
#: The issue's perception tasks: the ones held to the speed-up bar over the reference.
PERCEPTION_TASKS = ("detect", "ground", "segment", "pose")
#: Stage -> the graphs whose runs it times (prefill and decode split the llm's runs: the first is prefill).
STAGE_GRAPHS: dict[str, tuple[str, ...]] = {
    "vision": ("vision",),
    "region": ("region",),
    "prefill": ("llm",),
    "object_decoder": ("det",),
    "pose_decoder": ("pose",),
    "gen_decoder": ("gen_mapper", "gen_unet", "gen_vae_decoder"),
    "edit_decoder": ("edit_mapper", "edit_vae_encoder", "edit_unet", "edit_vae_decoder"),
    "denoise": ("gen_unet", "edit_unet"),
}
FILLER = "a "  # one or two tokens a word in any Llama-like vocabulary; the rows per word are measured
PROFILE_GAP_S = 0.5  # pause between the warm and the profiled request of the FLOP pass


class BenchError(ValueError):
    """A bad bench option (unknown task, a past over the arena's capacity, a missing component, ...)."""


def summary(values) -> dict[str, float]:
    v = np.asarray(list(values), dtype=np.float64)
    return {
        "min": float(v.min()),
        "median": float(np.median(v)),
        "p90": float(np.percentile(v, 90)),
        "max": float(v.max()),
        "n": int(v.size),
    }


def _scene(seed: int, width: int = 224, height: int = 168) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([(xx * 255 // (width - 1)), (yy * 255 // (height - 1)), (xx + yy) % 256], -1)
    return (img * 0.6 + rng.uniform(0, 255, (height, width, 3)) * 0.4).astype(np.uint8)


def parse_tasks(text: str | None, components) -> tuple[list[str], list[str]]:
    """(tasks to run, tasks skipped for a missing component). Asked-for tasks must all be servable."""
    have = set(components)
    if text:
        asked = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in asked if t not in TASKS]
        if unknown:
            raise BenchError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
        for t in asked:
            missing = [c for c in TASKS[t] if c not in have]
            if missing:
                raise BenchError(
                    f"task {t} needs component(s) {', '.join(missing)}, which the artifact lacks "
                    f"(it has {', '.join(components) or 'none'})"
                )
        return list(dict.fromkeys(asked)), []
    run = [t for t, need in TASKS.items() if all(c in have for c in need)]
    return run, [t for t in TASKS if t not in run]


def parse_past(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchError(f"--past takes comma-separated row counts, got {text!r}") from None
    bad = [v for v in values if v <= 0]
    if bad:
        raise BenchError(f"--past lengths must be positive, got {bad}")
    return values


def check_plot_path(path) -> Path | None:
    """`--plot`: a .png file in an existing, writable folder (checked before any timing)."""
    if path is None:
        return None
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise BenchError(f"--plot writes a PNG: the file name must end in .png, got {str(path)!r}")
    if not p.parent.is_dir():
        raise BenchError(f"--plot {str(path)!r}: the folder {str(p.parent)!r} does not exist")
    if not os.access(p.parent, os.W_OK):
        raise BenchError(f"--plot {str(path)!r}: the folder {str(p.parent)!r} is not writable")
    return p


# --- hardware floors --------------------------------------------------------------------------------------


DRAM_SET = 256 * 2**20  # bytes: well past any last-level cache here, so its reads come from DRAM


def read_bandwidth(threads: int, nbytes: int = DRAM_SET, tries: int = 5) -> float:
    """Bytes/s of reads of an `nbytes` float32 array (at least 1 MiB, at most `DRAM_SET`) split over
    `threads` threads; each try reads at least `DRAM_SET` bytes (a small array over and over); best of
    `tries`. Each thread reads its part with BLAS's dot product of the part with itself (one read of each
    value, two FLOPs a value): numpy's `sum` is pairwise and read at 14 GB/s where this reads at 34 and
    ONNX Runtime's decode at 43, which put decode under its floor."""
    size = int(min(max(nbytes, 2**20), DRAM_SET))
    a = np.random.default_rng(0).standard_normal(size // 4).astype(np.float32)
    parts = np.array_split(a, max(threads, 1))
    passes = max(1, DRAM_SET // a.nbytes)

    def read(part):
        for _ in range(passes):
            np.dot(part, part)

    best = 0.0
    with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
        list(pool.map(read, parts))  # first touch
        for _ in range(tries):
            t0 = time.perf_counter()
            list(pool.map(read, parts))
            best = max(best, a.nbytes * passes / (time.perf_counter() - t0))
    return best


# ONNX as bytes. Field numbers from onnx/onnx.proto (ModelProto, GraphProto, NodeProto, AttributeProto,
# TensorProto, ValueInfoProto, TypeProto); only what a one-node graph needs.
_FLOAT, _UINT8, _INT8 = 1, 2, 3


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes_field(number: int, data: bytes | str) -> bytes:
    data = data.encode() if isinstance(data, str) else data
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _value_info(name: str, elem_type: int, shape) -> bytes:
    dims = b"".join(_bytes_field(1, _int_field(1, d)) for d in shape)
    tensor_type = _int_field(1, elem_type) + _bytes_field(2, dims)
    return _bytes_field(1, name) + _bytes_field(2, _bytes_field(1, tensor_type))


def _initializer(name: str, array: np.ndarray, elem_type: int) -> bytes:
    dims = b"".join(_int_field(1, d) for d in array.shape)
    return dims + _int_field(2, elem_type) + _bytes_field(8, name) + _bytes_field(9, array.tobytes())


def _onnx_model(op: str, inputs, initializers, output, attributes=None, domain: str = "") -> bytes:
    """One node `op(inputs + initializers) -> output` as ModelProto bytes (IR 8, opset 17 + com.microsoft 1).

    inputs: [(name, elem_type, shape)]; initializers: [(name, array, elem_type)]; output: (name, type, shape).
    """
    attrs = b"".join(
        _bytes_field(5, _bytes_field(1, k) + _int_field(3, v) + _int_field(20, 2))  # type 2: INT
        for k, v in (attributes or {}).items()
    )
    names = [n for n, _, _ in inputs] + [n for n, _, _ in initializers]
    node = b"".join(_bytes_field(1, n) for n in names) + _bytes_field(2, output[0]) + _bytes_field(4, op)
    node += attrs + (_bytes_field(7, domain) if domain else b"")
    graph = _bytes_field(1, node) + _bytes_field(2, "floor")
    graph += b"".join(_bytes_field(5, _initializer(*i)) for i in initializers)
    graph += b"".join(_bytes_field(11, _value_info(*i)) for i in inputs)
    graph += _bytes_field(12, _value_info(*output))
    opsets = _bytes_field(8, _int_field(2, 17)) + _bytes_field(
        8, _bytes_field(1, "com.microsoft") + _int_field(2, 1)
    )
    return _int_field(1, 8) + opsets + _bytes_field(7, graph)


def gemm_graph(kind: str, n: int, seed: int = 0) -> tuple[bytes, dict[str, np.ndarray], np.ndarray]:
    """(model bytes, feeds, the expected output) of an n x n x n product of `kind` fp32 | int8 | nbits."""
    rng = np.random.default_rng(seed)
    if kind == "fp32":
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        model = _onnx_model("MatMul", [("a", _FLOAT, a.shape)], [("b", b, _FLOAT)], ("y", _FLOAT, (n, n)))
        return model, {"a": a}, a @ b
    if kind == "int8":
        # A is quantized to uint8 per call, as in the exporter's dynamically quantized graphs (ONNX Runtime
        # fuses their DynamicQuantizeLinear + MatMulInteger into this op).
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.integers(-127, 128, (n, n), dtype=np.int8)
        scale = np.full((n,), 0.01, dtype=np.float32)
        model = _onnx_model(
            "DynamicQuantizeMatMul",
            [("a", _FLOAT, a.shape)],
            [("b", b, _INT8), ("b_scale", scale, _FLOAT)],
            ("y", _FLOAT, (n, n)),
            domain="com.microsoft",
        )
        return model, {"a": a}, a @ (b.astype(np.float32) * scale)
    if kind == "nbits":
        # Symmetric 4-bit blocks of 32 along K, zero point 8 (the default without a zero-point input):
        # column j's block k holds nibbles q (low nibble first), weight = (q - 8) * scale.
        block = 32
        a = rng.standard_normal((n, n), dtype=np.float32)
        q = rng.integers(0, 16, (n, n // block, block), dtype=np.uint8)  # [N, K/32, 32]
        scales = rng.uniform(0.01, 0.02, (n, n // block)).astype(np.float32)
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # [N, K/32, 16]
        weight = ((q.astype(np.float32) - 8.0) * scales[..., None]).reshape(n, n)  # [N, K]
        model = _onnx_model(
            "MatMulNBits",
            [("a", _FLOAT, a.shape)],
            [("b", packed, _UINT8), ("scales", scales.reshape(-1), _FLOAT)],
            ("y", _FLOAT, (n, n)),
            attributes={"K": n, "N": n, "bits": 4, "block_size": block, "accuracy_level": 4},
            domain="com.microsoft",
        )
        return model, {"a": a}, a @ weight.T
    raise BenchError(f"unknown GEMM kind {kind!r}; known: fp32, int8, nbits")


def gemm_rate(kind: str, threads: int, providers=None, sizes=(1024, 2048), tries: int = 5) -> dict:
    """FLOP/s of `kind` through the runtime's ONNX Runtime engine at `threads`: the median of `tries`, best
    over sizes."""
    from visionllm_edge.runtime.engine import make_engine

    best, best_n = 0.0, 0
    with tempfile.TemporaryDirectory(prefix="vle-bench-gemm-") as tmp:
        for n in sizes:
            model, feeds, _ = gemm_graph(kind, n)
            path = Path(tmp) / f"{kind}_{n}.onnx"
            path.write_bytes(model)
            engine = make_engine(path, "onnxruntime", providers, threads, f"gemm_{kind}_{n}")
            engine.run(feeds)
            seconds = []
            for _ in range(tries):
                t0 = time.perf_counter()
                engine.run(feeds)
                seconds.append(time.perf_counter() - t0)
            # The median of the tries: one try the VM's clock shortened once read 449 GFLOP/s on 2 cores.
            rate = 2.0 * n**3 / float(np.median(seconds))
            if rate > best:
                best, best_n = rate, n
            del engine
    return {"flops_per_s": best, "n": best_n}


class Rates:
    """The best read and GEMM rates seen over a run. A busy moment on a shared machine measures a rate below
    the machine's, and a floor from it is too high (a ratio below 1 that says nothing about the runtime), so
    the rates are sampled before, between and after the timed work, and every floor uses the best sample."""

    def __init__(self, threads: int, providers, kinds):
        self.threads, self.providers = threads, providers
        self.read_threads = threads or os.cpu_count() or 1
        self.gemm = {k: {"flops_per_s": 0.0, "n": 0} for k in kinds}
        self.read: dict[int, float] = {DRAM_SET: 0.0}  # working-set bytes, clipped as read_bandwidth does
        self.samples = 0

    @staticmethod
    def _key(nbytes: float) -> int:
        return int(min(max(nbytes, 2**20), DRAM_SET))

    def want(self, nbytes: float) -> None:
        """Measure the read rate of an `nbytes` working set from the next sample on."""
        self.read.setdefault(self._key(nbytes), 0.0)

    def sample(self) -> None:
        for size in self.read:
            self.read[size] = max(self.read[size], read_bandwidth(self.read_threads, size))
        for kind, best in self.gemm.items():
            got = gemm_rate(kind, self.threads, self.providers)
            if got["flops_per_s"] > best["flops_per_s"]:
                self.gemm[kind] = got
        self.samples += 1

    def read_rate(self, nbytes: float) -> float:
        return self.read[self._key(nbytes)]

    def flops(self) -> dict[str, float]:
        return {k: v["flops_per_s"] for k, v in self.gemm.items()}


# --- machine facts ----------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _load_average() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def machine(threads: int, providers) -> dict:
    try:
        import onnxruntime as ort

        ort_version, available = ort.__version__, list(ort.get_available_providers())
    except ImportError:
        ort_version, available = None, []
    from visionllm_edge import __version__

    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "threads_note": "ONNX Runtime's default" if threads == 0 else "intra-op threads per graph",
        "load_average": _load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort_version,
        "providers_available": available,
        "providers_used": list(providers or ["CPUExecutionProvider"]),
        "visionllm_edge": __version__,
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def llm_weight_bytes(manifest) -> int:
    g = manifest.graphs["llm"]
    return int(g.size_bytes) + sum(p.stat().st_size for p in g.external_data if p.exists())


# --- the reference ----------------------------------------------------------------------------------------


def resolve_reference_source(manifest, source: str | None) -> str:
    """What `load_reference` reads for the comparison: `source`, else the artifact's recorded model name.

    A path must be a folder; a name must be one the reference rebuilds (its seeded configurations or the
    bundled shapes-tiny). Checked before any timing; the weights are checked once loaded
    (`load_reference_for`).
    """
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise BenchError(
            f"--compare reference needs the PyTorch reference: the package {e.name or 'torch'!r} is missing "
            "(pip install 'visionllm-edge[export]')"
        ) from None
    from visionllm_edge.export.checkpoint import BUILDABLE_CONFIGS, BUNDLED_MODEL

    names = (*BUILDABLE_CONFIGS, BUNDLED_MODEL)
    if source is None:
        name = manifest.model.name
        if name not in names:
            raise BenchError(
                f"--compare reference: the artifact records model {name!r}, which the reference cannot "
                f"rebuild (it rebuilds {', '.join(names)}); give its checkpoint folder with "
                "--reference-source PATH"
            )
        return name
    if Path(source).exists():
        if not Path(source).is_dir():
            raise BenchError(f"--reference-source {source!r}: not a checkpoint folder")
        return str(source)
    if source not in names:
        raise BenchError(
            f"--reference-source {source!r}: neither a checkpoint folder nor a model the reference rebuilds "
            f"({', '.join(names)})"
        )
    return source


def load_reference_for(manifest, source: str):
    """The `ReferencePipeline` of `source`, refused when its token table is not the artifact's."""
    from safetensors.numpy import load_file

    from visionllm_edge.export import ReferencePipeline, load_reference

    model = load_reference(source)
    table = load_file(str(manifest.artifact_dir / manifest.embeddings.file))[manifest.embeddings.token_table]
    ours = model.llm.model.embed_tokens.weight.detach().float().numpy()
    if ours.shape != table.shape or not np.allclose(ours, table.astype(np.float32), rtol=1e-2, atol=1e-3):
        raise BenchError(
            f"--compare reference: {source!r} does not hold this artifact's weights (its token table "
            f"{list(ours.shape)} differs from {manifest.embeddings.file} {list(table.shape)}); give the "
            "checkpoint it was exported from with --reference-source PATH"
        )
    return ReferencePipeline(model)


# --- the requests -----------------------------------------------------------------------------------------


class Requests:
    """The same request of each task for the runtime and the reference (the templates the shortcuts use)."""

    CLASSES = ("circle", "square")
    KEYPOINTS = ("nose", "left eye", "right eye")

    def __init__(self, manifest, components, new_tokens: int):
        self.components = components
        self.new_tokens = new_tokens
        # One noise per UNet: generation and editing may run at different latent sizes (the 7B: 64 and 32).
        self.noise = {}
        for task, graph in (("generate", "gen_unet"), ("edit", "edit_unet")):
            unet = manifest.graphs.get(graph)
            if unet is not None:
                latent = int(unet.facts["latent_size"])
                rng = np.random.default_rng(0)
                self.noise[task] = rng.standard_normal((1, 4, latent, latent)).astype(np.float32)

    def _vqa(self, image):
        if "region" in self.components:
            h, w = image.shape[:2]
            return "What is in <region>?", [(w * 0.2, h * 0.2, w * 0.7, h * 0.8)]
        return "What is in the image?", None

    def runtime(self, pipe, task: str, image):
        n = self.new_tokens
        if task == "vqa":
            prompt, regions = self._vqa(image)
            return pipe(image, prompt, regions=regions, max_new_tokens=n)
        if task == "caption":
            return pipe(image, "Describe the image briefly.", max_new_tokens=n)
        if task == "detect":
            return pipe.detect(image, list(self.CLASSES))
        if task == "ground":
            return pipe.ground(image, "the red circle")
        if task == "segment":
            return pipe.segment(image, list(self.CLASSES))
        if task == "pose":
            return pipe.pose(image, list(self.KEYPOINTS))
        if task == "generate":
            return pipe.generate_image("a red circle on a blue square", noise=self.noise["generate"])
        if task == "edit":
            return pipe.edit_image(image, "make the circle blue", noise=self.noise["edit"])
        raise BenchError(f"unknown task {task}")

    def reference(self, ref, task: str, image):
        from visionllm_edge import templates

        n, forced = self.new_tokens, dict(max_new_tokens=1)
        if task == "vqa":
            prompt, regions = self._vqa(image)
            return ref.run(image, prompt, regions=regions, max_new_tokens=n)
        if task == "caption":
            return ref.run(image, "Describe the image briefly.", max_new_tokens=n)
        if task == "detect":
            q, a = templates.detection(self.CLASSES)
            return ref.run(image, q, answer_prefix=a, **forced)
        if task == "ground":
            q, a = templates.grounding("the red circle")
            return ref.run(image, q, answer_prefix=a, **forced)
        if task == "segment":
            q, a = templates.segmentation(self.CLASSES)
            return ref.run(image, q, answer_prefix=a, **forced)
        if task == "pose":
            history, q, a = templates.pose(self.KEYPOINTS)
            return ref.run(image, q, history=history, answer_prefix=a, **forced)
        if task == "generate":
            q, a = templates.generation("a red circle on a blue square")
            return ref.run(None, q, answer_prefix=a, noise=self.noise["generate"], **forced)
        if task == "edit":
            q, a = templates.editing("make the circle blue")
            return ref.run(image, q, answer_prefix=a, noise=self.noise["edit"], **forced)
        raise BenchError(f"unknown task {task}")


# --- FLOPs from the profiled pass -------------------------------------------------------------------------


def last_request_runs(runs: list[dict], gap_us: float) -> list[dict]:
    """The runs after the last pause longer than `gap_us` (end of one run to the start of the next)."""
    runs = sorted(runs, key=lambda r: r["ts_us"])
    start = 0
    for i in range(1, len(runs)):
        if runs[i]["ts_us"] - (runs[i - 1]["ts_us"] + runs[i - 1]["dur_us"]) > gap_us:
            start = i
    return runs[start:]


def _flops_sum(runs) -> dict:
    out = {"float": 0, "int8": 0, "nbits": 0, "uncounted": {}}
    for r in runs:
        for k in ("float", "int8", "nbits"):
            out[k] += int(r[k])
        for op, c in r["uncounted"].items():
            out["uncounted"][op] = out["uncounted"].get(op, 0) + int(c)
    return out


def profile_task(folder, task: str, requests: Requests, threads: int, providers, scratch: Path) -> dict:
    """{stage: FLOPs by class} of one request of `task`, counted from its graphs' profiles (module docstring).

    The llm's runs of the counted request must number 1 + its decode steps (prefill, then one per step): a
    different count means the pause did not separate the requests, and is an error rather than a wrong floor.
    """
    from visionllm_edge import _core
    from visionllm_edge.pipeline import Pipeline

    where = scratch / task
    where.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.load(folder, providers=providers, threads=threads, verify_hashes=False, profile_dir=where)
    requests.runtime(pipe, task, _scene(7001))
    time.sleep(PROFILE_GAP_S)
    result = requests.runtime(pipe, task, _scene(7002))
    files = pipe.end_profiling()
    del pipe
    graphs = {
        g: last_request_runs(_core.profile_flops(f), gap_us=PROFILE_GAP_S * 0.5e6) for g, f in files.items()
    }
    steps = int(result.raw["stats"].get("decode_steps", 0))
    llm = graphs.get("llm", [])
    if llm and len(llm) != 1 + steps:
        raise BenchError(
            f"FLOP pass of {task}: the counted request has {len(llm)} llm runs, expected 1 prefill + {steps} "
            "decode steps (the pause between the profiled requests did not separate them)"
        )
    stages: dict[str, dict] = {}
    for stage, names in STAGE_GRAPHS.items():
        runs = [r for g in names for r in graphs.get(g, [])]
        if stage == "prefill":
            runs = llm[:1]
        if runs:
            stages[stage] = _flops_sum(runs)
    if len(llm) > 1:
        stages["decode"] = _flops_sum(llm[1:])
    stages["end_to_end"] = _flops_sum([r for runs in graphs.values() for r in runs])
    return stages


def _floor_ms(flops: dict, rates: dict) -> float | None:
    """ms of `flops` at `rates` (FLOP/s by class); None when a class that has FLOPs has no rate."""
    total = 0.0
    for cls, rate_key in (("float", "fp32"), ("int8", "int8"), ("nbits", "nbits")):
        if flops[cls]:
            rate = rates.get(rate_key)
            if not rate:
                return None
            total += flops[cls] / rate * 1e3
    return total


# --- the run ----------------------------------------------------------------------------------------------


def _decode_at(pipe, past: int, new_tokens: int, image, reps: int, warmup: int, progress):
    """Decode figures with a prompt of about `past` rows."""

    def run(words: int, n: int, seed: int):
        kw = dict(max_new_tokens=n, repetition_penalty=1.3)
        prompt = f"{seed} " + FILLER * words
        try:
            return pipe(None, prompt, **kw)
        except ValueError as e:  # random weights can route to a perception decoder, which needs an image
            if "needs an image" not in str(e):
                raise
            return pipe(image, prompt, **kw)

    r0 = run(0, 1, 0)
    r1 = run(64, 1, 0)
    base, per_word = len(r0.raw["input_ids"]), (len(r1.raw["input_ids"]) - len(r0.raw["input_ids"])) / 64
    words = max(0, round((past - base) / max(per_word, 1e-9)))
    ms_tok, eng_tok, rows = [], [], []
    for i in range(warmup + reps):
        progress(f"decode at past {past}")
        r = run(words, new_tokens, i + 1)
        steps = float(r.raw["stats"].get("decode_steps", 0))
        if i < warmup or steps <= 0:
            continue
        ms_tok.append(r.timings["decode"] / steps)
        eng_tok.append(float(r.raw["stats"]["decode_engine_ms"]) / steps)
        rows.append(len(r.raw["input_ids"]))
    if not ms_tok:
        raise BenchError(f"decode at past {past}: no request fed a decode step (every answer ended at once)")
    return {
        "past": past,
        "past_reached": summary(rows),
        "ms_per_token": summary(ms_tok),
        "engine_ms_per_token": summary(eng_tok),
    }


def _diffusion(stats: list[dict]) -> dict | None:
    """Per-step figures over the repetitions from the loop's diffusion_* stats; None without them."""
    rows = [s for s in stats if s.get("diffusion_steps")]
    if not rows:
        return None
    return {
        "steps": summary(s["diffusion_steps"] for s in rows),
        "step_ms": {
            "min": float(min(s["diffusion_step_ms_min"] for s in rows)),
            "median": float(np.median([s["diffusion_step_ms_median"] for s in rows])),
            "max": float(max(s["diffusion_step_ms_max"] for s in rows)),
            "n": len(rows),
        },
    }


class _Progress:
    """Requests done / total and what is being timed: one line redrawn on a terminal, else one per phase."""

    def __init__(self, stream=None, quiet: bool = False):
        self.total, self.done, self.quiet = 0, 0, quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = None

    def __call__(self, what: str, requests: int = 1, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        self.done = min(self.total, self.done + requests)
        if self.quiet:
            return
        if self.tty:
            width = 24
            fill = round(width * self.done / max(self.total, 1))
            bar = "#" * fill + "." * (width - fill)
            print(
                f"\r\033[K[bench] [{bar}] {self.done}/{self.total} {what}",
                end="",
                file=self.stream,
                flush=True,
            )
        elif what != self.last:
            print(f"[bench] {self.done}/{self.total} {what}", file=self.stream, flush=True)
        self.last = what

    def close(self) -> None:
        if self.tty and not self.quiet:
            print(file=self.stream, flush=True)


def _time_task(pipe, ref, requests: Requests, task: str, ti: int, warmup: int, repeat: int, say) -> dict:
    """One task's repetitions: the runtime on a fresh frame each, the reference (if any) right after it."""
    stages: dict[str, list[float]] = {}
    ref_stages: dict[str, list[float]] = {}
    wall, ref_wall, reused, stats = [], [], [], []
    for i in range(warmup + repeat):
        image = _scene(1000 * ti + i)  # a fresh frame: vision runs every time
        t0 = time.perf_counter()
        r = requests.runtime(pipe, task, image)
        ms = (time.perf_counter() - t0) * 1e3
        say(f"{task}: runtime {i + 1}/{warmup + repeat}")
        if ref is not None:  # interleaved: runtime, reference, runtime, ...
            t0 = time.perf_counter()
            rr = requests.reference(ref, task, image)
            ref_ms = (time.perf_counter() - t0) * 1e3
            say(f"{task}: reference {i + 1}/{warmup + repeat}")
        if i < warmup:
            continue
        for stage, v in r.timings.items():
            stages.setdefault(stage, []).append(float(v))
        wall.append(ms)
        reused.append(float(r.raw["stats"].get("reused_rows", 0)))
        stats.append(dict(r.raw["stats"]))
        if ref is not None:
            for stage, v in rr.timings.items():
                ref_stages.setdefault(stage, []).append(float(v))
            ref_wall.append(ref_ms)
    t = {
        "stages_ms": {s: summary(v) for s, v in stages.items()},
        "end_to_end_ms": summary(wall),
        "reused_rows": summary(reused),
        "decode_steps": summary(float(s.get("decode_steps", 0)) for s in stats),
    }
    diffusion = _diffusion(stats)
    if diffusion:
        t["diffusion"] = diffusion
    if ref is not None:
        t["reference"] = {
            "stages_ms": {s: summary(v) for s, v in ref_stages.items()},
            "end_to_end_ms": summary(ref_wall),
        }
        t["speedup_over_reference"] = t["reference"]["end_to_end_ms"]["median"] / t["end_to_end_ms"]["median"]
        # Each side's fastest repetition: on a busy machine the least disturbed figure of the two.
        t["speedup_over_reference_min"] = t["reference"]["end_to_end_ms"]["min"] / t["end_to_end_ms"]["min"]
    return t


def run_bench(
    artifact,
    tasks: str | None = None,
    past: str | None = "128,512,2048",
    warmup: int = 1,
    repeat: int = 5,
    threads: int = 0,
    providers=None,
    new_tokens: int = 16,
    compare: str | None = None,
    reference_source: str | None = None,
    flops: bool = True,
    progress=None,
) -> dict:
    """Runs the benchmark; returns the JSON record. Bad options raise `BenchError` before any timing.

    `progress(what, requests=1, total=None)` is called as requests finish, first with the total
    (`_Progress` draws it).
    """
    from visionllm_edge.manifest import load_manifest
    from visionllm_edge.pipeline import Pipeline

    if repeat < 1:
        raise BenchError(f"--repeat must be at least 1, got {repeat}")
    if warmup < 0:
        raise BenchError(f"--warmup must be 0 or more, got {warmup}")
    if new_tokens < 1:
        raise BenchError(f"--new-tokens must be at least 1, got {new_tokens}")
    if threads < 0:
        raise BenchError(f"--threads must be 0 (ONNX Runtime's default) or more, got {threads}")
    if compare not in (None, "reference"):
        raise BenchError(f"--compare takes 'reference', got {compare!r}")
    if reference_source is not None and compare is None:
        raise BenchError("--reference-source is the reference's weights: it needs --compare reference")
    folder = Path(artifact)
    manifest = load_manifest(folder, verify_hashes=False)
    components = manifest.components
    task_list, skipped = parse_tasks(tasks, components)
    pasts = parse_past(past)
    if pasts and "llm" not in components:
        raise BenchError("--past needs the llm component, which the artifact lacks")
    ref_source = resolve_reference_source(manifest, reference_source) if compare else None
    say = progress or (lambda what, requests=1, total=None: None)

    pipe = Pipeline.load(folder, providers=providers, threads=threads, verify_hashes=False)
    cap = pipe.context_capacity
    over = [p for p in pasts if p + new_tokens > cap]
    if over:
        raise BenchError(
            f"--past {','.join(map(str, over))} (+ {new_tokens} new tokens) is over the KV arena's capacity "
            f"of {cap} rows"
        )
    requests = Requests(manifest, components, new_tokens)

    record: dict = {
        "kind": "visionllm-edge bench",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "artifact": {
            "path": str(folder.resolve()),
            "model": manifest.model.name,
            "manifest_sha256": _sha256(folder / "manifest.json"),
            "components": list(components),
            "precisions": {g: e.precision for g, e in manifest.graphs.items()},
        },
        "options": {
            "tasks": task_list,
            "skipped_tasks": skipped,
            "past": pasts,
            "warmup": warmup,
            "repeat": repeat,
            "threads": threads,
            "providers": list(providers or []),
            "new_tokens": new_tokens,
            "compare": compare,
            "reference_source": ref_source,
            "flops": flops,
        },
        "machine": machine(threads, providers),
    }

    reps = warmup + repeat
    total = len(pasts) * reps + len(task_list) * (1 + reps * (2 if compare else 1) + (2 if flops else 0))
    precisions = {e.precision for e in manifest.graphs.values()}
    kinds = ["fp32"] + ["int8"] * ("int8" in precisions) + ["nbits"] * ("int4" in precisions)
    rates = Rates(threads, providers, kinds)
    weights = llm_weight_bytes(manifest) if "llm" in components else 0
    if weights:
        rates.want(weights)  # a task's decode stage reads them once a step
    say("floors: read bandwidth, GEMM rates", 0, total=total)
    rates.sample()

    # Decode at each past, then one pass of every task: the runtime alone, so peak RSS is the runtime's.
    row_bytes = pipe.arena_bytes / cap
    decode = []
    for p in pasts:
        d = _decode_at(pipe, p, new_tokens, _scene(99), repeat, warmup, say)
        d["weight_bytes"] = weights
        d["kv_bytes_read"] = row_bytes * d["past_reached"]["median"]
        rates.want(weights + d["kv_bytes_read"])
        decode.append(d)
    record["decode"] = decode
    if pasts:
        rates.sample()
    for ti, task in enumerate(task_list):
        requests.runtime(pipe, task, _scene(500 + ti))
        say(f"{task}: first request")
    record["memory"] = {
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_note": "the runtime alone: after the decode runs and one request of every task, before "
        "the reference and the FLOP pass",
        "arena_bytes": pipe.arena_bytes,
        "context_capacity": cap,
    }

    ref = None
    if compare:
        say(f"loading the reference ({ref_source})", 0)
        import torch

        torch.set_num_threads(threads or os.cpu_count() or 1)
        ref = load_reference_for(manifest, ref_source)
        record["reference"] = {
            "source": ref_source,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }

    tasks_out: dict = {}
    for ti, task in enumerate(task_list):
        tasks_out[task] = _time_task(pipe, ref, requests, task, ti, warmup, repeat, say)
        rates.sample()
    record["tasks"] = tasks_out
    del ref, pipe  # the FLOP pass loads its own pipelines: one model in memory at a time

    counted: dict[str, dict] = {}
    if flops:
        with tempfile.TemporaryDirectory(prefix="vle-bench-profile-") as scratch:
            for task in task_list:
                say(f"{task}: FLOP pass (profiled)", 2)
                counted[task] = profile_task(folder, task, requests, threads, providers, Path(scratch))
    say("floors: read bandwidth, GEMM rates", 0)
    rates.sample()

    # Every floor from the best rates of the run.
    flop_rates = rates.flops()
    record["floors"] = {
        "dram_read_bytes_per_s": rates.read_rate(DRAM_SET),
        "read_threads": rates.read_threads,
        "read_bytes_per_s_by_working_set": {str(k): v for k, v in sorted(rates.read.items())},
        "gemm_flops_per_s": flop_rates,
        "gemm_n": {k: v["n"] for k, v in rates.gemm.items()},
        "samples": rates.samples,
        "note": "each rate is the best of the samples taken before, between and after the timed work. GEMM: "
        "one-node ONNX graphs (MatMul fp32; DynamicQuantizeMatMul u8s8; MatMulNBits 4-bit block 32, accuracy "
        f"4) through the runtime's engine at threads {threads} (0: ONNX Runtime's default), n = 1024 and "
        "2048, a sample the median of 5 tries",
    }
    flags = []

    def ratio(entry: dict, measured_ms: float, floor_ms: float | None, what: str) -> None:
        if not floor_ms:
            return
        entry["ratio_to_floor"] = measured_ms / floor_ms
        entry["ratio_below_1"] = entry["ratio_to_floor"] < 1.0
        if entry["ratio_below_1"]:
            flags.append(f"{what}: ratio {entry['ratio_to_floor']:.2f} is below 1 (a wrong floor)")

    for d in decode:
        d["read_bytes_per_s"] = rates.read_rate(weights + d["kv_bytes_read"])
        d["floor_ms_per_token"] = (weights + d["kv_bytes_read"]) / d["read_bytes_per_s"] * 1e3
        ratio(d, d["ms_per_token"]["median"], d["floor_ms_per_token"], f"decode at past {d['past']}")
    for task, stages in counted.items():
        t = tasks_out[task]
        t["floors"] = {}
        for stage, f in stages.items():
            measured = t["end_to_end_ms"] if stage == "end_to_end" else t["stages_ms"].get(stage)
            entry = {"flops": f, "floor_ms": _floor_ms(f, flop_rates)}
            if stage == "decode" and entry["floor_ms"]:
                # Each step reads every weight once: the larger of the two floors holds.
                entry["compute_floor_ms"] = entry["floor_ms"]
                steps = t["decode_steps"]["median"]
                entry["bandwidth_floor_ms"] = steps * weights / rates.read_rate(weights) * 1e3
                entry["floor_ms"] = max(entry["floor_ms"], entry["bandwidth_floor_ms"])
            if measured:
                ratio(entry, measured["median"], entry["floor_ms"], f"{task} {stage}")
            t["floors"][stage] = entry
        diffusion, unet = t.get("diffusion"), stages.get("denoise")
        if diffusion and unet:
            steps = diffusion["steps"]["median"]
            per_step = {k: (v / steps if isinstance(v, int) else v) for k, v in unet.items()}
            diffusion["floor_ms_per_step"] = _floor_ms(per_step, flop_rates)
            ratio(
                diffusion,
                diffusion["step_ms"]["median"],
                diffusion["floor_ms_per_step"],
                f"{task} diffusion step",
            )
    record["flags"] = flags
    if compare and any(t in PERCEPTION_TASKS for t in tasks_out):  # the bar speaks of perception tasks only
        slow = {
            t: v["speedup_over_reference"]
            for t, v in tasks_out.items()
            if t in PERCEPTION_TASKS and v["speedup_over_reference"] < 4.0
        }
        record["speedup_bar"] = {
            "bar": "end to end >= 4x the reference on every perception task (issue 18), on medians",
            "below_on_minimums": {
                t: v["speedup_over_reference_min"]
                for t, v in tasks_out.items()
                if t in PERCEPTION_TASKS and v["speedup_over_reference_min"] < 4.0
            },
            "tasks": [t for t in tasks_out if t in PERCEPTION_TASKS],
            "below": slow,
            "met": not slow,
        }
    record["not_measured"] = [
        "the link stage's floor (a hand-off of a few rows: no GEMM to count)",
        "preprocess, tokenize and postprocess floors (no matrix work)",
    ]
    record["machine"]["load_average_end"] = _load_average()
    say("done", 0)
    return record


# --- reports ----------------------------------------------------------------------------------------------


def _f(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:,.0f}" if x >= 1000 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.01 else f"{x:.2g}"


def _cells(s: dict) -> list[str]:
    return [_f(s["min"]), _f(s["median"]), _f(s["p90"]), _f(s["max"])]


def _gflops(f: dict) -> str:
    parts = [
        f"{f[k] / 1e9:.3g} {name}"
        for k, name in (("float", "fp32"), ("int8", "int8"), ("nbits", "4-bit"))
        if f[k]
    ]
    return " + ".join(parts) or "0"


def markdown(record: dict) -> str:
    m, a, o, fl = record["machine"], record["artifact"], record["options"], record["floors"]
    rates = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in fl["gemm_flops_per_s"].items())
    head = f"`{record['command']}`\n\n" if "command" in record else ""
    head += (
        f"**visionllm-edge bench** `{a['model']}` (manifest sha256 `{a['manifest_sha256'][:12]}`), "
        f"{record['date']}; {m['cpu_model']}, {m['cores']} cores, threads {m['threads']} "
        f"({m['threads_note']}), load average {m['load_average']} at the start, "
        f"{m.get('load_average_end')} at the end; onnxruntime {m['onnxruntime']} "
        f"{','.join(m['providers_used'])}; visionllm-edge {m['visionllm_edge']}; {o['repeat']} repetitions "
        "after "
        f"{o['warmup']} warm-up. Floors: DRAM read {fl['dram_read_bytes_per_s'] / 1e9:.1f} GB/s "
        f"({fl['read_threads']} threads); GEMM through ONNX Runtime: {rates} (best of {fl['samples']} "
        "samples over the run). Peak RSS "
        f"{record['memory']['peak_rss_bytes'] / 2**20:.0f} MiB (runtime alone), KV arena "
        f"{record['memory']['arena_bytes'] / 2**20:.1f} MiB ({record['memory']['context_capacity']} rows)."
    )
    if "reference" in record:
        r = record["reference"]
        head += f" Reference: `{r['source']}`, torch {r['torch']}, {r['threads']} threads, interleaved."
    cmp = "reference" in record
    lines = [
        "| task | stage | min ms | median | p90 | max | floor ms | ratio | GFLOP counted |"
        + (" reference median | speed-up |" if cmp else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if cmp else ""),
    ]
    for task, t in record["tasks"].items():
        floors = t.get("floors", {})
        ref = t.get("reference", {}).get("stages_ms", {})
        rows = list(t["stages_ms"].items()) + [("end to end", t["end_to_end_ms"])]
        for stage, s in rows:
            fkey = "end_to_end" if stage == "end to end" else stage
            f = floors.get(fkey, {})
            ratio = f.get("ratio_to_floor")
            flag = " (below 1: wrong floor)" if f.get("ratio_below_1") else ""
            cells = " | ".join(_cells(s))
            line = f"| {task} | {stage} | {cells} | {_f(f.get('floor_ms'))} | "
            line += f"{'' if ratio is None else f'{ratio:.2f}'}{flag} | {_gflops(f['flops']) if f else ''} |"
            if cmp:
                rs = t["reference"]["end_to_end_ms"] if stage == "end to end" else ref.get(stage)
                speed = ""
                if stage == "end to end":
                    speed = (
                        f"{t['speedup_over_reference']:.2f}x (mins {t['speedup_over_reference_min']:.2f}x)"
                    )
                line += f" {_f(rs['median']) if rs else ''} | {speed} |"
            lines.append(line)
        d = t.get("diffusion")
        if d:
            ratio = d.get("ratio_to_floor")
            line = (
                f"| {task} | diffusion step (of {d['steps']['median']:.0f}) | {_f(d['step_ms']['min'])} | "
                f"{_f(d['step_ms']['median'])} | | {_f(d['step_ms']['max'])} | "
                f"{_f(d.get('floor_ms_per_step'))} | "
                f"{'' if ratio is None else f'{ratio:.2f}'} | |"
            )
            lines.append(line + (" | |" if cmp else ""))
    for d in record["decode"]:
        flag = " (below 1: wrong floor)" if d["ratio_below_1"] else ""
        lines.append(
            f"| decode | ms/token at past {d['past']} (reached {d['past_reached']['median']:.0f}) | "
            + " | ".join(_cells(d["ms_per_token"]))
            + f" | {_f(d['floor_ms_per_token'])} | {d['ratio_to_floor']:.2f}{flag} | (bandwidth floor) |"
            + (" | |" if cmp else "")
        )
    tail = (
        "\n\nFloors: decode at a past = (LLM weight bytes + KV bytes read) ÷ the read rate of that many "
        "bytes (DRAM's from 256 MiB; the caches' below); compute "
        "stages = FLOPs counted from the graphs' profiles at the shapes that ran ÷ the GEMM rate of their "
        "class; a task's decode stage = the larger of its FLOP floor and steps × LLM weight bytes ÷ "
        "their read rate.\n"
    )
    if record["flags"]:
        tail += "Flags: " + "; ".join(record["flags"]) + ".\n"
    if "speedup_bar" in record:
        b = record["speedup_bar"]
        tail += f"Bar ({b['bar']}): {'met' if b['met'] else 'NOT met'}"
        tail += f" (below: {b['below']})" if b["below"] else ""
        tail += f"; on each side's fastest repetition, below: {b['below_on_minimums']}.\n"
    tail += "Not measured: " + "; ".join(record["not_measured"]) + ".\n"
    if o["skipped_tasks"]:
        tail += f"Skipped (component missing): {', '.join(o['skipped_tasks'])}.\n"
    return head + "\n\n" + "\n".join(lines) + tail


def plot(record: dict, path: Path) -> None:
    """Each stage's ratio to its floor as a bar on a log axis, with the 1.0 line (Pillow; palette PNG)."""
    from PIL import Image, ImageDraw

    rows = []
    for task, t in record["tasks"].items():
        for stage, f in t.get("floors", {}).items():
            if f.get("ratio_to_floor"):
                rows.append((f"{task} {stage.replace('_', ' ')}", f["ratio_to_floor"]))
        d = t.get("diffusion", {})
        if d.get("ratio_to_floor"):
            rows.append((f"{task} diffusion step", d["ratio_to_floor"]))
    rows += [(f"decode past {d['past']}", d["ratio_to_floor"]) for d in record["decode"]]
    if not rows:
        raise BenchError("--plot: no stage has a floor to plot (the run measured no floor ratio)")
    label_w, bar_w, row_h, top = 210, 560, 16, 34
    width, height = label_w + bar_w + 70, top + row_h * len(rows) + 24
    img = Image.new("P", (width, height), 0)
    img.putpalette([255, 255, 255, 0, 0, 0, 70, 120, 190, 200, 60, 50, 170, 170, 170] + [0] * (768 - 15))
    draw = ImageDraw.Draw(img)
    hi = max(10.0, max(r for _, r in rows) * 1.2)
    lo = min(0.5, min(r for _, r in rows) / 1.2)
    span = np.log10(hi) - np.log10(lo)

    def x_of(ratio: float) -> int:
        return label_w + round((np.log10(ratio) - np.log10(lo)) / span * bar_w)

    a = record["artifact"]
    draw.text((6, 4), f"{a['model']}: ms / floor ms (log axis; 1 = at the floor)", fill=1)
    draw.text((6, 18), f"{record['date']}, {record['machine']['cpu_model']}", fill=4)
    decade = 10.0 ** np.floor(np.log10(lo))
    while decade <= hi:
        if decade >= lo:
            draw.line([(x_of(decade), top - 4), (x_of(decade), height - 20)], fill=4)
            draw.text((x_of(decade) + 2, height - 18), f"{decade:g}", fill=4)
        decade *= 10
    for i, (label, ratio) in enumerate(rows):
        y = top + i * row_h
        draw.text((6, y + 2), label[:34], fill=1)
        draw.rectangle(
            [x_of(lo), y + 3, max(x_of(lo) + 1, x_of(ratio)), y + row_h - 3], fill=3 if ratio < 1 else 2
        )
        draw.text((min(x_of(ratio) + 4, width - 60), y + 2), f"{ratio:.2f}", fill=1)
    draw.line([(x_of(1.0), top - 6), (x_of(1.0), height - 20)], fill=3, width=2)
    img.save(path, optimize=True)


def command_line(args) -> str:
    """The `visionllm-edge bench` command that gives these options (written into the record)."""
    words = ["visionllm-edge", "bench", str(args.artifact)]
    for flag, value in (
        ("--tasks", args.tasks),
        ("--past", args.past),
        ("--warmup", args.warmup),
        ("--repeat", args.repeat),
        ("--threads", args.threads),
        ("--providers", args.providers),
        ("--new-tokens", args.new_tokens),
        ("--compare", args.compare),
        ("--reference-source", args.reference_source),
        ("--json", args.json),
        ("--md", args.md),
        ("--plot", args.plot),
    ):
        if value is not None:
            words += [flag, str(value)]
    words += (["--no-flops"] if not args.flops else []) + (["--quiet"] if args.quiet else [])
    return shlex.join(words)


def main(args, providers: list[str] | None) -> int:
    """The `bench` subcommand; `providers` as the CLI parsed `--providers`."""
    plot_path = check_plot_path(args.plot)
    bar = _Progress(quiet=args.quiet)
    try:
        record = run_bench(
            args.artifact,
            tasks=args.tasks,
            past=args.past,
            warmup=args.warmup,
            repeat=args.repeat,
            threads=args.threads,
            providers=providers,
            new_tokens=args.new_tokens,
            compare=args.compare,
            reference_source=args.reference_source,
            flops=args.flops,
            progress=bar,
        )
    finally:
        bar.close()
    record["command"] = command_line(args)
    text = markdown(record)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.md:
        Path(args.md).write_text(text)
        print(f"wrote {args.md}")
    if plot_path is not None:
        plot(record, plot_path)
        print(f"wrote {plot_path}")
    return 0
