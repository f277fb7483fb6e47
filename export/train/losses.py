"""Set-prediction losses of the DETR family, as Grounding DINO and UniPose train (our own plain version).

Each image's predictions are matched one-to-one to its ground-truth objects by the Hungarian algorithm on
a cost of class, L1-box and GIoU terms (plus keypoints for UniPose); matched predictions learn their
object, all others learn "nothing here" through a sigmoid focal loss over the text classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def box_cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), -1)


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU `[N, M]` of xyxy boxes."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None] - inter
    iou = inter / union.clamp(min=1e-7)
    lt_c = torch.min(a[:, None, :2], b[None, :, :2])
    rb_c = torch.max(a[:, None, 2:], b[None, :, 2:])
    hull = (rb_c - lt_c).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-7)


def sigmoid_focal(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """Element-wise sigmoid focal loss (RetinaNet)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    return loss * (alpha * targets + (1 - alpha) * (1 - targets))


@dataclass
class Target:
    """One image's ground truth: `labels [n]` (text-slot index), `boxes [n, 4]` (cx, cy, w, h in [0, 1]),
    optional `masks [n, h, w]` (float) and `keypoints [n, K, 2]` in [0, 1]."""

    labels: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor | None = None
    keypoints: torch.Tensor | None = None


@torch.no_grad()
def match(logits, boxes, target: Target, keypoints=None, w_class=2.0, w_l1=5.0, w_giou=2.0, w_kpt=10.0):
    """Hungarian matching of one image's predictions `logits [Q, K]`, `boxes [Q, 4]` to its targets.

    Returns `(pred_index, target_index)` int64 tensors.
    """
    n = len(target.labels)
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    p = logits[:, target.labels].sigmoid()
    pos = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log()
    neg = 0.75 * p**2 * -(1 - p + 1e-8).log()
    cost = w_class * (pos - neg)
    cost = cost + w_l1 * torch.cdist(boxes, target.boxes, p=1)
    cost = cost - w_giou * generalized_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target.boxes))
    if keypoints is not None and target.keypoints is not None:
        cost = (
            cost
            + w_kpt
            * torch.cdist(keypoints.flatten(1), target.keypoints.flatten(1), p=1)
            / (target.keypoints.shape[1])
        )
    cost = torch.nan_to_num(cost, nan=1e4, posinf=1e4, neginf=-1e4)
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    p = logits.sigmoid().flatten(1)
    t = targets.flatten(1)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def set_loss(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    targets: list[Target],
    num_classes: torch.Tensor,
    masks: torch.Tensor | None = None,
    keypoints: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Matched losses over a batch.

    Args:
        logits: `[B, Q, >=K]` class logits (slots past each image's class count are ignored).
        boxes: `[B, Q, 4]` (cx, cy, w, h) in [0, 1].
        targets: per image.
        num_classes: `[B]` how many text slots each image has.
        masks: optional `[B, Q, h, w]` mask logits (targets' masks at the same size).
        keypoints: optional `[B, Q, K, 2]`.
        valid: optional `[B, Q]` bool, predictions that exist (encoder tokens in the padded area do not).
    """
    b, q, _ = boxes.shape
    k_max = int(num_classes.max())
    cls_logits = logits[..., :k_max]
    cls_target = torch.zeros_like(cls_logits)
    slot_ok = torch.arange(k_max)[None, None] < num_classes[:, None, None]
    if valid is not None:
        slot_ok = slot_ok & valid[..., None]
    l1, giou, mask_ce, mask_dice, kpt = [], [], [], [], []
    n_total = 0
    for i, t in enumerate(targets):
        lg = cls_logits[i].masked_fill(~slot_ok[i], -1e4)
        bx = boxes[i]
        if valid is not None:
            bx = torch.where(valid[i][:, None], bx, torch.full_like(bx, 2.0))
        rows, cols = match(lg.float(), bx.float(), t, None if keypoints is None else keypoints[i])
        n_total += len(rows)
        if not len(rows):
            continue
        cls_target[i, rows, t.labels[cols]] = 1.0
        pb, tb = boxes[i, rows], t.boxes[cols]
        l1.append(F.l1_loss(pb, tb, reduction="none").sum(-1))
        giou.append(1 - torch.diag(generalized_iou(box_cxcywh_to_xyxy(pb), box_cxcywh_to_xyxy(tb))))
        if masks is not None and t.masks is not None:
            pm, tm = masks[i, rows], t.masks[cols]
            mask_ce.append(F.binary_cross_entropy_with_logits(pm, tm, reduction="none").mean((-1, -2)))
            mask_dice.append(dice_loss(pm, tm))
        if keypoints is not None and t.keypoints is not None:
            kpt_l1 = F.l1_loss(keypoints[i, rows], t.keypoints[cols], reduction="none")
            kpt.append(kpt_l1.sum((-1, -2)) / keypoints.shape[2])
    norm = max(n_total, 1)
    # Slots past an image's classes (and padded tokens) hold -inf logits: neutralise them before the loss.
    focal = sigmoid_focal(torch.where(slot_ok, cls_logits, torch.zeros_like(cls_logits)), cls_target)
    out = {"class": (focal * slot_ok).sum() / norm}
    zero = boxes.sum() * 0
    out["l1"] = torch.cat(l1).sum() / norm if l1 else zero
    out["giou"] = torch.cat(giou).sum() / norm if giou else zero
    if masks is not None:
        out["mask_ce"] = torch.cat(mask_ce).sum() / norm if mask_ce else zero
        out["mask_dice"] = torch.cat(mask_dice).sum() / norm if mask_dice else zero
    if keypoints is not None:
        out["keypoints"] = torch.cat(kpt).sum() / norm if kpt else zero
    return out


WEIGHTS = {"class": 2.0, "l1": 5.0, "giou": 2.0, "mask_ce": 5.0, "mask_dice": 5.0, "keypoints": 10.0}


def weighted(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(WEIGHTS[k] * v for k, v in parts.items())
