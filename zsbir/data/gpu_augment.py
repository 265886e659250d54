"""Augmentation and normalisation on the training device (`data.gpu_augment=true`).

With a few CPU cores, decoding plus PIL augmentation caps the images per second a GPU
can train on. In this mode the loader only decodes, pads and resizes, and hands over
uint8 tensors (4x smaller to copy than float); this module then applies the recipe of
`data.augment` (zsbir/data/augment_recipes.py, where the recipes are described; the CPU
path runs them in zsbir/data/transforms.py) to the whole batch with torch ops on the GPU,
and normalises.

Every sample's random parameters come from a generator seeded by (seed, epoch, list
index, view), like the CPU path, so runs stay reproducible and independent of the
number of workers and ranks. The ops read the same recipe parameters as the CPU path,
with two documented differences: the jitter ops run in a fixed order
(brightness, contrast, saturation, hue) instead of a random one, and the hue shift is a
rotation of the chroma plane in YIQ space rather than a shift in HSV.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from zsbir.data.augment_recipes import Affine, ColourJitter, ResizedCrop, augment_recipe
from zsbir.data.pairs import GPU_AUGMENT_STREAMS, item_seed
from zsbir.models.encoder import NORMALIZATION

# Uniform draws per sample; each has a fixed role, so adding an op never shifts the others.
N_DRAWS = 16
FLIP, AFFINE_P, ANGLE, SHIFT_X, SHIFT_Y, SCALE, JITTER_P, BRIGHT, CONTRAST, SATUR, HUE, GRAY_P, CROP_AREA, \
    CROP_RATIO, CROP_X, CROP_Y = range(N_DRAWS)
RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def uniform_draws(seed: int, epoch: int, indices, stream: int) -> torch.Tensor:
    """B x N_DRAWS uniforms in [0, 1), one seeded generator per sample."""
    rows = [np.random.default_rng(item_seed(seed, epoch, int(i), GPU_AUGMENT_STREAMS + stream)).random(N_DRAWS)
            for i in indices]
    return torch.as_tensor(np.stack(rows), dtype=torch.float32)


def between(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * u


class GPUAugment:
    """`augment(images_uint8, domain, epoch, indices, stream)` -> normalised float images on the same device."""

    def __init__(self, recipe: str, norm: str, seed: int):
        self.recipe = augment_recipe(recipe)
        if norm not in NORMALIZATION:
            raise ValueError(f"model.norm must be one of {sorted(NORMALIZATION)}, got {norm!r}")
        self.seed = seed
        self.mean, self.std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION[norm])

    def __call__(self, images: torch.Tensor, domain: str, epoch: int, indices, stream: int) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"GPU augmentation expects uint8 B x 3 x H x W images, got {images.dtype} {tuple(images.shape)}"
                             " (is data.gpu_augment set for the loader too?)")
        x = images.float().div_(255)
        if self.recipe != augment_recipe("none"):
            draws = uniform_draws(self.seed, epoch, indices.tolist() if torch.is_tensor(indices) else indices,
                                  stream).to(x.device)
            x = self.augment(x, draws, domain)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def augment(self, x: torch.Tensor, u: torch.Tensor, domain: str) -> torch.Tensor:
        recipe = self.recipe
        if recipe.flip:
            x = torch.where((u[:, FLIP] < 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
        if recipe.affine:
            x = random_affine(x, u, recipe.affine, fill=1.0 if domain == "sketch" else 0.0)
        if recipe.jitter:
            x = colour_jitter(x, u, recipe.jitter)
        if recipe.grayscale_p:
            x = random_grayscale(x, u, recipe.grayscale_p)
        if recipe.crop:
            x = random_resized_crop(x, u, recipe.crop)
        return x


def _warp(x: torch.Tensor, theta: torch.Tensor, fill: float) -> torch.Tensor:
    """Resample x with output->input affine maps `theta` (B x 2 x 3, normalised coords), constant fill outside."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def random_affine(x: torch.Tensor, u: torch.Tensor, affine: Affine, fill: float) -> torch.Tensor:
    """RandomApply(RandomAffine(degrees, translate=(shift, shift), scale), p), per sample."""
    angle = torch.deg2rad(between(u[:, ANGLE], -affine.degrees, affine.degrees))
    scale = between(u[:, SCALE], *affine.scale)
    shift = torch.stack([between(u[:, SHIFT_X], -affine.shift, affine.shift),
                         between(u[:, SHIFT_Y], -affine.shift, affine.shift)], dim=1) * 2  # [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    inverse = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # (s R)^-1
    offset = -(inverse @ shift.unsqueeze(-1))
    theta = torch.cat([inverse, offset], dim=2)
    identity = torch.eye(2, 3, device=x.device).expand_as(theta)
    theta = torch.where((u[:, AFFINE_P] < affine.p).view(-1, 1, 1), theta, identity)
    return _warp(x, theta, fill)


def random_resized_crop(x: torch.Tensor, u: torch.Tensor, crop: ResizedCrop) -> torch.Tensor:
    """RandomResizedCrop(scale, ratio) of a square image, per sample."""
    area = between(u[:, CROP_AREA], *crop.scale)
    ratio = torch.exp(between(u[:, CROP_RATIO], math.log(crop.ratio[0]), math.log(crop.ratio[1])))
    width, height = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    centre_x = between(u[:, CROP_X], -1, 1) * (1 - width)
    centre_y = between(u[:, CROP_Y], -1, 1) * (1 - height)
    zero = torch.zeros_like(width)
    theta = torch.stack([torch.stack([width, zero, centre_x], 1), torch.stack([zero, height, centre_y], 1)], 1)
    return _warp(x, theta, 0.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (RGB_TO_YIQ[0].to(x.device).view(1, 3, 1, 1) * x).sum(1, keepdim=True)


def colour_jitter(x: torch.Tensor, u: torch.Tensor, jitter: ColourJitter) -> torch.Tensor:
    """RandomApply(ColorJitter(brightness, contrast, saturation, hue), p), per sample."""
    view = (-1, 1, 1, 1)

    def factor(draw: int, spread: float) -> torch.Tensor:
        return between(u[:, draw], 1 - spread, 1 + spread).view(view)

    jittered = (x * factor(BRIGHT, jitter.brightness)).clamp(0, 1)
    mean = _gray(jittered).mean(dim=(2, 3), keepdim=True)
    jittered = ((jittered - mean) * factor(CONTRAST, jitter.contrast) + mean).clamp(0, 1)
    gray = _gray(jittered)
    jittered = ((jittered - gray) * factor(SATUR, jitter.saturation) + gray).clamp(0, 1)
    jittered = hue_rotate(jittered, between(u[:, HUE], -jitter.hue, jitter.hue) * 2 * math.pi)
    return torch.where((u[:, JITTER_P] < jitter.p).view(view), jittered, x)


def random_grayscale(x: torch.Tensor, u: torch.Tensor, p: float) -> torch.Tensor:
    """RandomGrayscale(p), per sample."""
    return torch.where((u[:, GRAY_P] < p).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)


def hue_rotate(x: torch.Tensor, radians: torch.Tensor) -> torch.Tensor:
    """Rotate each image's chroma (the I/Q plane of YIQ) by its angle."""
    to_yiq = RGB_TO_YIQ.to(x.device)
    cos, sin = torch.cos(radians), torch.sin(radians)
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rotation = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1),
                            torch.stack([zero, sin, cos], 1)], 1)  # B x 3 x 3
    matrix = torch.linalg.inv(to_yiq) @ rotation @ to_yiq
    return torch.einsum("bij,bjhw->bihw", matrix, x).clamp(0, 1)
