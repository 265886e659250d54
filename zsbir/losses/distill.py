"""SAKE's knowledge distillation from a frozen ImageNet teacher (Liu et al., ICCV 2019).

On PHOTOS only (sketches never reach this term):

    L_KD = mean over photos of  - sum_c q_c log softmax(kd_logits)_c,
    q    = softmax(lambda_kd * teacher_logits + kdneg * M[y])

`kd_logits` are the student's 1000-way ImageNet logits (CSE-ResNet-50's kd_head), the
teacher logits come from the frozen ImageNet SE-ResNet-50 seeing the same photo images (an
auxiliary pass the training step runs with the encoder: zsbir/models/auxiliary.py), and M is SAKE's
`cid_mask`: for each seen class y a 1000-d WordNet similarity to the ImageNet classes,
which raises the target probability of ImageNet classes related to the photo's class.

`mask: wordnet` (the default) takes M from the tables that ship in the package
(zsbir/data/class_masks/, one per split folder: Sketchy split 1 and 2, TU-Berlin,
QuickDraw), rebuilt from WordNet 3.0 with SAKE's procedure (zsbir/data/wordnet_masks.py;
identical to SAKE's pickles where SAKE ships them). SAKE's own `cid_mask.pickle` (in its
dataset folders) still works: `mask: cid_mask.pickle` (relative: in the split folder). It
is a pickle, so it is read with a restricted unpickler that admits numpy arrays and plain
containers only (never plain `pickle.load`); a converted `.npy` (C x 1000, row = class
id) or a `.json` table from `python -m zsbir.data.wordnet_masks` works too. `kdneg: 0` or
`mask: null` turns the class-similarity part off.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zsbir.data.views import PHOTO_VIEWS
from zsbir.data.wordnet_masks import ClassMaskError, load_table, packaged_mask, read_mask_pickle
from zsbir.losses.base import LossConfigError, LossContext, LossTerm, check_views, gather_labelled
from zsbir.models.auxiliary import TeacherLogits
from zsbir.models.cse_resnet import IMAGENET_CLASSES, build_imagenet_teacher
from zsbir.models.encoder import NORMALIZATION

log = logging.getLogger(__name__)

# loss.distill.mask value for the masks rebuilt from WordNet that ship with the package
PACKAGED_MASK = "wordnet"

def load_class_mask(path: str | Path, num_classes: int) -> torch.Tensor:
    """SAKE's cid_mask as a (num_classes x 1000) float tensor; row y = seen class id y.

    Accepts SAKE's pickle ({class id: 1000-d array}), or a .npy / pickled array of shape
    (num_classes, 1000). Raises LossConfigError naming the file on anything else.
    """
    path = Path(path)
    try:
        content = np.load(path, allow_pickle=False) if path.suffix == ".npy" else read_mask_pickle(path)
    except (OSError, pickle.UnpicklingError, ValueError, EOFError) as err:
        raise LossConfigError(f"cannot read the distillation class mask {path}: {err}") from err
    if isinstance(content, dict):
        ids = {int(k) for k in content}
        missing = sorted(set(range(num_classes)) - ids)
        if missing:
            raise LossConfigError(f"{path} has no row for seen class ids {missing[:10]} (of {num_classes}); "
                                  "it belongs to another split: use the cid_mask.pickle of this split's folder")
        rows = [np.asarray(content[k] if k in content else content[str(k)], dtype=np.float32).reshape(-1)
                for k in range(num_classes)]
        content = np.stack(rows)
    matrix = np.asarray(content, dtype=np.float32)
    if matrix.shape != (num_classes, IMAGENET_CLASSES):
        raise LossConfigError(f"{path} holds a class mask of shape {matrix.shape}; expected ({num_classes}, "
                              f"{IMAGENET_CLASSES}) for this split's {num_classes} seen classes")
    return torch.from_numpy(matrix)


class DistillationLoss(LossTerm):
    """Soft cross-entropy between the student's kd_logits and the teacher's (masked) ImageNet posterior."""

    def __init__(self, lambda_kd: float = 1.0, kdneg: float = 0.3, mask: str | None = "cid_mask.pickle",
                 teacher_arch: str = "legacy_seresnet50", teacher_pretrained: str | None = "legacy_seresnet50.in1k",
                 teacher_tiny: bool = False, teacher_norm: str = "imagenet", views=("photo_pos",)):
        super().__init__()
        self.views = check_views(views, PHOTO_VIEWS, "distill")
        if teacher_norm not in NORMALIZATION:
            raise LossConfigError(f"loss.distill.teacher_norm must be one of {sorted(NORMALIZATION)}, got {teacher_norm!r}")
        self.lambda_kd, self.kdneg = float(lambda_kd), float(kdneg)
        self.mask_path = mask if self.kdneg else None
        self.teacher_norm = teacher_norm
        if teacher_pretrained is None and not teacher_tiny:
            raise LossConfigError(
                "loss.distill.teacher_pretrained is null: a randomly initialised teacher distils nothing. Set it to "
                "the ImageNet weights (legacy_seresnet50.in1k or a local file); it follows model.pretrained by default"
            )
        # Not a submodule: frozen, so it is neither trained nor written into every checkpoint
        # (it is rebuilt from its weights on resume).
        teacher = build_imagenet_teacher(teacher_pretrained, tiny=teacher_tiny, arch=teacher_arch)
        self.auxiliary_passes = (TeacherLogits(teacher, teacher_norm, self.views),)
        self.class_mask: torch.Tensor | None = None

    @property
    def teacher(self) -> torch.nn.Module:
        return self.auxiliary_passes[0].teacher

    def on_train_start(self, ctx: LossContext, class_names: list[str]) -> None:
        self._ensure_mask(ctx)

    def _ensure_mask(self, ctx: LossContext) -> None:
        if self.mask_path is None or self.class_mask is not None:
            return
        if self.mask_path == PACKAGED_MASK:
            self._packaged_mask(ctx)
            return
        path = Path(self.mask_path).expanduser()
        if not path.is_absolute():
            if ctx.split_dir is None:
                # A dataset without a split folder of its own (the generated benchmark: its glyph
                # classes have no ImageNet counterparts) ships no mask; an explicit path must exist.
                log.info("loss.distill: the dataset ships no split files (no %s); training without the kdneg term",
                         path)
                self.mask_path = None
                return
            path = ctx.split_dir / path
        if not path.is_file():
            raise LossConfigError(
                f"the distillation class mask {path} does not exist. It ships in SAKE's dataset folders "
                "(https://cs.jhu.edu/~qliu24/ZSSBIR/dataset.zip, next to the split files); point "
                "loss.distill.mask at it, or turn the class-similarity term off with loss.distill.mask=null "
                "(or loss.distill.kdneg=0)"
            )
        if path.suffix == ".json":  # a table written by python -m zsbir.data.wordnet_masks
            self.class_mask = self._wordnet_table(lambda names: load_table(path, names), ctx)
        else:
            self.class_mask = load_class_mask(path, len(ctx.class_names))
        log.info("loss.distill: class mask %s (%d x %d), kdneg %.3g", path, *self.class_mask.shape, self.kdneg)

    def _packaged_mask(self, ctx: LossContext) -> None:
        """mask: wordnet -> the WordNet mask shipped for this split folder (zsbir/data/class_masks)."""
        if ctx.split_dir is None:  # the generated benchmark: glyph classes without ImageNet counterparts
            log.info("loss.distill: the dataset ships no split files (no class mask); training without the kdneg term")
            self.mask_path = None
            return
        split_dir = ctx.split_dir
        self.class_mask = self._wordnet_table(lambda names: packaged_mask(split_dir, names), ctx)
        log.info("loss.distill: packaged WordNet class mask of %s (%d x %d), kdneg %.3g", split_dir,
                 *self.class_mask.shape, self.kdneg)

    @staticmethod
    def _wordnet_table(load, ctx: LossContext) -> torch.Tensor:
        try:
            return torch.from_numpy(load(list(ctx.class_names)).astype(np.float32))
        except ClassMaskError as err:
            raise LossConfigError(f"loss.distill.mask: {err}") from None

    def forward(self, batch: dict, outputs: dict, ctx: LossContext) -> torch.Tensor:
        self._ensure_mask(ctx)
        student, labels = gather_labelled(batch, outputs, self.views, "kd_logits", "distill")
        teacher_logits, _ = gather_labelled(batch, outputs, self.views, TeacherLogits.output_key, "distill")
        target = self.lambda_kd * teacher_logits
        if self.class_mask is not None:
            self.class_mask = self.class_mask.to(target.device)
            target = target + self.kdneg * self.class_mask[labels]
        return -(F.softmax(target, dim=1) * F.log_softmax(student.float(), dim=1)).sum(dim=1).mean()
