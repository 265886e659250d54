"""The augmentation recipes (`data.augment`), described once; two executors run them.

zsbir/data/transforms.py runs a recipe with torchvision ops on PIL images in the loader;
zsbir/data/gpu_augment.py runs it on uint8 batches on the training device
(`data.gpu_augment=true`). Both read the parameters below, so a recipe is changed or added
here only. Recipes follow the methods' papers (../shared/docs/methods.md):
- `none`: resize only;
- `flip`: horizontal flip;
- `sake`: flip; random affine (scale 0.7-1.3, rotate +-30 deg, shift +-10 px at 224) with p = 0.7;
- `dsn`: `sake` plus ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8 and grayscale with p = 0.2
  (the two-view contrastive recipe of DSN);
- `clip`: flip and a mild random resized crop (scale 0.8-1), as CLIP prompt learners use.
Ops run in the order of the Recipe fields: flip, affine, colour jitter, grayscale, crop.
"""
from __future__ import annotations

from dataclasses import dataclass

from zsbir.choices import AUGMENT_RECIPES


@dataclass(frozen=True)
class Affine:
    """Random rotation, shift and scale, applied with probability `p`; borders filled white for sketches."""

    degrees: float = 30.0  # rotation in [-degrees, degrees]
    shift: float = 10 / 224  # largest shift as a fraction of the side (SAKE's +-10 px at 224)
    scale: tuple[float, float] = (0.7, 1.3)
    p: float = 0.7


@dataclass(frozen=True)
class ColourJitter:
    """Brightness, contrast and saturation factors in [1 - x, 1 + x], hue shift in [-hue, hue], with probability `p`."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    p: float = 0.8


@dataclass(frozen=True)
class ResizedCrop:
    """A crop of `scale` of the area with aspect `ratio`, resized back to the input size."""

    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (0.9, 1.1)


@dataclass(frozen=True)
class Recipe:
    flip: bool = False
    affine: Affine | None = None
    jitter: ColourJitter | None = None
    grayscale_p: float = 0.0
    crop: ResizedCrop | None = None


RECIPES = {
    "none": Recipe(),
    "flip": Recipe(flip=True),
    "sake": Recipe(flip=True, affine=Affine()),
    "dsn": Recipe(flip=True, affine=Affine(), jitter=ColourJitter(), grayscale_p=0.2),
    "clip": Recipe(flip=True, crop=ResizedCrop()),
}
assert tuple(RECIPES) == AUGMENT_RECIPES, "zsbir.choices.AUGMENT_RECIPES lists the recipe names for the schema"


def augment_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"data.augment must be one of {AUGMENT_RECIPES}, got {name!r}")
    return RECIPES[name]
