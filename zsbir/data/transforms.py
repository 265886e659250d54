"""Image transforms: square padding (white for sketches), resizing, augmentation, normalisation.

Augmentation runs the recipe of `data.augment` (zsbir/data/augment_recipes.py, where the
recipes are described) with torchvision ops on PIL images.
"""
from __future__ import annotations

from PIL import Image, ImageOps
from torchvision import transforms as T

from zsbir.data.augment_recipes import augment_recipe
from zsbir.models.encoder import NORMALIZATION

WHITE = (255, 255, 255)


class PadToSquare:
    """Pad the shorter side so the image is square, centred, with a fixed fill colour."""

    def __init__(self, fill: tuple[int, int, int] | None):
        self.fill = fill

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if w == h:
            return image
        side = max(w, h)
        fill = self.fill if self.fill is not None else _mean_colour(image)
        return ImageOps.pad(image, (side, side), color=fill, centering=(0.5, 0.5))

    def __repr__(self) -> str:
        return f"PadToSquare(fill={self.fill})"


def _mean_colour(image: Image.Image) -> tuple[int, int, int]:
    small = image.convert("RGB").resize((1, 1), Image.BILINEAR)
    return small.getpixel((0, 0))


def _augmentations(name: str, size: int, domain: str) -> list:
    recipe = augment_recipe(name)
    ops: list = []
    if recipe.flip:
        ops.append(T.RandomHorizontalFlip())
    if affine := recipe.affine:
        fill = WHITE if domain == "sketch" else (0, 0, 0)
        ops.append(T.RandomApply([T.RandomAffine(affine.degrees, translate=(affine.shift, affine.shift),
                                                 scale=affine.scale, fill=fill)], p=affine.p))
    if jitter := recipe.jitter:
        ops.append(T.RandomApply([T.ColorJitter(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)],
                                 p=jitter.p))
    if recipe.grayscale_p:
        ops.append(T.RandomGrayscale(p=recipe.grayscale_p))
    if crop := recipe.crop:
        ops.append(T.RandomResizedCrop(size, scale=crop.scale, ratio=crop.ratio))
    return ops


def build_transform(domain: str, image_size: int, norm: str, augment: str = "none", train: bool = False,
                    photo_pad: bool = True, uint8: bool = False) -> T.Compose:
    """PIL image -> normalised float tensor (3 x S x S).

    Sketches are padded to a square with WHITE; photos with their own mean colour when
    `photo_pad` (else stretched). Augmentation is applied only when `train`. With `uint8`
    the result is the padded, resized uint8 tensor, neither augmented nor normalised
    (`data.gpu_augment`: zsbir/data/gpu_augment.py does both on the device).
    """
    if norm not in NORMALIZATION:
        raise ValueError(f"model.norm must be one of {sorted(NORMALIZATION)}, got {norm!r}")
    mean, std = NORMALIZATION[norm]
    ops = square_resize_ops(domain, image_size, photo_pad)
    if uint8:
        return T.Compose([*ops, T.PILToTensor()])
    if train:
        ops += _augmentations(augment, image_size, domain)
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def square_resize_ops(domain: str, size: int, photo_pad: bool = True) -> list:
    """The deterministic prefix of every transform: RGB, padded to a square, resized to `size`.

    The pre-resized image cache (zsbir/data/imagecache.py) stores exactly this output, so a
    cached image goes through the same remaining steps as a decoded one.
    """
    ops: list = [T.Lambda(_to_rgb)]
    if domain == "sketch":
        ops.append(PadToSquare(WHITE))
    elif photo_pad:
        ops.append(PadToSquare(None))
    ops.append(T.Resize((size, size), antialias=True))
    return ops


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent sketch backgrounds become white paper, not black.
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, WHITE)
        canvas.paste(rgba, mask=rgba.split()[-1])
        return canvas
    return image.convert("RGB")
