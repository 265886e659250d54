"""Save a grid of synthetic-benchmark samples: per category two sketches above two photos.

    python scripts/synthetic_samples.py [--out docs/images/synthetic_samples.png] [--classes 12]
"""
from __future__ import annotations

import argparse
import os

from PIL import Image, ImageDraw

from zsbir.data.filelist import read_class_file, read_filelist
from zsbir.data.synthetic import LISTS, SPLIT_DIR, SyntheticSpec, ensure_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/images/synthetic_samples.png")
    parser.add_argument("--classes", type=int, default=12, help="categories to show (half seen, half unseen)")
    parser.add_argument("--cache", default=os.environ.get("ZSBIR_CACHE", "./.cache/zsbir"))
    parser.add_argument("--scale", type=int, default=2)
    args = parser.parse_args()

    root = ensure_synthetic(args.cache, SyntheticSpec())
    split = root / SPLIT_DIR
    columns = []  # (title, [sketch paths], [photo paths])
    for kind, prefix, classes in (("seen", "train", read_class_file(split / "cname_cid.txt")),
                                  ("unseen", "zero", read_class_file(split / "cname_cid_zero.txt"))):
        sketches = read_filelist(split / LISTS[f"{prefix}_sketch"])
        photos = read_filelist(split / LISTS[f"{prefix}_photo"])
        for label in range(args.classes // 2):
            pick = lambda fl: [p for p, l in zip(fl.paths, fl.labels) if l == label][:2]  # noqa: E731
            columns.append((f"{kind} {label}", pick(sketches), pick(photos)))
    size = Image.open(root / columns[0][1][0]).size[0] * args.scale
    header = 14
    canvas = Image.new("RGB", (size * len(columns), header + 4 * size), "white")
    draw = ImageDraw.Draw(canvas)
    for col, (title, sketches, photos) in enumerate(columns):
        draw.text((col * size + 3, 1), title, fill=(0, 0, 0))
        for row, rel in enumerate(sketches + photos):
            image = Image.open(root / rel).convert("RGB").resize((size, size), Image.NEAREST)
            canvas.paste(image, (col * size, header + row * size))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    canvas.save(args.out)
    print(f"wrote {args.out}: {len(columns)} categories (rows: 2 sketches, 2 photos)")


if __name__ == "__main__":
    main()
