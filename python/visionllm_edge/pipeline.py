"""The runtime: an artifact folder in, answers with boxes, masks, keypoints and images out. No torch.

One request (DESIGN.md §3): preprocess (C++) -> vision / region engines -> template and tokens -> embedding
assembly (C++) -> prefill into the KV arena (C++; the engine reads the arena's prefix and writes its new rows
in place) -> decode steps planned by the `SuperLinkRouter` (C++), a routing token's step being the 1 + N rows
`[E(token); Q_kind]` -> the groups dispatched to the decoders -> post-processing (C++) -> `Result`.

A per-frame cache keeps the last image's vision outputs and the KV rows of the last conversation: a new
request on the same frame reuses the longest common prefix of its ids (the system prompt and the image rows
at least), so detect, then pose, then a question on one image encode the image once.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visionllm_edge import _core, contract, templates
from visionllm_edge.conversation import build_conversation, insert_placeholders
from visionllm_edge.images import load_image
from visionllm_edge.manifest import Manifest, load_manifest
from visionllm_edge.results import Detection, Link, Pose, Result, SemanticMap
from visionllm_edge.runtime.engine import Engine, make_engine
from visionllm_edge.tokenizer import IMAGE_SENTINEL, RuntimeTokenizer

_NP_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "int64": np.int64,
    "bool": np.bool_,
    "int32": np.int32,
}


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    start = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - start) * 1000.0


@dataclass
class _Frame:
    """One image and what has been computed from it."""

    key: str
    rgb: np.ndarray | None  # H x W x 3 uint8, None for a text-only request
    tiles: np.ndarray | None = None
    image_embeds: np.ndarray | None = None
    region_levels: np.ndarray | None = None
    region_rows: np.ndarray | None = None
    det: tuple | None = None  # (pixels, mask, resized_hw)

    @property
    def size(self) -> tuple[int, int]:
        return (0, 0) if self.rgb is None else (int(self.rgb.shape[1]), int(self.rgb.shape[0]))

    @property
    def n_tiles(self) -> int:
        return 0 if self.tiles is None else int(self.tiles.shape[0])


@dataclass
class _Sequence:
    """A conversation's ids, where the answer starts, and the prompt the labels refer to."""

    ids: list[int]
    answer_start: int
    question: str
    instruction: str | None = None
    forced: bool = False  # a complete answer: prefill only, no decode loop
    history_answers: list[str] = field(default_factory=list)
    history_objects: list = field(default_factory=list)


