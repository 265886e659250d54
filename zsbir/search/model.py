"""A trained run's encoder, ready to embed photos for an index and sketches for a query.

`run_encoder` is the one place that runs the network (`embed_batch` normalises its
embeddings; re-ranking also reads its token sequences): when the evaluation code gets a
single `Evaluator`, this is the function to point at it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from zsbir.data.iteration import batches

log = logging.getLogger("zsbir.search")


@dataclass
class RunModel:
    """The encoder of one checkpoint of a run, and what its embeddings depend on."""

    run_dir: Path
    run_cfg: DictConfig
    encoder: torch.nn.Module
    checkpoint: Path
    checkpoint_label: str
    checkpoint_sha256: str
    step: int | None
    image_size: int
    device: torch.device
    amp_dtype: torch.dtype | None
    precision: str
    transforms: dict[str, Callable]
    loss_state: dict

    def transform_fingerprint(self) -> dict:
        """What the photo embeddings depend on besides the weights (compared by the stale-index check)."""
        return {"image_size": self.image_size, "norm": self.encoder.norm, "precision": self.precision,
                "photo_transform": repr(self.transforms["photo"])}

    def encode_sketch(self, image: Image.Image) -> np.ndarray:
        """One sketch (any PIL mode; transparency becomes white paper) -> a unit float32 vector."""
        batch = self.transforms["sketch"](image).unsqueeze(0)
        return embed_batch(self, batch, "sketch")[0]

    def encode_sketch_with_sequence(self, image: Image.Image) -> tuple[np.ndarray, torch.Tensor]:
        """(unit vector, 1 x tokens x width float32 "sequence" on the CPU) of one sketch, in ONE
        forward pass: what a pair scorer re-ranks with (zsbir/search/rerank.py)."""
        out = run_encoder(self, self.transforms["sketch"](image).unsqueeze(0), "sketch")
        return unit_embeddings(out)[0], out["sequence"].float().cpu()


def load_run_model(run_dir: str | Path, ckpt: str = "best", device: str = "cpu",
                   precision: str | None = None) -> RunModel:
    """Rebuild a run's encoder from its config.yaml and load a checkpoint (`best`, `last` or a file)."""
    from zsbir.data.transforms import build_transform
    from zsbir.engine.checkpoint import CheckpointError, load_checkpoint
    from zsbir.engine.device import amp_dtype, pick_device
    from zsbir.eval.__main__ import (RunDirError, check_model_fingerprint, file_sha256, load_run_config,
                                     resolve_checkpoint)
    from zsbir.models.encoder import build_encoder

    if not run_dir:
        raise RunDirError("no run directory given: pass run_dir=<a training run directory> "
                          "(the folder a `python -m zsbir.train` run wrote)")
    run_dir = Path(str(run_dir)).expanduser().resolve()
    run_cfg = load_run_config(run_dir)
    ckpt_path, label = resolve_checkpoint(run_dir, str(ckpt))
    state = load_checkpoint(ckpt_path)
    check_model_fingerprint(state, run_cfg.model, ckpt_path, run_dir)
    model_cfg = OmegaConf.to_container(run_cfg.model, resolve=True)
    if "pretrained" in model_cfg:
        model_cfg["pretrained"] = None  # every weight is in the checkpoint
    encoder = build_encoder(OmegaConf.create(model_cfg), int(state["fingerprint"]["seen_classes"]))
    try:
        encoder.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt_path} does not fit the model of {run_dir / 'config.yaml'}: {err}") from None
    torch_device = pick_device(device)
    encoder.to(torch_device).eval()
    requested = str(precision or run_cfg.trainer.get("precision", "fp32"))
    autocast = amp_dtype(requested, torch_device)
    size = int(run_cfg.data.image_size)
    transforms = {d: build_transform(d, size, encoder.norm, train=False) for d in ("sketch", "photo")}
    return RunModel(run_dir, run_cfg, encoder, ckpt_path, label, file_sha256(ckpt_path), state.get("step"), size,
                    torch_device, autocast, requested if autocast else "fp32", transforms, state.get("losses") or {})


@torch.no_grad()
def embed_batch(model: RunModel, images: torch.Tensor, domain: str) -> np.ndarray:
    """(n x 3 x S x S) normalised images -> (n x d) L2-normalised float32 embeddings.

    Normalised exactly as the evaluator's cosine ranking does (F.normalize in float32), so
    inner products in the index are the evaluator's cosine scores.
    """
    return unit_embeddings(run_encoder(model, images, domain))


@torch.no_grad()
def run_encoder(model: RunModel, images: torch.Tensor, domain: str) -> dict:
    """The encoder's outputs for a batch, at the run's precision."""
    images = images.to(model.device)
    with torch.autocast(model.device.type, dtype=model.amp_dtype, enabled=model.amp_dtype is not None):
        return model.encoder(images, domain)


def unit_embeddings(out: dict) -> np.ndarray:
    return F.normalize(out["embedding"].float(), dim=1).cpu().numpy().astype(np.float32, copy=False)


def read_transformed(path, transform: Callable) -> tuple[torch.Tensor | None, str | None]:
    """(the transformed image, None), or (None, "<error type>: <message>") for a file that cannot be decoded."""
    try:
        with Image.open(path) as image:
            image.load()
            return transform(image), None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        return None, f"{type(err).__name__}: {err}"


class _ImageFiles(Dataset):
    """Image files for embedding; an undecodable file yields its error instead of a tensor."""

    def __init__(self, paths: list[Path], transform: Callable):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return (index, *read_transformed(self.paths[index], self.transform))


def _keep_batch(items):
    return items  # a list of (index, tensor or None, error or None); stacked in embed_files


def embed_files(model: RunModel, paths: list[Path], batch_size: int, num_workers: int = 0,
                progress: bool = True) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Embed photo files in list order: (vectors of the readable ones, their positions, [(position, error)])."""
    from tqdm import tqdm

    loader = DataLoader(_ImageFiles(paths, model.transforms["photo"]), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=_keep_batch)
    vectors, kept, failed = [], [], []
    with batches(loader) as loaded:
        for batch in tqdm(loaded, total=len(loader), desc="embedding photos", unit="batch", disable=not progress,
                          leave=False):
            good = [(i, t) for i, t, err in batch if err is None]
            failed += [(i, err) for i, _, err in batch if err is not None]
            if good:
                vectors.append(embed_batch(model, torch.stack([t for _, t in good]), "photo"))
                kept += [i for i, _ in good]
    dim = int(getattr(model.encoder, "embed_dim", 0))
    return (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)), kept, failed

