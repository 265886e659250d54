"""Sketch_LVM's fine-grained terms (Sain et al., CVPR 2023, section on fine-grained ZS-SBIR).

The instance-level triplet is the `triplet` term on instance triplets (data.sampler=instances:
the positive is the sketch's own photo, the negative another photo of its category). This
module adds the paper's two fine-grained objectives:

- `RelativeDistanceRegulariser`: the paper asks that the relative sketch-photo separation be
  uniform across categories, because a single triplet margin leaves some categories far
  better separated than others. Our reading (the paper gives the aim and a KL-divergence to
  a uniform distribution; the exact per-category statistic is our choice, docs/methods.md):
  per category c in the batch, delta_c = mean over its triplets of d(s, p_neg) - d(s, p_pos);
  q = softmax(delta / temperature) over the categories; L = KL(q || uniform)
  = sum_c q_c log(q_c * C). Zero when every category is equally separated.
- `PatchShuffleLoss`: a sketch and its photo cut into patches and shuffled with the SAME
  permutation are a positive pair, the photo shuffled with a DIFFERENT permutation the
  negative: mean(max(0, margin + d(s^A, p^A) - d(s^A, p^B))). The shuffled images are
  encoded by the auxiliary pass `PatchShufflePass` (zsbir/models/auxiliary.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zsbir.losses.base import LossContext, LossTerm
from zsbir.losses.triplet import DISTANCES, paired_distance
from zsbir.models.auxiliary import PatchShufflePass


def _check(name: str, margin: float, distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"loss.{name}.distance must be one of {DISTANCES}, got {distance!r}")
    if margin < 0:
        raise ValueError(f"loss.{name}.margin must be >= 0, got {margin}")


class RelativeDistanceRegulariser(LossTerm):
    views = ("sketch", "photo_pos", "photo_neg")

    def __init__(self, distance: str = "cosine", temperature: float = 1.0):
        super().__init__()
        _check("fg_relative", 0.0, distance)
        if not temperature > 0:
            raise ValueError(f"loss.fg_relative.temperature must be > 0, got {temperature}")
        self.distance, self.temperature = distance, float(temperature)

    def forward(self, batch: dict, outputs: dict, ctx: LossContext) -> torch.Tensor:
        anchor = outputs["sketch"]["embedding"]
        delta = (paired_distance(anchor, outputs["photo_neg"]["embedding"], self.distance)
                 - paired_distance(anchor, outputs["photo_pos"]["embedding"], self.distance))
        categories, which = torch.unique(batch["label"], return_inverse=True)
        if len(categories) < 2:
            return delta.sum() * 0.0  # one category: nothing to make uniform (keeps the graph)
        sums = torch.zeros(len(categories), dtype=delta.dtype, device=delta.device).index_add_(0, which, delta)
        counts = torch.bincount(which, minlength=len(categories)).to(delta.dtype)
        log_q = F.log_softmax(sums / counts / self.temperature, dim=0)
        return (log_q.exp() * (log_q + math.log(len(categories)))).sum()


class PatchShuffleLoss(LossTerm):
    views = ("sketch", "photo_pos")

    def __init__(self, margin: float = 0.2, distance: str = "cosine", grid: int = 2):
        super().__init__()
        _check("patch_shuffle", margin, distance)
        if int(grid) < 2:
            raise ValueError(f"loss.patch_shuffle.grid must be >= 2 (patches per side), got {grid}")
        self.margin, self.distance = float(margin), distance
        self.auxiliary_passes = (PatchShufflePass(int(grid)),)

    def forward(self, batch: dict, outputs: dict, ctx: LossContext) -> torch.Tensor:
        sketch = outputs["sketch"]["shuffled_embedding"]
        d_same = paired_distance(sketch, outputs["photo_pos"]["shuffled_embedding"], self.distance)
        d_other = paired_distance(sketch, outputs["photo_pos"]["reshuffled_embedding"], self.distance)
        return F.relu(d_same - d_other + self.margin).mean()
