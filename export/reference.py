"""The reference request loop: plain, eager, batch 1 — the oracle every runtime result is checked against.

One request: preprocess -> vision (+ regions) -> template and tokens -> `inputs_embeds` with image, region
and super-link query rows -> prefill -> decode with a KV cache, where a routing token's step is the 1 + N
rows `[E(token); Q_kind]` at consecutive positions and the N query rows' post-norm hidden states become that
group's link -> dispatch the groups to their decoders (docs/architecture.md §3 step 7) -> post-process.

`forward_answer` runs the same conversation teacher-forced in one pass (the official evaluation path) and
must give the same link states and decoder outputs as `run` with that answer. Nothing here imports the
runtime or the C++ core: parity between the two proves something only if they share no code beyond the
contract's names.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from visionllm_edge import contract
from visionllm_edge.export import preprocess as pp
from visionllm_edge.export.model import VisionFeatures, VisionLLMv2
from visionllm_edge.export.tokenizer import (
    IMAGE_SENTINEL,
    ChatTokenizer,
    build_conversation,
    insert_placeholders,
)
from visionllm_edge.results import Detection, Link, Pose, Result, SemanticMap


@dataclass
class PostProcessSettings:
    """Post-processing defaults (the official code fixes none; these are the SDK's choices)."""

    det_top_k: int = 100
    det_score_threshold: float = 0.3
    nms_iou: float | None = None
    mask_threshold: float = 0.5
    seg_score_threshold: float = 0.3
    pose_top_k: int = 20
    pose_score_threshold: float = 0.3
    gen_steps: int = 20
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5

    @classmethod
    def for_model(cls, config) -> PostProcessSettings:
        """The defaults, with what a configuration's extension says its diffusion decoders were tuned for:
        the text guidance scale (`guidance_scale`) and the DDIM steps (`diffusion_steps`); a model trained
        here may want others than Stable Diffusion's 7.5 and our 20 (the config checks both values)."""
        settings = cls()
        if "guidance_scale" in config.extension:
            settings.guidance_scale = float(config.extension["guidance_scale"])
        if "diffusion_steps" in config.extension:
            settings.gen_steps = int(config.extension["diffusion_steps"])
        return settings


@dataclass
class ForwardOutput:
    """The teacher-forced pass over prompt + answer (docs/architecture.md §9).

    Attributes:
        input_ids: `[S]` int64, placeholders included.
        tiles: `[T, 3, s, s]` CLIP-normalised tiles.
        hidden: `[S, H]` post-final-norm hidden states.
        logits: `[S, V]`.
        links: one `Link` per routing token, in answer order.
        decoders: raw decoder outputs per decoder (`object`, `pose`, `gen`, `edit`).
        inputs_embeds, position_ids, vision, region_embeddings, layer_states: intermediates for
            component-level parity checks.
    """

    input_ids: np.ndarray
    tiles: np.ndarray
    hidden: np.ndarray
    logits: np.ndarray
    links: list[Link]
    decoders: dict[str, dict[str, np.ndarray]]
    inputs_embeds: np.ndarray | None = None
    position_ids: np.ndarray | None = None
    vision: VisionFeatures | None = None
    region_embeddings: np.ndarray | None = None
    layer_states: list[np.ndarray] | None = None


@dataclass
class _Prepared:
    """Per-request state shared by `run` and `forward_answer`."""

    image: object
    image_size: tuple[int, int]
    tiles: torch.Tensor
    vision: VisionFeatures
    regions: torch.Tensor | None
    det_pixels: torch.Tensor | None = None
    det_mask: torch.Tensor | None = None
    det_resized: tuple[int, int] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: [DET] links of earlier turns: the objects of a [POSE] answer that has none of its own (the official
    #: pose dialogue asks for the objects in a first turn and for the keypoints in the second).
    history_objects: list = field(default_factory=list)

    @property
    def n_tiles(self) -> int:
        return 0 if self.tiles is None else int(self.tiles.shape[0])


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    start = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - start) * 1000.0


# --- labels -----------------------------------------------------------------------------------------------

_DELIMITERS = re.compile("|".join(re.escape(d) for d in contract.LABEL_DELIMITERS))
_ROUTING = re.compile("|".join(re.escape(t) for t in contract.ROUTING_TOKENS))
_PLACEHOLDER = re.compile("|".join(re.escape(t) for t in contract.ALL_PLACEHOLDERS))
#: Phrases that point at an object without naming it (`It is [GRD].`): such a [GRD] group takes the
#: phrase the question asked for instead.
_NOT_A_PHRASE = re.compile(
    r"^(?:(?:yes|sure|ok|okay)\s*,?\s*)?(?:it|this|that|here)?(?:\s+it)?(?:\s+is)?$", re.IGNORECASE
)
_GROUNDING_QUESTION = re.compile(
    r"(?:locate|find|ground|detect|where is|where are|where's|point to|segment|see)\s+(?:the\s+)?([^?.!<>]+?)"
    r"(?:\s+(?:is\s+)?(?:in|within|on)\s+(?:the|this)\s+(?:image|picture|photo))?\s*(?:[?.!]|$)",
    re.IGNORECASE,
)


def answer_labels(answer: str, question: str, instruction: str | None = None) -> list[tuple[str, str]]:
    """(kind, label) of every routing token in `answer`, by the label rule of docs/architecture.md §9.

    `[DET]`/`[SEG]`/`[POSE]`: the text between the nearest preceding delimiter (the answer's start, the end
    of the previous group, ", ", ". ", ": ", " for ", " and ", " of ") and the token, stripped;
    `<det>x</det>` gives `x`. `[GRD]`: the phrase the question asks for, else the answer's own phrase.
    `[GEN]`/`[EDIT]`: the user's instruction.
    """
    answer = _PLACEHOLDER.sub("", answer)
    question_text = question.replace(contract.IMAGE_TOKEN, " ").strip()
    out = []
    start = 0
    for m in _ROUTING.finditer(answer):
        kind = contract.ROUTING_TOKENS[m.group(0)]
        segment = answer[start : m.start()]
        start = m.end()
        if kind in contract.GENERATION_KINDS:
            out.append((kind, (instruction if instruction is not None else question_text).strip()))
            continue
        det = re.search(r"<det>(.*?)</det>\s*$", segment)
        if det:
            label = det.group(1).strip()
        else:
            pieces = _DELIMITERS.split(segment)
            label = pieces[-1].strip() if pieces else ""
        if kind == "grd" and _NOT_A_PHRASE.match(label.strip(" ,.:")):
            label = _grounding_phrase(question_text) or question_text
        out.append((kind, label.strip(" ,.:")))
    return out


def _grounding_phrase(question: str) -> str | None:
    m = _GROUNDING_QUESTION.search(question)
    return m.group(1).strip() if m else None


# --- the pipeline -----------------------------------------------------------------------------------------


class ReferencePipeline:
    """VisionLLM v2, eager PyTorch, batch 1, with a KV cache.

    Args:
        model: a `VisionLLMv2` (from `load_reference`).
        tokenizer: a `ChatTokenizer`; by default the one beside the model's checkpoint.
        post: post-processing settings.
    """

    def __init__(
        self,
        model: VisionLLMv2,
        tokenizer: ChatTokenizer | None = None,
        post: PostProcessSettings | None = None,
    ):
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = tokenizer or ChatTokenizer.from_directory(model.tokenizer_dir)
        if self.tokenizer.vocab_size != self.config.llm.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens, the model's vocabulary is "
                f"{self.config.llm.vocab_size}"
            )
        self.post = post or PostProcessSettings.for_model(self.config)
        self.routing_ids = {self.tokenizer.token_id(t): k for t, k in contract.ROUTING_TOKENS.items()}
        self.patch_id = self.tokenizer.token_id(contract.IMAGE_PATCH_TOKEN)
        self.region_id = self.tokenizer.token_id(contract.REGION_TOKEN)
        self.placeholder_ids = {self.tokenizer.token_id(t) for t in contract.ALL_PLACEHOLDERS}
        self.max_context = self.config.llm.max_position_embeddings

    # --- preparation ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def _prepare(self, image, regions, region_frame: str, det_image, bgr: bool) -> _Prepared:
        timings: dict[str, float] = {}
        if image is None:
            # A text-only request (e.g. generation, as the official text2img data has no image).
            if regions:
                raise ValueError("regions need an image")
            return _Prepared(None, (0, 0), None, None, None, timings=timings)
        with _timed(timings, "preprocess"):
            pil = pp.load_image(image, bgr=bgr)
            tiles, _ = pp.anyres_tiles(pil, self.config.image_size, self.config.max_tiles)
        with _timed(timings, "vision"):
            vision = self.model.encode_image(tiles)
        masks = None
        if regions:
            with _timed(timings, "region"):
                size = self.config.image_size
                if region_frame == "thumbnail":
                    masks = torch.stack(
                        [torch.as_tensor(np.asarray(r), dtype=torch.float32) for r in regions]
                    )
                    if masks.shape[1:] != (size, size):
                        raise ValueError(
                            f"thumbnail-frame regions must be {size}x{size}, got {tuple(masks.shape[1:])}"
                        )
                elif region_frame == "image":
                    masks = torch.stack([pp.region_mask(r, pil.size, size) for r in regions])
                else:
                    raise ValueError(f"region_frame must be 'image' or 'thumbnail', got {region_frame!r}")
                masks = self.model.encode_regions(tiles[-1], masks, vision)
        return _Prepared(pil, pil.size, tiles, vision, masks, timings=timings)

    def _detection_input(self, prep: _Prepared, det_image) -> None:
        if prep.det_pixels is not None:
            return
        if isinstance(det_image, dict):
            prep.det_pixels = torch.as_tensor(np.asarray(det_image["pixel_values"]), dtype=torch.float32)
            prep.det_mask = torch.as_tensor(np.asarray(det_image["pixel_mask"])).bool()
            prep.det_resized = tuple(det_image.get("resized_hw", prep.det_pixels.shape[-2:]))
            return
        if det_image is None and prep.image is None:
            raise ValueError("this answer routes to a perception decoder, which needs an image")
        source = prep.image if det_image is None else pp.load_image(det_image)
        prep.det_pixels, prep.det_mask, prep.det_resized = pp.detection_image(
            source, self.config.det_short_side, self.config.det_max_long_side
        )

    # --- sequence assembly ---------------------------------------------------------------------------------

    def _turns(
        self, prompt: str, history, answer: str | None, has_image: bool = True
    ) -> list[tuple[str, str | None]]:
        turns = [
            (u, insert_placeholders(a, self.config.num_embs, self.config.num_embs_gen)) for u, a in history
        ]
        turns.append((prompt, answer))
        if has_image and not any(contract.IMAGE_TOKEN in u for u, _ in turns):
            first_user, first_answer = turns[0]
            turns[0] = (contract.IMAGE_TOKEN + "\n" + first_user, first_answer)
        return turns

    def _token_ids(self, turns, n_tiles: int, open_answer: str | None = None) -> list[int]:
        """Templated, tokenised conversation with `<image>` expanded to T·P patch tokens.

        `open_answer` (an answer prefix) is appended after "ASSISTANT:" of the last, open turn.
        """
        conv = build_conversation(turns)
        text = conv.text
        if open_answer:
            text = text + " " + open_answer
        ids = self.tokenizer.tokenize_with_image(text, conv.user_spans)
        expected = 1 if n_tiles else 0
        if ids.count(IMAGE_SENTINEL) != expected:
            raise ValueError(
                f"the conversation must contain {expected} <image>, found {ids.count(IMAGE_SENTINEL)}"
            )
        if not n_tiles:
            return ids
        at = ids.index(IMAGE_SENTINEL)
        ids = ids[:at] + [self.patch_id] * (n_tiles * self.config.patches_per_tile) + ids[at + 1 :]
        return ids

    def _embed(self, ids: list[int], prep: _Prepared, start: int = 0) -> torch.Tensor:
        """`inputs_embeds [1, S, H]` for `ids`, with image, region and super-link query rows written in."""
        model = self.model
        t = torch.tensor(ids, dtype=torch.long)
        embeds = model.embed_tokens(t)
        patch_rows = (t == self.patch_id).nonzero()[:, 0]
        if len(patch_rows):
            if prep.vision is None:
                raise ValueError("the prompt has <im_patch> slots but no image was given")
            feats = prep.vision.projected.reshape(-1, embeds.shape[-1])
            if len(patch_rows) != feats.shape[0]:
                raise ValueError(
                    f"{len(patch_rows)} <im_patch> slots for {feats.shape[0]} image feature rows"
                )
            embeds[patch_rows] = feats.to(embeds.dtype)
        region_rows = (t == self.region_id).nonzero()[:, 0]
        n_regions = 0 if prep.regions is None else prep.regions.shape[0]
        if len(region_rows) != n_regions:
            raise ValueError(
                f"the prompt has {len(region_rows)} <region> marker(s) but {n_regions} region(s) were given"
            )
        if n_regions:
            embeds[region_rows] = prep.regions.to(embeds.dtype)
        # Super-link queries replace the placeholder rows that follow each routing token.
        for pos, tok in enumerate(ids):
            kind = self.routing_ids.get(tok)
            if kind is None:
                continue
            n = model.num_queries(kind)
            following = ids[pos + 1 : pos + 1 + n]
            if len(following) == n and all(i in self.placeholder_ids for i in following):
                embeds[pos + 1 : pos + 1 + n] = model.query_table(kind).to(embeds.dtype)
        return embeds[None]

    def _links(
        self, ids: list[int], hidden: torch.Tensor, labels: list[tuple[str, str]], start: int
    ) -> list[Link]:
        """One link per routing token of the answer (positions >= `start`; history groups are not re-run)."""
        links = []
        for pos, tok in enumerate(ids):
            kind = self.routing_ids.get(tok)
            if pos < start:
                continue
            if kind is None:
                continue
            n = self.model.num_queries(kind)
            states = hidden[pos + 1 : pos + 1 + n]
            label = labels[len(links)][1] if len(links) < len(labels) else ""
            links.append(Link(kind, label, pos, states.float().numpy().copy()))
        return links

    # --- decoders ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _run_decoders(
        self, links: list[Link], prep: _Prepared, det_image, denoise: bool, seed: int, noise=None
    ) -> dict[str, dict[str, np.ndarray]]:
        model = self.model
        out: dict[str, dict[str, np.ndarray]] = {}
        object_links = [lk for lk in links if lk.kind in contract.OBJECT_KINDS]
        if object_links and hasattr(model, "gdino"):
            self._detection_input(prep, det_image)
            with _timed(prep.timings, "object_decoder"):
                out["object"] = self._object_decoder(object_links, prep)
        pose_links = [lk for lk in links if lk.kind == "pose"]
        objects = [lk for lk in links if lk.kind == "det"] or prep.history_objects
        # Keypoint groups need object groups (the [DET] groups of the answer, else of the history).
        if pose_links and objects and hasattr(model, "unipose"):
            self._detection_input(prep, det_image)
            with _timed(prep.timings, "pose_decoder"):
                out["pose"] = self._pose_decoder(objects, pose_links, prep)
        for kind, attr in (("gen", "sd"), ("edit", "ip2p")):
            group = [lk for lk in links if lk.kind == kind]
            if not group or not hasattr(model, attr):
                continue
            decoder = getattr(model, attr)
            with _timed(prep.timings, f"{kind}_decoder"):
                states = torch.from_numpy(np.stack([lk.states for lk in group]))
                cond = decoder.map_queries(states)
                result = {"conditioning": cond.numpy()}
                if denoise:
                    result.update(self._denoise(kind, decoder, cond, prep, seed, noise))
                out[kind] = result
        return out

    def _object_decoder(self, links: list[Link], prep: _Prepared) -> dict[str, np.ndarray]:
        max_groups = int(self.config.official["gdino_config"].get("max_text_len", 256))
        parts = []
        for start in range(0, len(links), max_groups):
            chunk = links[start : start + max_groups]
            query = torch.from_numpy(np.stack([lk.states for lk in chunk]))[None]
            masks = torch.ones(1, len(chunk), dtype=torch.bool)
            logits, boxes, pred_masks = self.model.gdino(prep.det_pixels, prep.det_mask, query, masks)
            parts.append((logits[0], boxes[0], pred_masks[0]))
        # One entry per decoder call (groups beyond max_text_len go to further calls), so that every
        # (query, class) pair keeps its alignment.
        return {
            "logits": np.stack([p[0].numpy() for p in parts]),
            "pred_boxes": np.stack([p[1].numpy() for p in parts]),
            "pred_masks": np.stack([p[2].numpy() for p in parts]),
        }

    def _pose_decoder(
        self, objects: list[Link], keypoints: list[Link], prep: _Prepared
    ) -> dict[str, np.ndarray]:
        n_slots = 100
        max_keypoints = self.model.unipose.num_body_points
        if len(objects) > n_slots or len(keypoints) > max_keypoints:
            raise ValueError(
                f"the keypoint decoder takes at most {n_slots} object and {max_keypoints} keypoint groups, "
                f"got {len(objects)} and {len(keypoints)}"
            )
        hidden = objects[0].states.shape[-1]
        n = objects[0].states.shape[0]
        obj = torch.zeros(1, n_slots, n, hidden)
        kpt = torch.zeros(1, n_slots, n, hidden)
        obj[0, : len(objects)] = torch.from_numpy(np.stack([lk.states for lk in objects]))
        kpt[0, : len(keypoints)] = torch.from_numpy(np.stack([lk.states for lk in keypoints]))
        obj_mask = torch.zeros(1, n_slots, dtype=torch.bool)
        obj_mask[0, : len(objects)] = True
        kpt_mask = torch.zeros(1, n_slots, dtype=torch.bool)
        kpt_mask[0, : len(keypoints)] = True
        logits, boxes, kps = self.model.unipose(prep.det_pixels, ~prep.det_mask, obj, obj_mask, kpt, kpt_mask)
        return {"pred_logits": logits.numpy(), "pred_boxes": boxes.numpy(), "pred_keypoints": kps.numpy()}

    def _denoise(
        self, kind: str, decoder, cond: torch.Tensor, prep: _Prepared, seed: int, noise=None
    ) -> dict[str, np.ndarray]:
        size = self.config.image_size_for(kind)
        latent = size // decoder.vae_scale_factor
        if noise is None:
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn(cond.shape[0], 4, latent, latent, generator=g)
        else:
            noise = torch.as_tensor(np.asarray(noise, dtype=np.float32))
            if tuple(noise.shape) != (cond.shape[0], 4, latent, latent):
                raise ValueError(
                    f"noise: expected shape {(cond.shape[0], 4, latent, latent)}, got {tuple(noise.shape)}"
                )
        image_latents = None
        if kind == "edit":
            if prep.image is None:
                raise ValueError("[EDIT] needs an input image")
            src = prep.image.resize((size, size), pp.Image.BICUBIC)
            arr = torch.from_numpy(np.asarray(src, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
            image_latents = decoder.encode_image(arr).expand(cond.shape[0], -1, -1, -1)
        latents = decoder.denoise(
            cond,
            noise=noise,
            steps=self.post.gen_steps,
            guidance_scale=self.post.guidance_scale,
            image_latents=image_latents,
            image_guidance_scale=self.post.image_guidance_scale,
        )
        images = decoder.decode_latents(latents)
        return {"noise": noise.numpy(), "latents": latents.numpy(), "images": images.numpy()}

    # --- post-processing ------------------------------------------------------------------------------------

    def _postprocess(self, links: list[Link], raw: dict, prep: _Prepared, result: Result) -> None:
        post = self.post
        w, h = prep.image_size
        obj = raw.get("object")
        if obj is not None:
            object_links = [lk for lk in links if lk.kind in contract.OBJECT_KINDS]
            max_groups = int(self.config.official["gdino_config"].get("max_text_len", 256))
            seg_classes = []
            det_candidates = []
            for g, lk in enumerate(object_links):
                chunk, k = divmod(g, max_groups)
                probs = torch.from_numpy(obj["logits"][chunk][:, k]).sigmoid()
                boxes = torch.from_numpy(obj["pred_boxes"][chunk])
                if lk.kind == "grd":
                    q = int(probs.argmax())
                    result.detections.append(
                        self._detection(lk, q, float(probs[q]), boxes[q], obj, chunk, prep)
                    )
                elif lk.kind == "det":
                    for q in range(probs.shape[0]):
                        det_candidates.append((float(probs[q]), g, q, chunk))
                else:
                    seg_classes.append((g, lk, chunk, k))
            det_candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
            kept = [c for c in det_candidates[: post.det_top_k] if c[0] >= post.det_score_threshold]
            for score, g, q, chunk in kept:
                lk = object_links[g]
                boxes = torch.from_numpy(obj["pred_boxes"][chunk])
                result.detections.append(self._detection(lk, q, score, boxes[q], obj, chunk, prep))
            if post.nms_iou is not None:
                result.detections = _nms(result.detections, post.nms_iou)
            if seg_classes:
                result.segmentation = self._semantic_map(seg_classes, obj, prep)
        pose = raw.get("pose")
        if pose is not None:
            objects = [lk for lk in links if lk.kind == "det"] or prep.history_objects
            names = [lk.label for lk in links if lk.kind == "pose"]
            probs = torch.from_numpy(pose["pred_logits"][0, :, : len(objects)]).sigmoid()
            flat = probs.flatten()
            order = torch.argsort(flat, descending=True, stable=True)[: post.pose_top_k]
            ph, pw = prep.det_pixels.shape[-2:]
            rh, rw = prep.det_resized
            sx, sy = pw * w / rw, ph * h / rh  # normalised to the padded image -> original pixels
            for idx in order.tolist():
                score = float(flat[idx])
                if score < post.pose_score_threshold:
                    continue
                q, c = divmod(idx, len(objects))
                cx, cy, bw, bh = pose["pred_boxes"][0, q].tolist()
                box = ((cx - bw / 2) * sx, (cy - bh / 2) * sy, (cx + bw / 2) * sx, (cy + bh / 2) * sy)
                kp = pose["pred_keypoints"][0, q]
                xy = kp[: 2 * len(names)].reshape(-1, 2) * np.array([sx, sy])
                k = kp.shape[-1] // 3  # [x0, y0, ..., x{K-1}, y{K-1}, v0, ..., v{K-1}]
                vis = kp[2 * k : 2 * k + len(names)]
                keypoints = np.concatenate([xy, vis[:, None]], axis=1).astype(np.float32)
                result.poses.append(Pose(objects[c].label, score, box, keypoints, names, q))
        for kind in contract.GENERATION_KINDS:
            gen = raw.get(kind)
            if gen is not None and "images" in gen:
                for im in gen["images"]:
                    result.images.append((np.clip(im.transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8))

    def _mask_to_image(self, mask_logits: torch.Tensor, prep: _Prepared) -> torch.Tensor:
        """`[n, h/4, w/4]` logits -> `[n, H, W]` logits in the original frame (the official resize chain)."""
        n, mh, mw = mask_logits.shape
        up = F.interpolate(mask_logits[:, None], size=(mh * 4, mw * 4), mode="bilinear", align_corners=False)
        rh, rw = prep.det_resized
        up = up[:, :, :rh, :rw]
        w, h = prep.image_size
        return F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False)[:, 0]

    def _detection(
        self, lk: Link, q: int, score: float, box: torch.Tensor, obj: dict, chunk: int, prep: _Prepared
    ) -> Detection:
        w, h = prep.image_size
        cx, cy, bw, bh = box.tolist()
        xyxy = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
        logits = torch.from_numpy(obj["pred_masks"][chunk][q : q + 1])
        mask = (self._mask_to_image(logits, prep)[0].sigmoid() > self.post.mask_threshold).numpy()
        return Detection(lk.label, lk.kind, score, xyxy, mask, q)

    def _semantic_map(self, seg_classes, obj: dict, prep: _Prepared) -> SemanticMap:
        scores = []
        for _g, _lk, chunk, k in seg_classes:
            cls = torch.from_numpy(obj["logits"][chunk][:, k]).sigmoid()
            masks = self._mask_to_image(torch.from_numpy(obj["pred_masks"][chunk]), prep).sigmoid()
            scores.append(torch.einsum("q,qhw->hw", cls, masks))
        stacked = torch.stack(scores)
        best, label_map = stacked.max(0)
        label_map = torch.where(
            best >= self.post.seg_score_threshold, label_map, torch.full_like(label_map, -1)
        )
        return SemanticMap(label_map.numpy().astype(np.int32), [lk.label for _g, lk, _c, _k in seg_classes])

    # --- public API ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def forward_answer(
        self,
        image,
        prompt: str,
        answer: str,
        regions=None,
        history=(),
        det_image=None,
        region_frame: str = "image",
        bgr: bool = False,
    ) -> ForwardOutput:
        """Teacher-forced pass over prompt + answer, as the official evaluation runs it.

        The answer may carry the `[EMB]` placeholders or not; they are inserted after every routing token
        where absent, and the conversation ends with `</s>` as `preprocess_v1` builds it.
        """
        prep = self._prepare(image, regions, region_frame, det_image, bgr)
        full_answer = insert_placeholders(answer, self.config.num_embs, self.config.num_embs_gen)
        turns = self._turns(prompt, history, full_answer, has_image=prep.tiles is not None)
        ids = self._token_ids(turns, prep.n_tiles)
        return self._forward_ids(
            ids, prep, det_image, prompt, self._answer_start(ids, turns, prep.n_tiles), history
        )

    @torch.no_grad()
    def answer(
        self,
        image,
        prompt: str,
        answer: str,
        regions=None,
        history=(),
        instruction: str | None = None,
        det_image=None,
        region_frame: str = "image",
        bgr: bool = False,
        decode: bool = True,
        seed: int = 0,
        noise=None,
    ) -> Result:
        """A complete forced answer, post-processed: the reference side of the runtime's task shortcuts.

        The teacher-forced pass of `forward_answer` (one prefill over prompt + answer, no sampling), then the
        decoders its groups route to — with denoising for `[GEN]`/`[EDIT]` unless `decode=False` — and the
        post-processing of `run`. `instruction` labels `[GEN]`/`[EDIT]` groups (default: the prompt);
        `seed`/`noise` are the diffusion's, as in `run`.
        """
        prep = self._prepare(image, regions, region_frame, det_image, bgr)
        timings = prep.timings
        with _timed(timings, "tokenize"):
            full_answer = insert_placeholders(answer, self.config.num_embs, self.config.num_embs_gen)
            turns = self._turns(prompt, history, full_answer, has_image=prep.tiles is not None)
            ids = self._token_ids(turns, prep.n_tiles)
            answer_start = self._answer_start(ids, turns, prep.n_tiles)
        if len(ids) > self.max_context:
            raise ValueError(f"the conversation is {len(ids)} tokens; the context holds {self.max_context}")
        with _timed(timings, "prefill"):
            hidden = self.model.llm(self._embed(ids, prep), torch.arange(len(ids))).hidden[0]
        text = self._answer_text(ids[answer_start:])
        links = self._links(ids, hidden, answer_labels(text, prompt, instruction), answer_start)
        self._set_history_objects(prep, ids, hidden, answer_start, history)
        raw = self._run_decoders(links, prep, det_image, denoise=decode, seed=seed, noise=noise)
        query_rows = {lk.position + 1 + i for lk in links for i in range(len(lk.states))}
        result = Result(
            text=text,
            token_ids=[t for p, t in enumerate(ids) if p >= answer_start and p not in query_rows],
            stop_reason="eos",
            links=links,
            timings=timings,
        )
        with _timed(timings, "postprocess"):
            self._postprocess(links, raw, prep, result)
        result.raw = {"decoders": raw, "input_ids": np.asarray(ids, dtype=np.int64)}
        return result

    @torch.no_grad()
    def _set_history_objects(
        self, prep: _Prepared, ids: list[int], hidden, answer_start: int, history
    ) -> None:
        labels = [
            (kind, label)
            for _user, answer in history
            for kind, label in answer_labels(answer, "")
            if kind == "det"
        ]
        det = [
            lk for lk in self._links(ids, hidden, [], 0) if lk.position < answer_start and lk.kind == "det"
        ]
        for lk, (_kind, label) in zip(det, labels):
            lk.label = label
        prep.history_objects = det

    def _forward_ids(
        self, ids: list[int], prep: _Prepared, det_image, prompt: str, answer_start: int, history=()
    ) -> ForwardOutput:
        embeds = self._embed(ids, prep)
        positions = torch.arange(len(ids))
        out = self.model.llm(embeds, positions, keep_layer_states=True)
        hidden = out.hidden[0]
        logits = self.model.logits(hidden)
        labels = answer_labels(self._answer_text(ids[answer_start:]), prompt)
        links = self._links(ids, hidden, labels, answer_start)
        self._set_history_objects(prep, ids, hidden, answer_start, history)
        decoders = self._run_decoders(links, prep, det_image, denoise=False, seed=0)
        return ForwardOutput(
            input_ids=np.asarray(ids, dtype=np.int64),
            tiles=None if prep.tiles is None else prep.tiles.numpy(),
            hidden=hidden.numpy(),
            logits=logits.numpy(),
            links=links,
            decoders=decoders,
            inputs_embeds=embeds[0].numpy(),
            position_ids=positions.numpy(),
            vision=prep.vision,
            region_embeddings=None if prep.regions is None else prep.regions.numpy(),
            layer_states=[s[0].numpy() for s in out.layer_states],
        )

    def _answer_start(self, ids: list[int], turns, n_tiles: int) -> int:
        """Index of the first answer token: the length of the same conversation left open at "ASSISTANT:".

        Tokenisation is done on the whole text (as the official code does), so the open prompt is a prefix
        of the full ids unless a merge crosses the boundary; then the common prefix is the boundary.
        """
        open_turns = list(turns[:-1]) + [(turns[-1][0], None)]
        prompt_ids = self._token_ids(open_turns, n_tiles)
        n = 0
        for a, b in zip(prompt_ids, ids):
            if a != b:
                break
            n += 1
        return n

    def _answer_text(self, ids: list[int]) -> str:
        """Answer text with special tokens spelled out and placeholders dropped."""
        pieces: list[str] = []
        run: list[int] = []
        special_ids = {self.tokenizer.token_id(t): t for t in contract.ADDED_TOKENS}
        special_ids[self.tokenizer.eos_id] = contract.EOS_TOKEN
        for t in ids:
            if t in special_ids:
                if run:
                    pieces.append(self.tokenizer.decode(run))
                    run = []
                if t not in self.placeholder_ids and t != self.tokenizer.eos_id:
                    pieces.append(special_ids[t])
            else:
                run.append(t)
        if run:
            pieces.append(self.tokenizer.decode(run))
        return "".join(pieces).strip()

    @torch.no_grad()
    def run(
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
        decode: bool = True,
        noise=None,
    ) -> Result:
        """Generates an answer and runs every decoder its routing tokens ask for.

        Args:
            image: path, PIL image or `H x W x 3` uint8 array.
            prompt: the user's text; `<image>\\n` is put in front when it has none.
            regions: visual prompts, one per `<region>` in the prompt (masks, boxes or points).
            history: earlier (user, assistant) turns.
            answer_prefix: forced start of the answer (routing tokens in it are honoured).
            max_new_tokens: generation limit (query rows do not count).
            do_sample, temperature, top_k, top_p, repetition_penalty, seed: sampling; greedy by default.
            det_image: a different image for the decoders (path/PIL/array), or a dict with
                `pixel_values [1,3,H,W]`, `pixel_mask [1,H,W]` and `resized_hw`.
            region_frame: "image" (default) or "thumbnail" (masks already in the official S x S frame).
            decode: run the diffusion denoising for `[GEN]`/`[EDIT]` (off: conditioning only).
            noise: initial latents `[n, 4, h, w]` for `[GEN]`/`[EDIT]` (default: seeded Gaussian).
        """
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if temperature <= 0 and do_sample:
            raise ValueError(f"temperature must be positive when sampling, got {temperature}")
        prep = self._prepare(image, regions, region_frame, det_image, bgr)
        timings = prep.timings
        with _timed(timings, "tokenize"):
            prefix = (
                insert_placeholders(answer_prefix, self.config.num_embs, self.config.num_embs_gen)
                if answer_prefix
                else None
            )
            turns = self._turns(prompt, history, None, has_image=prep.tiles is not None)
            ids = self._token_ids(turns, prep.n_tiles, open_answer=prefix)
            answer_start = self._answer_start(ids, turns, prep.n_tiles) if prefix else len(ids)
        if len(ids) >= self.max_context:
            raise ValueError(f"the prompt is {len(ids)} tokens; the context holds {self.max_context}")
        generator = torch.Generator().manual_seed(seed)
        sampling = dict(
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            generator=generator,
        )
        ids, is_query, hidden, stop_reason = self._generate(ids, prep, max_new_tokens, sampling)
        answer_ids = ids[answer_start:]
        text = self._answer_text(answer_ids)
        labels = answer_labels(text, prompt)
        links = self._links(ids, hidden, labels, answer_start)
        self._set_history_objects(prep, ids, hidden, answer_start, history)
        raw = self._run_decoders(links, prep, det_image, denoise=decode, seed=seed, noise=noise)
        result = Result(
            text=text,
            token_ids=[t for t, q in zip(answer_ids, is_query[answer_start:]) if not q],
            stop_reason=stop_reason,
            links=links,
            timings=timings,
        )
        with _timed(timings, "postprocess"):
            self._postprocess(links, raw, prep, result)
        result.raw = {"decoders": raw, "input_ids": np.asarray(ids, dtype=np.int64)}
        return result

    @torch.no_grad()
    def _generate(
        self,
        ids: list[int],
        prep: _Prepared,
        max_new_tokens: int,
        sampling: dict,
        forced: dict[int, int] | None = None,
        trace: list | None = None,
    ):
        """Prefill `ids`, then decode with the cache until EOS or the limit.

        Returns the full id sequence (query placeholders included), a per-row flag of query rows, the
        post-norm hidden state of every row, and the stop reason. `forced` maps a new-token index to the token
        to emit there (tests force routing tokens as the golden data did); `trace`, when given, receives one
        dict per LLM call (rows, positions, past length, hidden, last-row logits).
        """
        timings = prep.timings
        is_query = [False] * len(ids)
        for pos, tok in enumerate(ids):
            kind = self.routing_ids.get(tok)
            if kind is not None:
                n = self.model.num_queries(kind)
                if all(t in self.placeholder_ids for t in ids[pos + 1 : pos + 1 + n]):
                    is_query[pos + 1 : pos + 1 + n] = [True] * n
        with _timed(timings, "prefill"):
            embeds = self._embed(ids, prep)
            out = self.model.llm(embeds, torch.arange(len(ids)))
            cache = out.new_kv
            hidden_rows = [out.hidden[0]]
            next_logits = self.model.logits(out.hidden[0, -1])
        if trace is not None:
            trace.append(
                {
                    "rows": len(ids),
                    "positions": np.arange(len(ids)),
                    "past": 0,
                    "hidden": out.hidden[0].numpy(),
                    "logits_last": next_logits.numpy(),
                }
            )
        generated = 0
        stop_reason = "length"
        with _timed(timings, "decode"):
            while generated < max_new_tokens:
                if forced and generated in forced:
                    token = forced[generated]
                else:
                    token = self._sample(next_logits, ids, **sampling)
                generated += 1
                if token == self.tokenizer.eos_id:
                    stop_reason = "eos"
                    ids.append(token)
                    is_query.append(False)
                    break
                kind = self.routing_ids.get(token)
                if generated == max_new_tokens and kind is None:
                    # The last token is not fed back (its logits would be unused), as in HF generate; a
                    # routing token still is, because its query rows carry the group's link states.
                    ids.append(token)
                    is_query.append(False)
                    break
                step_ids = [token]
                rows = self.model.embed_tokens(torch.tensor([token]))
                if kind is not None:
                    n = self.model.num_queries(kind)
                    rows = torch.cat([rows, self.model.query_table(kind)], dim=0)
                    step_ids += [self._placeholder_id(kind, i) for i in range(n)]
                if len(ids) + len(step_ids) > self.max_context:
                    stop_reason = "length"
                    break
                past = len(ids)
                positions = torch.arange(past, past + len(step_ids))
                step = self.model.llm(rows[None], positions, past=cache)
                cache = [
                    (torch.cat([pk, nk], dim=2), torch.cat([pv, nv], dim=2))
                    for (pk, pv), (nk, nv) in zip(cache, step.new_kv)
                ]
                hidden_rows.append(step.hidden[0])
                ids.extend(step_ids)
                is_query.extend([False] + [True] * (len(step_ids) - 1))
                next_logits = self.model.logits(step.hidden[0, -1])
                if trace is not None:
                    trace.append(
                        {
                            "rows": len(step_ids),
                            "positions": positions.numpy(),
                            "past": past,
                            "hidden": step.hidden[0].numpy(),
                            "logits_last": next_logits.numpy(),
                            "token": token,
                        }
                    )
        return ids, is_query, torch.cat(hidden_rows), stop_reason

    def _placeholder_id(self, kind: str, i: int) -> int:
        if kind in contract.GENERATION_KINDS:
            return self.tokenizer.token_id(contract.GENERATION_PLACEHOLDER)
        return self.tokenizer.token_id(contract.ALL_PLACEHOLDERS[i])

    def _sample(
        self,
        logits: torch.Tensor,
        ids: list[int],
        do_sample: bool,
        temperature: float,
        top_k: int,
        top_p: float,
        repetition_penalty: float,
        generator: torch.Generator,
    ) -> int:
        logits = logits.float().clone()
        if repetition_penalty != 1.0:
            seen = torch.tensor(
                sorted({t for t in ids if t not in self.placeholder_ids and t != self.patch_id})
            )
            if len(seen):
                vals = logits[seen]
                logits[seen] = torch.where(vals > 0, vals / repetition_penalty, vals * repetition_penalty)
        if not do_sample:
            return int(torch.argmax(logits))
        logits = logits / temperature
        if top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        if top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_p, 0)
            drop = cumulative - sorted_p > top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
            probs = probs / probs.sum()
        return int(torch.multinomial(probs, 1, generator=generator))


def _box_iou(a, b) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _nms(detections: list[Detection], iou: float) -> list[Detection]:
    """Class-aware greedy NMS on `[DET]` detections; other kinds pass through."""
    keep: list[Detection] = []
    for d in sorted(detections, key=lambda d: -d.score):
        if d.kind == "det" and any(
            k.kind == "det" and k.label == d.label and _box_iou(k.box_xyxy, d.box_xyxy) > iou for k in keep
        ):
            continue
        keep.append(d)
    return keep
