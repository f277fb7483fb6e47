"""Result types shared by the reference pipeline and the runtime (docs/architecture.md §9). Torch-free."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np


def rle_encode(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a binary mask: `{"size": [h, w], "counts": [...]}`.

    Runs alternate background, foreground, background, ... over the pixels in column-major order (COCO's
    convention, from its Fortran-ordered masks), starting with a background run that is 0 when the first
    pixel is set. pycocotools' `frPyObjects` turns this into its compressed form.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"rle_encode: expected an H x W mask, got shape {m.shape}")
    flat = m.ravel(order="F")
    if flat.size == 0:
        return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": []}
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], starts, [flat.size])))
    if flat[0]:
        counts = np.concatenate(([0], counts))
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": [int(c) for c in counts]}


def _mask_bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


@dataclass
class Link:
    """One super-link group: a routing token and the hidden states of its N query rows.

    Attributes:
        kind: lower-case routing kind, one of `det grd seg pose gen edit`.
        label: the phrase the group stands for (docs/architecture.md §9 label rule).
        position: sequence position of the routing token.
        states: `[N, H]` post-final-norm hidden states of the query rows (None in a lightweight result).
    """

    kind: str
    label: str
    position: int
    states: np.ndarray | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "label": self.label, "position": int(self.position)}


@dataclass
class Detection:
    """One detected object. `box_xyxy` is in original-image pixels; `mask` is `H x W` bool or None."""

    label: str
    kind: str
    score: float
    box_xyxy: tuple[float, float, float, float]
    mask: np.ndarray | None = None
    query_index: int = -1

    def to_dict(self) -> dict:
        d = {
            "label": self.label,
            "kind": self.kind,
            "score": float(self.score),
            "box_xyxy": [float(v) for v in self.box_xyxy],
            "query_index": int(self.query_index),
        }
        if self.mask is not None:
            d["mask_area"] = int(np.count_nonzero(self.mask))  # the pixels set, whatever the mask's dtype
        return d


@dataclass
class SemanticMap:
    """A `[SEG]` answer: `label_map[y, x]` indexes `labels`; -1 where no class scored."""

    label_map: np.ndarray
    labels: list[str]

    def to_dict(self) -> dict:
        counts = {lab: int((self.label_map == i).sum()) for i, lab in enumerate(self.labels)}
        return {"labels": list(self.labels), "pixels_per_label": counts}


@dataclass
class Pose:
    """One pose instance: `keypoints` is `[K, 3]` (x, y, visibility) in original-image pixels."""

    label: str
    score: float
    box_xyxy: tuple[float, float, float, float]
    keypoints: np.ndarray
    keypoint_names: list[str]
    query_index: int = -1

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "score": float(self.score),
            "box_xyxy": [float(v) for v in self.box_xyxy],
            "keypoints": np.asarray(self.keypoints, dtype=float).round(3).tolist(),
            "keypoint_names": list(self.keypoint_names),
        }


@dataclass
class Result:
    """What one request returns: text, routed groups, and every decoder's post-processed output."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    stop_reason: str = "eos"
    links: list[Link] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)
    segmentation: SemanticMap | None = None
    poses: list[Pose] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    #: Raw decoder tensors and the full id sequence, for parity checks; not part of the JSON.
    raw: dict | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": [int(t) for t in self.token_ids],
            "stop_reason": self.stop_reason,
            "links": [lk.to_dict() for lk in self.links],
            "detections": [d.to_dict() for d in self.detections],
            "segmentation": None if self.segmentation is None else self.segmentation.to_dict(),
            "poses": [p.to_dict() for p in self.poses],
            "images": [list(im.shape) for im in self.images],
            "timings_ms": {k: round(float(v), 3) for k, v in self.timings.items()},
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def draw(self, image, **kwargs) -> np.ndarray:
        """The image with this result drawn on it (boxes, masks, semantic map, poses); see `visualize`.

        Args:
            image: the request's image (path, PIL image or `H x W x 3` uint8 RGB array).
            **kwargs: `alpha`, `keypoint_threshold`, `skeleton`, `bgr` of `visualize.draw_result`.

        Returns:
            `H x W x 3` uint8 RGB. Generated images (`self.images`) are not drawn.
        """
        from visionllm_edge.visualize import draw_result  # Pillow drawing code, loaded only when drawing

        return draw_result(image, self, **kwargs)

    def to_coco(
        self, image_id: int = 0, category_ids: dict[str, int] | None = None, keypoint_threshold: float = 0.5
    ) -> dict:
        """This result as COCO results: `{"annotations": [...], "categories": [...]}`.

        Detections give `bbox` `[x, y, w, h]`, `score`, `area` and, with a mask, `segmentation` as
        uncompressed RLE. Each semantic-map label with pixels gives one annotation with its RLE and no score.
        Poses give `keypoints` flattened `[x, y, v, ...]` with v = 2 where the visibility reaches
        `keypoint_threshold` and 1 below it (located, likely occluded), `num_keypoints` (those with v > 0, as
        COCO counts them) and the raw `keypoint_scores`.

        Args:
            image_id: the `image_id` of every annotation.
            category_ids: label -> category id. Labels not in it get ids after its largest, in order of first
                appearance (from 1 when it is not given).
            keypoint_threshold: visibility at or above which a keypoint counts as visible.

        Returns:
            A JSON-serialisable dict. Categories list every id of `category_ids` and every label used; a pose
            label's category carries `keypoints` (names) and, where COCO's person skeleton matches the names,
            `skeleton` (1-based pairs).
        """
        from visionllm_edge.visualize import skeleton_for

        ids: dict[str, int] = {str(k): int(v) for k, v in (category_ids or {}).items()}
        next_id = max(ids.values(), default=0) + 1
        extra: dict[int, dict] = {}

        def category(label: str) -> int:
            nonlocal next_id
            if label not in ids:
                ids[label] = next_id
                next_id += 1
            return ids[label]

        annotations: list[dict] = []

        def add(ann: dict) -> None:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann, "iscrowd": 0})

        for d in self.detections:
            x0, y0, x1, y1 = (float(v) for v in d.box_xyxy)
            ann = {
                "category_id": category(d.label),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(d.score),
                "area": max(0.0, x1 - x0) * max(0.0, y1 - y0),
            }
            if d.mask is not None:
                ann["segmentation"] = rle_encode(d.mask)
                ann["area"] = float(np.count_nonzero(d.mask))
            add(ann)
        if self.segmentation is not None:
            label_map = np.asarray(self.segmentation.label_map)
            for i, label in enumerate(self.segmentation.labels):
                m = label_map == i
                if m.any():
                    add(
                        {
                            "category_id": category(label),
                            "bbox": _mask_bbox(m),
                            "area": float(np.count_nonzero(m)),
                            "segmentation": rle_encode(m),
                        }
                    )
        for p in self.poses:
            x0, y0, x1, y1 = (float(v) for v in p.box_xyxy)
            kps = np.asarray(p.keypoints, dtype=np.float64).reshape(-1, 3)
            vis = np.where(np.nan_to_num(kps[:, 2], nan=0.0) >= keypoint_threshold, 2, 1)
            flat: list[float] = []
            for (x, y, _v), v in zip(kps, vis):
                flat += [float(x), float(y), int(v)]
            cid = category(p.label)
            add(
                {
                    "category_id": cid,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(p.score),
                    "area": max(0.0, x1 - x0) * max(0.0, y1 - y0),
                    "keypoints": flat,
                    "num_keypoints": int(np.count_nonzero(vis > 0)),
                    "keypoint_scores": [float(v) for v in kps[:, 2]],
                }
            )
            if cid not in extra:
                names = list(p.keypoint_names)
                extra[cid] = {"keypoints": names}
                edges = skeleton_for(names)
                if edges:
                    extra[cid]["skeleton"] = [[a + 1, b + 1] for a, b in edges]
        categories = [
            {"id": cid, "name": name, "supercategory": "", **extra.get(cid, {})}
            for name, cid in sorted(ids.items(), key=lambda kv: kv[1])
        ]
        return {"annotations": annotations, "categories": categories}

    def __str__(self) -> str:
        lines = [f"text: {self.text!r}  (stop: {self.stop_reason}, {len(self.token_ids)} tokens)"]
        for lk in self.links:
            lines.append(f"  link {lk.kind:<4} @{lk.position:<5} {lk.label!r}")
        for d in self.detections:
            x0, y0, x1, y1 = d.box_xyxy
            m = "" if d.mask is None else f" mask={np.count_nonzero(d.mask)}px"
            lines.append(f"  {d.kind} {d.label!r} {d.score:.3f} [{x0:.1f},{y0:.1f},{x1:.1f},{y1:.1f}]{m}")
        if self.segmentation is not None:
            lines.append(f"  segmentation over {self.segmentation.labels}")
        for p in self.poses:
            lines.append(f"  pose {p.label!r} {p.score:.3f} {len(p.keypoint_names)} keypoints")
        for im in self.images:
            lines.append(f"  image {im.shape[1]}x{im.shape[0]}")
        if self.timings:
            lines.append("  timings (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items()))
        return "\n".join(lines)
