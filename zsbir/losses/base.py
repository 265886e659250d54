"""One signature for every loss term, and the LossSet that weights and sums them.

A term is `term(batch, outputs, ctx) -> scalar tensor`:
- `batch`: the training batch dict (images by view name, `label`, `neg_label`, ...;
  see zsbir/data/pairs.py);
- `outputs`: view name -> EncoderOutput, for every view the LossSet asked the trainer
  to encode (zsbir/data/views.py). Triplet batches (`data.sampler: triplets`) hold
  `sketch`, `photo_pos`, `photo_neg` and the second augmented views `sketch_v2`,
  `photo_pos_v2`; two-stream batches (`data.sampler: streams`, zsbir/data/streams.py) hold
  `sketch` and `photo` (independent draws, each with its own labels) and the extra augmented
  views `sketch_v2`, `sketch_v3`, `photo_v2`, `photo_v3`. The results of the auxiliary
  passes the terms declared (zsbir/models/auxiliary.py) are added per view;
- `ctx`: training progress, the (unwrapped) encoder, the seen class names and the
  dataset's split folder, for terms that need them.

A term is loss math only: it runs no network besides its own small heads. Terms declare
the views they read in `views` and the networks they read in `auxiliary_passes`; the
training step encodes the union of the views and runs every distinct pass once, under
the encoder's autocast. Terms may own parameters (a domain classifier, a projection
head); the optimizer trains them together with the encoder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from zsbir.data.views import VIEWS, in_order
from zsbir.errors import ZsbirError



class LossConfigError(ZsbirError):
    """A loss term's configuration cannot work (bad value, missing file, unsuitable model)."""


@dataclass
class LossContext:
    step: int = 0  # optimisation steps done before this one
    total_steps: int = 1
    epoch: int = 0
    encoder: Any = None  # the unwrapped Encoder (no DDP wrapper)
    steps_per_epoch: int = 1
    class_names: list[str] = field(default_factory=list)  # the seen classes, by label
    split_dir: Path | None = None  # the dataset's split folder (files that ship with a split, e.g. SAKE's cid_mask)

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return min(1.0, self.step / max(1, self.total_steps))

    @property
    def epochs_done(self) -> float:
        """Training progress in epochs, with the fraction of the current one (2.5 = half-way through epoch 3)."""
        return self.step / max(1, self.steps_per_epoch)


def check_views(views, allowed: tuple[str, ...], loss_name: str) -> tuple[str, ...]:
    """Validate a term's configurable `views` list against the views it can use."""
    views = tuple(views)
    bad = [v for v in views if v not in allowed]
    if not views or bad:
        raise LossConfigError(f"loss.{loss_name}.views={list(views)}: each view must be one of {list(allowed)}"
                              + (f" ({bad} is not)" if bad else " and at least one is needed"))
    return views


def gather_labelled(batch: dict, outputs: dict, views: tuple[str, ...], key: str, loss_name: str):
    """Concatenate the output `key` of `views` with their class labels: (features, labels)."""
    present = [v for v in views if v in outputs]
    try:
        features = torch.cat([outputs[v].need(key, loss_name) for v in present])
    except KeyError as err:  # the model lacks this output: a configuration error, said plainly
        raise LossConfigError(err.args[0]) from None
    labels = torch.cat([batch[VIEWS[v].label_key] for v in present])
    return features, labels


class LossTerm(nn.Module):
    """Base class of a loss term. Subclasses set `views` and implement `forward`."""

    views: ClassVar[tuple[str, ...]] = ("sketch", "photo_pos", "photo_neg")
    auxiliary_passes: tuple = ()  # AuxiliaryPass instances whose outputs the term reads

    def forward(self, batch: dict, outputs: dict, ctx: LossContext) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def on_train_start(self, ctx: LossContext, class_names: list[str]) -> None:
        """Hook for terms that precompute something from the model or the dataset."""


class LossSet(nn.Module):
    """Weighted sum of named terms; returns the total and every (unweighted) term."""

    def __init__(self, terms: dict[str, LossTerm], weights: dict[str, float]):
        super().__init__()
        if not terms:
            raise ValueError("the loss set is empty: select at least one term, e.g. loss=[triplet]")
        self.terms = nn.ModuleDict(terms)
        self.weights = dict(weights)

    @property
    def views(self) -> tuple[str, ...]:
        return in_order({v for term in self.terms.values() for v in term.views})

    @property
    def auxiliary_passes(self) -> list:
        """Every distinct auxiliary pass of the terms (equal keys: one pass), in term order."""
        return list({p.key: p for term in self.terms.values() for p in term.auxiliary_passes}.values())

    def on_train_start(self, ctx: LossContext, class_names: list[str]) -> None:
        for term in self.terms.values():
            term.on_train_start(ctx, class_names)
        for aux in self.auxiliary_passes:
            aux.prepare(ctx.encoder, class_names)

    def forward(self, batch: dict, outputs: dict, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Loss math runs in float32 even when the encoder ran under bf16 / fp16 autocast:
        # logit_scale 100 or a 0.07 temperature turn bf16's rounding of a cosine (~4e-3)
        # into errors of a whole logit.
        device_type = next(iter(outputs.values()))["embedding"].device.type if outputs else "cpu"
        with torch.autocast(device_type, enabled=False):
            outputs = {view: type(out)({k: t.float() if torch.is_tensor(t) and t.is_floating_point() else t
                                        for k, t in out.items()}) for view, out in outputs.items()}
            values = {name: term(batch, outputs, ctx) for name, term in self.terms.items()}
            total = sum(self.weights[name] * value for name, value in values.items())
        return total, values

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "name": "losses"}] if params else []


def build_loss_set(loss_cfg) -> LossSet:
    """Build the LossSet from the `loss` config group: `{term_name: {_target_, weight, ...}}`."""
    from zsbir.instantiate import build_from_config, plain_node

    terms, weights = {}, {}
    for name, node in (loss_cfg or {}).items():
        cfg = plain_node(node, drop=())
        if "weight" not in cfg or "_target_" not in cfg:
            raise ValueError(f"loss term '{name}' needs `_target_` and `weight` in its config")
        weights[name] = float(cfg.pop("weight"))
        if weights[name] != 0:
            terms[name] = build_from_config(cfg, drop=())
    return LossSet(terms, weights)