class Pipeline:
    """VisionLLM v2 from an artifact folder, on ONNX Runtime (TensorRT: not yet).

    Use `Pipeline.load(artifact_dir)`; then `pipe(image, prompt)`, `pipe.stream(...)`, `pipe.chat(image)`, or
    the task shortcuts `detect`, `ground`, `segment`, `pose`, `generate_image`, `edit_image`.
    """

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        backend: str,
        providers,
        threads: int,
        max_context: int | None,
        components,
    ):
        self.folder = folder
        self.manifest = manifest
        self.backend = backend
        self.providers = providers
        self.threads = threads
        self.tokenizer = RuntimeTokenizer.from_manifest(manifest)
        from safetensors.numpy import load_file

        tables = load_file(str(manifest.embeddings.path))
        self.token_table = np.ascontiguousarray(tables[manifest.embeddings.token_table], dtype=np.float32)
        self.query_tables = {
            t: np.ascontiguousarray(tables[name], dtype=np.float32)
            for t, name in manifest.embeddings.query_tables.items()
        }
        m = manifest.model
        cap = m.max_context if max_context is None else min(int(max_context), m.max_context)
        if cap <= 0:
            raise ValueError(f"max_context must be positive, got {max_context}")
        llm_inputs = {t.name: t for t in manifest.graphs["llm"].inputs} if "llm" in manifest.graphs else {}
        kv_dtype = llm_inputs["past_key.0"].dtype if "past_key.0" in llm_inputs else "float32"
        self.embed_dtype = _NP_DTYPES[llm_inputs["inputs_embeds"].dtype] if llm_inputs else np.float32
        self.arena = _core.KVArena(m.num_layers, cap, m.num_kv_heads, m.head_dim, dtype=kv_dtype)
        self.tokens = manifest.tokens
        self.patch_id = self.tokens[contract.IMAGE_PATCH_TOKEN]
        self.region_id = self.tokens[contract.REGION_TOKEN]
        self.eos_id = manifest.data["generation"]["eos_id"]
        self.placeholder_ids = {self.tokens[t] for t in contract.ALL_PLACEHOLDERS}
        self.routes = []
        self.kind_of: dict[int, str] = {}
        for kind, r in manifest.routing.items():
            n = r.queries
            if kind in contract.GENERATION_KINDS:
                ph = [self.tokens[contract.GENERATION_PLACEHOLDER]] * n
            else:
                ph = [self.tokens[t] for t in contract.ALL_PLACEHOLDERS[:n]]
            self.routes.append(_core.Route(r.id, kind, r.decoder, ph, self.query_tables[r.table]))
            self.kind_of[r.id] = kind
        self.router = _core.SuperLinkRouter(self.routes, self.eos_id)
        self._engines: dict[str, Engine] = {}
        self._frame: _Frame | None = None
        self._cached_ids: list[int] = []
        self.post = manifest.data["postprocess"]
        self.generation = manifest.data["generation"]
        for name in components or ():
            for graph in contract.COMPONENT_GRAPHS[name]:
                self.engine(graph)

    # --- loading --------------------------------------------------------------------------------------------

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
    ) -> Pipeline:
        """Opens an artifact folder.

        Args:
            artifact_dir: a folder written by `visionllm-edge export`.
            backend: "onnxruntime" (TensorRT is not available yet and raises a named error).
            providers: ONNX Runtime execution providers, e.g. ["CUDAExecutionProvider",
                "CPUExecutionProvider"].
            max_context: cap on the KV arena (default: the manifest's max context).
            components: graphs to load now (e.g. ("vision", "llm", "det")); the rest load on first use, so a
                small device need not hold every decoder.
            threads: intra-op threads per session (0: ONNX Runtime's default).
            verify_hashes: check every file's sha256 against the manifest.
        """
        folder = Path(artifact_dir)
        manifest = load_manifest(folder, verify_hashes=verify_hashes)
        if backend not in ("onnxruntime", "tensorrt"):
            raise ValueError(f"unknown backend {backend!r}; known: 'onnxruntime', 'tensorrt'")
        if backend == "tensorrt":
            make_engine(folder, backend, providers, threads, "llm")  # raises the named not-available error
        for name in components or ():
            if name not in contract.COMPONENT_GRAPHS:
                raise ValueError(f"unknown component {name!r}; known: {', '.join(contract.COMPONENT_GRAPHS)}")
            missing = [g for g in contract.COMPONENT_GRAPHS[name] if g not in manifest.graphs]
            if missing:
                raise ValueError(f"{folder}: component {name!r} was not exported (missing graphs {missing})")
        return cls(folder, manifest, backend, providers, threads, max_context, components)

    def _graph_spec(self, graph: str):
        """The manifest entry of a graph; a clear error when the artifact was exported without it."""
        if graph not in self.manifest.graphs:
            raise ValueError(
                f"{self.folder}: this artifact has no {graph!r} graph (export it with its component)"
            )
        return self.manifest.graphs[graph]

    def engine(self, graph: str) -> Engine:
        """The engine of a graph, created on first use."""
        if graph not in self._engines:
            self._engines[graph] = make_engine(
                self._graph_spec(graph).path, self.backend, self.providers, self.threads, graph
            )
        return self._engines[graph]

    # --- frames -------------------------------------------------------------------------------------------

    def _frame_for(self, image, regions, region_frame: str, bgr: bool, timings: dict) -> _Frame:
        if image is None:
            if regions:
                raise ValueError("regions need an image")
            if self._frame is None or self._frame.key != "text-only":
                self._frame = _Frame("text-only", None)
                self._cached_ids = []
            return self._frame
        with _timed(timings, "preprocess"):
            rgb = np.ascontiguousarray(np.asarray(load_image(image, bgr=bgr)))
            h = hashlib.sha1(rgb.tobytes())
            h.update(str(rgb.shape).encode())
            for r in regions or ():
                h.update(
                    repr(np.asarray(r).tolist() if not isinstance(r, np.ndarray) else r.tobytes()).encode()
                )
            h.update(region_frame.encode())
            key = h.hexdigest()
        if self._frame is not None and self._frame.key == key:
            return self._frame
        frame = _Frame(key, rgb)
        clip = self.manifest.data["preprocess"]["clip"]
        with _timed(timings, "preprocess"):
            cols, rows = _core.choose_anyres_grid(
                frame.size[0], frame.size[1], clip["tile_size"], [tuple(g) for g in clip["candidate_grids"]]
            )
            frame.tiles = _core.clip_tiles(rgb, cols, rows, clip["tile_size"], clip["mean"], clip["std"])
        with _timed(timings, "vision"):
            out = self.engine("vision").run(
                {"pixel_values": self._as_input("vision", "pixel_values", frame.tiles)}
            )
            frame.image_embeds = out["image_embeds"].astype(np.float32, copy=False)
            frame.region_levels = out["region_levels"]
        if regions:
            with _timed(timings, "region"):
                frame.region_rows = self._encode_regions(frame, regions, region_frame)
        # The arena's rows belong to the previous frame: nothing of them may be reused for this one.
        self._frame = frame
        self._cached_ids = []
        return frame

    def _as_input(self, graph: str, name: str, array: np.ndarray) -> np.ndarray:
        spec = next(t for t in self.manifest.graphs[graph].inputs if t.name == name)
        return np.ascontiguousarray(array, dtype=_NP_DTYPES[spec.dtype])

    def _encode_regions(self, frame: _Frame, regions, region_frame: str) -> np.ndarray:
        size = self.manifest.data["preprocess"]["clip"]["tile_size"]
        masks = []
        for r in regions:
            if region_frame == "thumbnail":
                m = np.asarray(r, dtype=np.float32)
                if m.shape != (size, size):
                    raise ValueError(f"thumbnail-frame regions must be {size}x{size}, got {m.shape}")
                masks.append(m)
            elif region_frame != "image":
                raise ValueError(f"region_frame must be 'image' or 'thumbnail', got {region_frame!r}")
            elif isinstance(r, np.ndarray) and r.ndim == 2:
                masks.append(_core.region_mask_mask(r.astype(bool, copy=False), frame.size, size))
            else:
                coords = tuple(float(v) for v in r)
                if len(coords) == 4:
                    masks.append(_core.region_mask_box(coords, frame.size, size))
                elif len(coords) == 2:
                    masks.append(_core.region_mask_point(coords, frame.size, size))
                else:
                    raise ValueError(
                        f"region: expected a mask, a 4-number box or a 2-number point, got {r!r}"
                    )
        out = self.engine("region").run(
            {
                "image": self._as_input("region", "image", frame.tiles[-1:]),
                "masks": self._as_input("region", "masks", np.stack(masks)),
                "region_levels": self._as_input("region", "region_levels", frame.region_levels),
            }
        )
        return out["region_embeds"].astype(np.float32, copy=False)

    def _detection_input(self, frame: _Frame, det_image=None) -> tuple:
        if isinstance(det_image, dict):
            return (
                np.asarray(det_image["pixel_values"], np.float32),
                np.asarray(det_image["pixel_mask"], bool),
                tuple(det_image.get("resized_hw", det_image["pixel_values"].shape[-2:])),
            )
        if det_image is not None:
            rgb = np.ascontiguousarray(np.asarray(load_image(det_image)))
        elif frame.rgb is None:
            raise ValueError("this answer routes to a perception decoder, which needs an image")
        elif frame.det is not None:
            return frame.det
        else:
            rgb = frame.rgb
        d = self.manifest.data["preprocess"]["detection"]
        facts = self.manifest.graphs["det"].facts if "det" in self.manifest.graphs else {}
        # A decoder exported at one static size (a bucket) takes every image padded into it; a dynamic one
        # takes the image padded to a multiple of 32, as the official code does.
        size = facts.get("image_size")
        pad_to = tuple(size) if isinstance(size, list) else None
        out = _core.detection_input(
            rgb,
            d["short_side"],
            d["max_long_side"],
            d["mean"],
            d["std"],
            pad_to=pad_to,
            size_divisibility=d["size_divisibility"],
        )
        if det_image is None:
            frame.det = out
        return out

    # --- sequences ----------------------------------------------------------------------------------------

    def _sequence(
        self,
        frame: _Frame,
        prompt: str,
        history,
        answer: str | None,
        answer_prefix: str | None,
        instruction: str | None = None,
    ) -> _Sequence:
        num_embs = self.manifest.routing["det"].queries if "det" in self.manifest.routing else 4
        num_gen = self.manifest.routing["gen"].queries if "gen" in self.manifest.routing else 64
        turns = [(u, insert_placeholders(a, num_embs, num_gen)) for u, a in history]
        full = insert_placeholders(answer, num_embs, num_gen) if answer is not None else None
        turns.append((prompt, full))
        if frame.rgb is not None and not any(contract.IMAGE_TOKEN in u for u, _ in turns):
            turns[0] = (contract.IMAGE_TOKEN + "\n" + turns[0][0], turns[0][1])
        open_turns = turns[:-1] + [(turns[-1][0], None)]
        prompt_ids = self._ids(open_turns, frame)
        if full is not None:
            ids = self._ids(turns, frame)
        elif answer_prefix:
            ids = self._ids(turns, frame, open_answer=insert_placeholders(answer_prefix, num_embs, num_gen))
        else:
            ids = prompt_ids
        start = 0
        for a, b in zip(prompt_ids, ids):
            if a != b:
                break
            start += 1
        if len(ids) >= self.arena.capacity():
            raise ValueError(f"the prompt is {len(ids)} tokens; the context holds {self.arena.capacity()}")
        return _Sequence(
            ids, start, prompt, instruction, forced=full is not None, history_answers=[a for _, a in history]
        )

    def _ids(self, turns, frame: _Frame, open_answer: str | None = None) -> list[int]:
        conv = build_conversation(turns)
        text = conv.text + (" " + open_answer if open_answer else "")
        ids = self.tokenizer.tokenize_with_image(text, conv.user_spans)
        expected = 1 if frame.rgb is not None else 0
        if ids.count(IMAGE_SENTINEL) != expected:
            raise ValueError(
                f"the conversation must contain {expected} <image>, found {ids.count(IMAGE_SENTINEL)}"
            )
        if not expected:
            return ids
        at = ids.index(IMAGE_SENTINEL)
        patches = frame.image_embeds.shape[0] * frame.image_embeds.shape[1]
        return ids[:at] + [self.patch_id] * patches + ids[at + 1 :]

    # --- the LLM ------------------------------------------------------------------------------------------

    def _llm_step(self, embeds: np.ndarray, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Runs `embeds [S, H]` on top of the arena, writes the new K/V rows in place, commits them.

        Returns logits and hidden states of the asked `rows` (indices into the step).
        """
        arena = self.arena
        s = embeds.shape[0]
        past = arena.length()
        inputs = {
            "inputs_embeds": np.ascontiguousarray(embeds[None], dtype=self.embed_dtype),
            "position_ids": np.arange(past, past + s, dtype=np.int64),
            "output_rows": np.asarray(rows, dtype=np.int64),
        }
        outputs = {}
        for i in range(arena.num_layers()):
            inputs[f"past_key.{i}"] = arena.past_key(i)
            inputs[f"past_value.{i}"] = arena.past_value(i)
            outputs[f"present_key.{i}"] = arena.new_rows_key(i, s)
            outputs[f"present_value.{i}"] = arena.new_rows_value(i, s)
        got = self.engine("llm").run_bound(inputs, outputs, fetch=["logits", "hidden"])
        arena.commit(s)
        return got["logits"].astype(np.float32, copy=False), got["hidden"].astype(np.float32, copy=False)

    def _prefill(self, seq: _Sequence, frame: _Frame, timings: dict, stats: dict) -> np.ndarray:
        """Brings the arena to `seq.ids`, reusing the cached prefix of the same frame; returns last logits."""
        ids = seq.ids
        reuse = 0
        if self._frame is frame and self._cached_ids:
            for a, b in zip(self._cached_ids, ids):
                if a != b:
                    break
                reuse += 1
        # Always recompute at least the last row (its logits) and every row whose hidden state is needed: the
        # query rows of the answer's groups, and (for a pose answer without objects) those of history [DET]s,
        # each group from its routing token on: the embedding assembly gives placeholder rows their query
        # rows only after the token that opens them (a repeated forced answer once reused up to it, and its
        # groups got plain token rows).
        id_array = np.asarray(ids, np.int64)
        answer_rows = list(self.router.prefill_query_rows(id_array, seq.answer_start))
        history_groups = self._history_object_groups(seq) if self._needs_history_objects(seq) else []
        history_rows = [r for _p, rows in history_groups for r in rows]
        needed = history_rows + answer_rows
        first_needed = min([len(ids) - 1, *(r - 1 for r in needed)])
        reuse = min(reuse, first_needed, self.arena.length())
        self.arena.rollback(reuse)
        stats["reused_rows"] = reuse
        with _timed(timings, "prefill"):
            rest = id_array[reuse:]
            # Rows already in the arena consumed their image/region rows: hand over only the remaining ones.
            hidden_size = self.token_table.shape[1]
            image_rows = region_rows = None
            if frame.image_embeds is not None:
                done = int(np.count_nonzero(id_array[:reuse] == self.patch_id))
                image_rows = frame.image_embeds.reshape(-1, hidden_size)[done:]
                if not len(image_rows):
                    image_rows = None
            if frame.region_rows is not None:
                done = int(np.count_nonzero(id_array[:reuse] == self.region_id))
                region_rows = frame.region_rows[done:] if done < len(frame.region_rows) else None
            embeds = _core.assemble_embeddings(
                self.token_table,
                rest,
                image_rows,
                self.patch_id,
                region_rows,
                self.region_id,
                {k: self.query_tables[contract.QUERY_TABLE[k]] for k in self.manifest.routing},
                self.kind_of,
                self.placeholder_ids,
            )
            out_rows = [r - reuse for r in needed] + [len(ids) - 1 - reuse]
            logits, hidden = self._llm_step(embeds, out_rows)
        self._cached_ids = list(ids)
        # Groups already in the prefill (a forced answer or an answer prefix): record their links.
        self.router.reset()
        if answer_rows:
            self.router.observe_prefill(
                id_array, seq.answer_start, np.ascontiguousarray(hidden[len(history_rows) : -1])
            )
        n = 0
        seq.history_objects = []
        for position, rows in history_groups:
            states = np.ascontiguousarray(hidden[n : n + len(rows)])
            seq.history_objects.append(
                _LinkGroup(len(seq.history_objects), _HistoryLink("det", position, states))
            )
            n += len(rows)
        return logits[-1]

    def _needs_history_objects(self, seq: _Sequence) -> bool:
        answer = seq.ids[seq.answer_start :]
        det_id = self.manifest.routing["det"].id if "det" in self.manifest.routing else None
        pose_id = self.manifest.routing["pose"].id if "pose" in self.manifest.routing else None
        return pose_id in answer and det_id not in answer

    def _history_object_groups(self, seq: _Sequence) -> list[tuple[int, list[int]]]:
        """(position, query rows) of the [DET] groups before the answer (the official pose dialogue puts the
        objects in a first turn and the keypoints in the second)."""
        det = self.manifest.routing.get("det")
        if det is None:
            return []
        ids = seq.ids
        out = []
        for p in range(seq.answer_start):
            if ids[p] == det.id and all(t in self.placeholder_ids for t in ids[p + 1 : p + 1 + det.queries]):
                out.append((p, list(range(p + 1, p + 1 + det.queries))))
        return out

    def _decode(
        self,
        seq: _Sequence,
        logits: np.ndarray,
        max_new_tokens: int,
        sampling: dict,
        seed: int,
        timings: dict,
        stats: dict,
        on_token=None,
    ) -> tuple[list[int], str]:
        sampler = _core.Sampler(seed)
        params = _core.SamplingParams(**sampling)
        ids = seq.ids
        penalized = np.asarray(
            sorted({t for t in ids if t not in self.placeholder_ids and t != self.patch_id}), np.int64
        )
        generated = 0
        stop = "length"
        engine_ms = 0.0
        steps = 0
        with _timed(timings, "decode"):
            while generated < max_new_tokens:
                token = int(sampler.sample(logits, params, penalized))
                generated += 1
                plan = self.router.plan(token, self.arena, generated == max_new_tokens)
                ids.extend(plan.ids)  # empty when the step does not fit: the token is dropped
                if on_token is not None and plan.ids:
                    on_token(ids)
                if plan.feed:
                    rows = np.asarray(self.router.step_embeddings(plan, self.token_table))
                    t0 = time.perf_counter()
                    step_logits, hidden = self._llm_step(rows, list(plan.output_rows))
                    engine_ms += (time.perf_counter() - t0) * 1000.0
                    steps += 1
                    self.router.observe(plan, np.ascontiguousarray(hidden))
                    logits = step_logits[-1]
                    if params.repetition_penalty != 1.0:
                        penalized = np.union1d(penalized, [token]).astype(np.int64)
                if plan.stop_reason:
                    stop = plan.stop_reason
                    break
        stats["decode_steps"] = steps
        stats["decode_engine_ms"] = engine_ms
        self._cached_ids = ids[: self.arena.length()]
        return ids, stop

    # --- decoders -----------------------------------------------------------------------------------------

    def _dispatch(
        self,
        frame: _Frame,
        labels: dict[int, str],
        det_image,
        seed: int,
        noise,
        timings: dict,
        history_objects=None,
        decode: bool = True,
    ) -> dict:
        raw: dict[str, dict] = {}
        obj = self.router.groups_for("object")["groups"]
        if obj:
            det = self._detection_input(frame, det_image)
            with _timed(timings, "object_decoder"):
                raw["object"] = self._object_decoder(obj, det)
            raw["object"]["_det"] = det
        pose = self.router.groups_for("pose")
        objects = pose["objects"] or (history_objects or [])
        if pose["keypoints"] and objects:
            det = self._detection_input(frame, det_image)
            with _timed(timings, "pose_decoder"):
                raw["pose"] = self._pose_decoder(objects, pose["keypoints"], det)
            raw["pose"]["_det"] = det
            raw["pose"]["_objects"] = objects
        for kind in contract.GENERATION_KINDS:
            groups = self.router.groups_for(kind)["groups"]
            if groups:
                with _timed(timings, f"{kind}_decoder"):
                    raw[kind] = self._diffusion(kind, groups, frame, seed, noise, decode)
        return raw

    def _object_decoder(self, groups, det) -> dict:
        pixels, mask, _ = det
        facts = self._graph_spec("det").facts
        max_groups = int(facts.get("max_groups", facts.get("max_text_len", 256)))
        parts = []
        for start in range(0, len(groups), max_groups):
            chunk = groups[start : start + max_groups]
            query = np.stack([np.asarray(g.states) for g in chunk])[None].astype(np.float32)
            num_queries = int(facts["num_queries"])
            out = self.engine("det").run(
                {
                    "pixel_values": pixels,
                    "pixel_mask": mask,
                    "text_query": query,
                    "text_query_mask": np.ones((1, len(chunk)), bool),
                    "mask_query_index": np.arange(num_queries, dtype=np.int64)[None],
                }
            )
            parts.append(out)
        return {k: np.stack([p[k][0] for p in parts]) for k in ("logits", "pred_boxes", "pred_masks")}

    def _pose_decoder(self, objects, keypoints, det) -> dict:
        pixels, mask, _ = det
        facts = self._graph_spec("pose").facts
        max_keypoints = int(facts.get("max_keypoints", 68))
        if len(objects) > 100 or len(keypoints) > max_keypoints:
            raise ValueError(
                f"the keypoint decoder takes at most 100 object and {max_keypoints} keypoint groups, got "
                f"{len(objects)} and {len(keypoints)}"
            )
        n, hidden = np.asarray(objects[0].states).shape
        obj = np.zeros((1, 100, n, hidden), np.float32)
        kpt = np.zeros((1, 100, n, hidden), np.float32)
        obj[0, : len(objects)] = np.stack([np.asarray(g.states) for g in objects])
        kpt[0, : len(keypoints)] = np.stack([np.asarray(g.states) for g in keypoints])
        om = np.zeros((1, 100), bool)
        om[0, : len(objects)] = True
        km = np.zeros((1, 100), bool)
        km[0, : len(keypoints)] = True
        return self.engine("pose").run(
            {
                "pixel_values": pixels,
                "pixel_mask": mask,
                "object_query": obj,
                "object_query_mask": om,
                "keypoint_query": kpt,
                "keypoint_query_mask": km,
            }
        )

    def _diffusion(self, kind: str, groups, frame: _Frame, seed: int, noise, decode: bool = True) -> dict:
        from safetensors.numpy import load_file

        from visionllm_edge.diffusion import DDIMConfig, denoise

        states = np.stack([np.asarray(g.states) for g in groups]).astype(np.float32)
        cond = self.engine(f"{kind}_mapper").run({"link_states": states})["conditioning"]
        if not decode:
            return {"conditioning": cond}
        facts = self._graph_spec(f"{kind}_unet").facts
        uncond_file = self.manifest.data["extra_files"][f"{kind}_uncond"]["file"]
        uncond = load_file(str(self.folder / uncond_file))[facts.get("uncond_tensor", "uncond")]
        latent = int(facts["latent_size"])
        if noise is None:
            noise = (
                np.random.default_rng(seed)
                .standard_normal((len(groups), 4, latent, latent))
                .astype(np.float32)
            )
        noise = np.asarray(noise, np.float32)
        if noise.shape != (len(groups), 4, latent, latent):
            raise ValueError(f"noise: expected shape {(len(groups), 4, latent, latent)}, got {noise.shape}")
        image_latents = None
        if kind == "edit":
            if frame.rgb is None:
                raise ValueError("[EDIT] needs an input image")
            size = int(facts["image_size"])
            src = _core.resize_bicubic(frame.rgb, size, size).astype(np.float32) / 255.0
            enc = self.engine("edit_vae_encoder").run({"images": src.transpose(2, 0, 1)[None].copy()})[
                "latents"
            ]
            image_latents = np.repeat(enc, len(groups), axis=0)
        unet = self.engine(f"{kind}_unet")

        def unet_fn(sample, timestep, context):
            return unet.run(
                {
                    "sample": sample.astype(np.float32),
                    "timestep": timestep.astype(np.int64),
                    "encoder_hidden_states": context.astype(np.float32),
                }
            )["noise_pred"]

        config = DDIMConfig.from_facts(facts["scheduler"])
        latents = denoise(
            unet_fn,
            cond,
            uncond,
            noise,
            int(self.generation["diffusion_steps"]),
            float(self.generation["guidance_scale"]),
            image_latents=image_latents,
            image_guidance=float(self.generation["image_guidance_scale"]),
            config=config,
        )
        images = self.engine(f"{kind}_vae_decoder").run({"latents": latents.astype(np.float32)})["images"]
        return {"conditioning": cond, "noise": noise, "latents": latents, "images": images}

    # --- post-processing ----------------------------------------------------------------------------------

    def _postprocess(self, raw: dict, labels: dict[int, str], frame: _Frame, result: Result) -> None:
        post = self.post
        w, h = frame.size
        obj = raw.get("object")
        if obj is not None:
            groups = self.router.groups_for("object")["groups"]
            facts = self._graph_spec("det").facts
            max_groups = int(facts.get("max_groups", facts.get("max_text_len", 256)))
            _, _, resized = obj["_det"]
            det_cols, det_groups, seg = [], [], []
            for g in groups:
                chunk, k = divmod(g.index, max_groups)
                if g.kind == "grd":
                    probs = 1.0 / (1.0 + np.exp(-obj["logits"][chunk][:, k].astype(np.float64)))
                    q = int(np.argmax(probs))
                    result.detections.append(
                        self._detection(g, labels, q, float(probs[q]), obj, chunk, resized, frame)
                    )
                elif g.kind == "det":
                    det_cols.append((chunk, k))
                    det_groups.append(g)
                else:
                    seg.append((g, chunk, k))
            if det_groups:
                logits = np.stack([obj["logits"][c][:, k] for c, k in det_cols], axis=1).astype(np.float32)
                scores, queries, classes = _core.topk_query_class(
                    np.ascontiguousarray(logits), int(post["det_top_k"]), float(post["det_score_threshold"])
                )
                dets = []
                for score, q, c in zip(np.asarray(scores), np.asarray(queries), np.asarray(classes)):
                    chunk = det_cols[int(c)][0]
                    dets.append(
                        self._detection(
                            det_groups[int(c)], labels, int(q), float(score), obj, chunk, resized, frame
                        )
                    )
                if post.get("nms_iou") is not None and dets:
                    names = sorted({d.label for d in dets})
                    keep = _core.nms_class_aware(
                        np.asarray([d.box_xyxy for d in dets], np.float64),
                        np.asarray([d.score for d in dets]),
                        np.asarray([names.index(d.label) for d in dets], np.int64),
                        float(post["nms_iou"]),
                    )
                    dets = [dets[i] for i in np.asarray(keep)]
                result.detections.extend(dets)
            if seg:
                chunk0 = seg[0][1]
                class_logits = np.stack([obj["logits"][c][:, k] for _g, c, k in seg], axis=1).astype(
                    np.float32
                )
                label_map = _core.semantic_map(
                    np.ascontiguousarray(class_logits),
                    np.ascontiguousarray(obj["pred_masks"][chunk0]),
                    tuple(resized),
                    (h, w),
                    float(post["seg_score_threshold"]),
                )
                result.segmentation = SemanticMap(
                    np.asarray(label_map), [labels.get(g.position, "") for g, _c, _k in seg]
                )
        pose = raw.get("pose")
        if pose is not None:
            objects = pose["_objects"]
            keypoints = self.router.groups_for("pose")["keypoints"]
            names = [labels.get(g.position, "") for g in keypoints]
            pixels, _, resized = pose["_det"]
            logits = np.ascontiguousarray(pose["pred_logits"][0, :, : len(objects)], dtype=np.float32)
            scores, queries, classes = _core.topk_query_class(
                logits, int(post["pose_top_k"]), float(post["pose_score_threshold"]), query_major=True
            )
            queries = np.asarray(queries)
            if len(queries):
                boxes, kps = _core.keypoints_to_pixels(
                    np.ascontiguousarray(pose["pred_boxes"][0][queries], np.float32),
                    np.ascontiguousarray(pose["pred_keypoints"][0][queries], np.float32),
                    len(names),
                    tuple(pixels.shape[-2:]),
                    tuple(resized),
                    (w, h),
                )
                for i, (score, q, c) in enumerate(zip(np.asarray(scores), queries, np.asarray(classes))):
                    result.poses.append(
                        Pose(
                            labels.get(objects[int(c)].position, ""),
                            float(score),
                            tuple(float(v) for v in np.asarray(boxes)[i]),
                            np.asarray(kps)[i],
                            names,
                            int(q),
                        )
                    )
        for kind in contract.GENERATION_KINDS:
            gen = raw.get(kind)
            if gen is not None and "images" in gen:
                for im in gen["images"]:
                    result.images.append((np.clip(im.transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8))

    def _detection(
        self, g, labels, q: int, score: float, obj: dict, chunk: int, resized, frame: _Frame
    ) -> Detection:
        w, h = frame.size
        box = np.asarray(
            _core.boxes_cxcywh_to_xyxy(
                np.ascontiguousarray(obj["pred_boxes"][chunk][q : q + 1], np.float32), float(w), float(h)
            )
        )[0]
        mask = _core.masks_to_image(
            np.ascontiguousarray(obj["pred_masks"][chunk][q : q + 1], np.float32),
            tuple(resized),
            (h, w),
            float(self.post["mask_threshold"]),
        )
        return Detection(
            labels.get(g.position, ""), g.kind, score, tuple(float(v) for v in box), np.asarray(mask)[0], q
        )

    # --- requests -----------------------------------------------------------------------------------------

    def __call__(
        self,
        image,
        prompt: str,
        regions=None,
        history=(),
        answer_prefix: str | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        det_image=None,
        region_frame: str = "image",
        bgr: bool = False,
        answer: str | None = None,
        noise=None,
        instruction: str | None = None,
        decode: bool = True,
        _on_token=None,
    ) -> Result:
        """Answers one request (the keywords of `ReferencePipeline.run`).

        Args:
            image: path, PIL image, `H x W x 3` uint8 array (RGB; BGR with `bgr=True`), or None (text only).
            prompt: the user's text; `<image>\\n` is put in front when it has none.
            regions: one visual prompt per `<region>` (bool mask, `(x0, y0, x1, y1)` box or `(x, y)` point).
            history: earlier (user, assistant) turns.
            answer_prefix: forced start of the answer (routing tokens in it are honoured).
            answer: a complete forced answer: one prefill, no decode loop (the task shortcuts use it).
            noise: initial latents for `[GEN]`/`[EDIT]` (default: seeded Gaussian).
            decode: run the diffusion loop for `[GEN]`/`[EDIT]` (False: conditioning only).
        """
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be positive when sampling, got {temperature}")
        timings: dict[str, float] = {}
        stats: dict = {}
        t_start = time.perf_counter()
        frame = self._frame_for(image, regions, region_frame, bgr, timings)
        n_regions = 0 if frame.region_rows is None else len(frame.region_rows)
        with _timed(timings, "tokenize"):
            seq = self._sequence(frame, prompt, history, answer, answer_prefix, instruction)
        markers = seq.ids.count(self.region_id)
        if markers != n_regions:
            raise ValueError(
                f"the prompt has {markers} <region> marker(s) but {n_regions} region(s) were given"
            )
        logits = self._prefill(seq, frame, timings, stats)
        stop = "eos" if seq.forced else "length"
        if not seq.forced:
            ids, stop = self._decode(
                seq,
                logits,
                max_new_tokens,
                dict(
                    do_sample=do_sample,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    repetition_penalty=repetition_penalty,
                ),
                seed,
                timings,
                stats,
                _on_token,
            )
        else:
            ids = seq.ids
        answer_ids = ids[seq.answer_start :]
        text = self._answer_text(answer_ids)
        label_list = _core.label_groups(text, prompt, instruction)
        links = list(self.router.links())
        labels = {lk.position: lab for lk, (_k, lab) in zip(links, label_list)}
        labels.update(self._history_labels(seq, [g.link for g in seq.history_objects]))
        raw = self._dispatch(
            frame, labels, det_image, seed, noise, timings, history_objects=seq.history_objects, decode=decode
        )
        result = Result(
            text=text,
            token_ids=self._answer_tokens(ids, seq.answer_start),
            stop_reason=stop,
            links=[
                Link(lk.kind, labels.get(lk.position, ""), lk.position, np.asarray(lk.states).copy())
                for lk in links
            ],
            timings=timings,
        )
        with _timed(timings, "postprocess"):
            self._postprocess(raw, labels, frame, result)
        timings["total"] = (time.perf_counter() - t_start) * 1000.0
        result.raw = {
            "decoders": {k: {n: v for n, v in d.items() if not n.startswith("_")} for k, d in raw.items()},
            "input_ids": np.asarray(ids, np.int64),
            "stats": stats,
        }
        return result

    def _history_labels(self, seq: _Sequence, history_links) -> dict[int, str]:
        labels: dict[int, str] = {}
        if not history_links:
            return labels
        pairs = []
        for text in seq.history_answers:
            pairs.extend(lab for kind, lab in _core.label_groups(text, seq.question, None) if kind == "det")
        for lk, lab in zip(history_links, pairs):
            labels[lk.position] = lab
        return labels

    def _answer_tokens(self, ids: list[int], start: int) -> list[int]:
        out = []
        skip = 0
        for t in ids[start:]:
            if skip:
                skip -= 1
                continue
            out.append(t)
            kind = self.kind_of.get(t)
            if kind is not None:
                skip = self.manifest.routing[kind].queries
        return out

    def _answer_text(self, ids: list[int]) -> str:
        pieces: list[str] = []
        run: list[int] = []
        specials = {self.tokens[t]: t for t in contract.ADDED_TOKENS}
        for t in ids:
            if t in specials or t == self.eos_id:
                if run:
                    pieces.append(self.tokenizer.decode(run))
                    run = []
                if t not in self.placeholder_ids and t != self.eos_id:
                    pieces.append(specials[t])
            else:
                run.append(t)
        if run:
            pieces.append(self.tokenizer.decode(run))
        return "".join(pieces).strip()

    def stream(self, image, prompt: str, **kwargs) -> Iterator[str | Result]:
        """Yields the answer's text pieces as they are decoded, then the `Result`."""
        pieces: list[str] = []
        state = {"text": "", "start": None}

        def on_token(ids):
            if state["start"] is None:
                state["start"] = len(ids) - 1
            text = self._answer_text(ids[state["start"] :])
            if len(text) > len(state["text"]) and text.startswith(state["text"]):
                pieces.append(text[len(state["text"]) :])
            state["text"] = text

        import threading

        result: dict = {}

        def work():
            try:
                result["value"] = self(image, prompt, _on_token=on_token, **kwargs)
            except BaseException as e:  # re-raised in the caller's thread
                result["error"] = e

        thread = threading.Thread(target=work)
        thread.start()
        sent = 0
        while thread.is_alive() or sent < len(pieces):
            while sent < len(pieces):
                yield pieces[sent]
                sent += 1
            thread.join(0.01)
        if "error" in result:
            raise result["error"]
        yield result["value"]

    def chat(self, image, **defaults) -> ChatSession:
        """A multi-turn conversation about one image; each turn reuses the KV rows of the previous ones."""
        return ChatSession(self, image, defaults)

    # --- task shortcuts (no free generation: one prefill with the official forced answer) ----------------

    def detect(self, image, classes, **kw) -> Result:
        q, a = templates.detection(classes)
        return self(image, q, answer=a, **kw)

    def ground(self, image, phrase: str, **kw) -> Result:
        q, a = templates.grounding(phrase)
        return self(image, q, answer=a, **kw)

    def segment(self, image, classes, **kw) -> Result:
        q, a = templates.segmentation(classes)
        return self(image, q, answer=a, **kw)

    def pose(self, image, keypoint_names, objects=("person",), **kw) -> Result:
        history, q, a = templates.pose(keypoint_names, objects)
        return self(image, q, history=history, answer=a, **kw)

    def generate_image(self, prompt: str, **kw) -> Result:
        q, a = templates.generation(prompt)
        return self(None, q, answer=a, instruction=prompt, **kw)

    def edit_image(self, image, instruction: str, **kw) -> Result:
        q, a = templates.editing(instruction)
        return self(image, q, answer=a, instruction=instruction, **kw)


@dataclass
class _HistoryLink:
    kind: str
    position: int
    states: np.ndarray


@dataclass
class _LinkGroup:
    """A history `[DET]` group shaped as the router's decoder groups (the pose fallback)."""

    index: int
    link: object

    @property
    def kind(self):
        return self.link.kind

    @property
    def position(self):
        return self.link.position

    @property
    def states(self):
        return self.link.states


class ChatSession:
    """Multi-turn chat about one image. `ask(prompt)` returns the `Result`; the history grows by one turn."""

    def __init__(self, pipeline: Pipeline, image, defaults: dict):
        self.pipeline = pipeline
        self.image = image
        self.defaults = defaults
        self.history: list[tuple[str, str]] = []

    def ask(self, prompt: str, **kw) -> Result:
        result = self.pipeline(self.image, prompt, history=tuple(self.history), **{**self.defaults, **kw})
        self.history.append((prompt, result.text))
        return result
