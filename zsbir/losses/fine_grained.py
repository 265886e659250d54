"""Sketch_LVM's fine-grained terms (Sain et al., CVPR 2023, section on fine-grained ZS-SBIR).

The instance-level triplet is the `triplet` term on instance triplets (data.sampler=instances:
the positive is the sketch's own photo, the negative another photo of its category). This
module adds the paper's two fine-grained objectives:

- `RelativeDistanceRegulariser` (the paper's L_delta, its Eq. 4 as quoted in
  docs/methods.md): a single triplet margin leaves some categories far better separated
  than others, so the distributions of relative distances are made alike across
  categories. For each triplet delta = d(s, p_pos) - d(s, p_neg); for each category c of
  the batch D_c = softmax(delta_c / temperature) over its N triplets (the paper: plain
  softmax, temperature 1); L = mean over ordered pairs c != c' of KL(D_c || D_c').
  Comparing D_c with D_c' needs the same N in every category: batches from
  `data.balanced` (P categories x K sketches) have it, and the config check refuses the
  term without data.balanced (zsbir/config.py); called on other batches directly, each
  category's first N = (smallest count) triplets in batch order are used.
- `PatchShuffleLoss`: a sketch and its photo cut into patches and shuffled with the SAME
  permutation are a positive pair, the photo shuffled with a DIFFERENT permutation the
  negative: mean(max(0, margin + d(s^A, p^A) - d(s^A, p^B))). The shuffled images are
  encoded by the auxiliary pass `PatchShufflePass` (zsbir/models/auxiliary.py).
"""
from __future__ import annotations

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
        delta = (paired_distance(anchor, outputs["photo_pos"]["embedding"], self.distance)
                 - paired_distance(anchor, outputs["photo_neg"]["embedding"], self.distance))
        categories, which = torch.unique(batch["label"].to(delta.device), return_inverse=True)
        if len(categories) < 2:
            return delta.sum() * 0.0  # one category: nothing to compare (keeps the graph)
        counts = torch.bincount(which, minlength=len(categories))
        n = int(counts.min())
        # rows: the categories; columns: their first n triplets in batch order
        by_category = torch.argsort(which, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        table = delta[by_category[starts[:, None] + torch.arange(n, device=delta.device)[None, :]]]
        log_d = F.log_softmax(table / self.temperature, dim=1)
        # kl[i, j] = KL(D_i || D_j); the diagonal is exactly 0
        kl = (log_d.exp()[:, None, :] * (log_d[:, None, :] - log_d[None, :, :])).sum(dim=2)
        c = len(categories)
        return kl.sum() / (c * (c - 1))


class PatchShuffleLoss(LossTerm):
    views = ("sketch", "photo_pos")

    def __init__(self, margin: float = 0.3, distance: str = "cosine", grid: int = 2):
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
