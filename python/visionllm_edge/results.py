"""Result types shared by the reference pipeline and the runtime (DESIGN.md §9). Torch-free."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Link:
    """One super-link group: a routing token and the hidden states of its N query rows.

    Attributes:
        kind: lower-case routing kind, one of `det grd seg pose gen edit`.
        label: the phrase the group stands for (DESIGN.md §9 label rule).
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
            d["mask_area"] = int(self.mask.sum())
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

    def __str__(self) -> str:
        lines = [f"text: {self.text!r}  (stop: {self.stop_reason}, {len(self.token_ids)} tokens)"]
        for lk in self.links:
            lines.append(f"  link {lk.kind:<4} @{lk.position:<5} {lk.label!r}")
        for d in self.detections:
            x0, y0, x1, y1 = d.box_xyxy
            m = "" if d.mask is None else f" mask={int(d.mask.sum())}px"
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
