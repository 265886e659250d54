"""DSN's category-specific memory of sketch features (Wang et al., IJCAI 2021).

For every seen class the memory keeps the last `slots` sketch features (the pooled
backbone features, stored detached; FIFO per class). Each photo is pulled towards the
centre of its class's stored sketch features:

    L_mem = 1 - mean over photos of cos(f_photo, centre_y)

The gradient flows through f_photo (the centre is a constant). The official code detaches
both inputs, so its loss never trains anything, and its slot replacement writes into the
wrong class's row; here each class has its own ring buffer. The memory is updated with the
batch's sketches before the loss is computed, so a photo's class always has a centre when
its sketch is in the batch; photos whose class has no stored sketch yet are skipped.
The memory lives in buffers: it is saved in checkpoints and restored on resume. Under
distributed training every rank stores the sketches of all ranks, so the memories agree.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zsbir.engine.distributed import all_gather_with_grad
from zsbir.data.views import PHOTO_VIEWS, SKETCH_VIEWS, VIEWS
from zsbir.losses.base import LossConfigError, LossContext, LossTerm, check_views, gather_labelled


class CategoryMemoryLoss(LossTerm):
    def __init__(self, slots: int = 10, feature: str = "pooled", views=("sketch", "photo_pos", "photo_neg")):
        super().__init__()
        if int(slots) < 1:
            raise LossConfigError(f"loss.memory.slots must be >= 1, got {slots}")
        self.slots, self.feature = int(slots), feature
        self.views = check_views(views, tuple(VIEWS), "memory")
        self.sketch_views = tuple(v for v in self.views if v in SKETCH_VIEWS)
        self.photo_views = tuple(v for v in self.views if v in PHOTO_VIEWS)
        if not self.sketch_views or not self.photo_views:
            raise LossConfigError(f"loss.memory.views={list(self.views)} must include a sketch view and a photo view")
        # (classes x slots x dim) features, and how many sketches each class has received in
        # total (slot = writes % slots). Sized on first use, or from a checkpoint.
        self.register_buffer("bank", torch.zeros(0, self.slots, 0))
        self.register_buffer("writes", torch.zeros(0, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint's memory has its own size: adopt it before the copy.
        for name in ("bank", "writes"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _allocate(self, num_classes: int, dim: int, device) -> None:
        if self.bank.shape[0] == num_classes and self.bank.shape[2] == dim:
            return
        if self.writes.sum() > 0:
            raise LossConfigError(f"the memory holds {tuple(self.bank.shape[::2])} (classes, dim) features but the "
                                  f"model gives {dim}-d features for {num_classes} classes")
        self.bank = torch.zeros(num_classes, self.slots, dim, device=device)
        self.writes = torch.zeros(num_classes, dtype=torch.long, device=device)

    @torch.no_grad()
    def store(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Write sketch features into their classes' ring buffers (oldest slot first)."""
        features = features.detach().to(self.bank.dtype)
        for label in labels.unique():
            rows = features[labels == label][-self.slots:]  # more than `slots` at once: the last ones win
            slot = (self.writes[label] + torch.arange(len(rows), device=rows.device)) % self.slots
            self.bank[label, slot] = rows
            self.writes[label] += len(rows)

    def centres(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(classes x dim) mean of each class's stored features, and which classes have any."""
        filled = self.writes.clamp(max=self.slots)
        used = torch.arange(self.slots, device=self.bank.device)[None, :] < filled[:, None]
        total = (self.bank * used[..., None]).sum(dim=1)
        return total / filled.clamp(min=1)[:, None].to(total.dtype), filled > 0

    def forward(self, batch: dict, outputs: dict, ctx: LossContext) -> torch.Tensor:
        sketches, sketch_labels = gather_labelled(batch, outputs, self.sketch_views, self.feature, "memory")
        photos, photo_labels = gather_labelled(batch, outputs, self.photo_views, self.feature, "memory")
        self._allocate(len(ctx.class_names), sketches.shape[1], sketches.device)
        self.store(all_gather_with_grad(sketches.detach()), all_gather_with_grad(sketch_labels))
        centre, has_centre = self.centres()
        keep = has_centre[photo_labels]
        if not keep.any():
            return photos.sum() * 0.0  # nothing stored for these classes yet: a zero that keeps the graph
        cos = F.cosine_similarity(photos[keep].float(), centre[photo_labels[keep]], dim=1)
        return 1.0 - cos.mean()
