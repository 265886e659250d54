"""Embedding throughput of the frozen baselines' towers (experiment=frozen) on this machine.

    python scripts/frozen_throughput.py [--images 64] [--batch 32] [--threads 2] [--device cpu]

Builds each model of configs/model/frozen_*.yaml at 224 px with random weights (the cost does
not depend on the weights; no download), embeds `--images` random images in batches, and prints
images/s and the time one evaluation of each benchmark's test split (queries + gallery, counts
from configs/data/) would take at that rate. docs/benchmarks.md, "Frozen baselines".
"""
from __future__ import annotations

import argparse
import time

import torch
from omegaconf import OmegaConf

from zsbir._paths import config_dir
from zsbir.models.frozen import FrozenEncoder

MODELS = ("frozen_clip_b32", "frozen_clip_b16", "frozen_siglip_b16", "frozen_dinov2_b14")
BENCHMARKS = ("sketchy", "sketchy_split2", "tuberlin", "quickdraw")


def test_images(dataset: str) -> int:
    counts = OmegaConf.load(f"{config_dir()}/data/{dataset}.yaml").counts
    return int(counts.zero_sketch) + int(counts.zero_photo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = {name: test_images(name) for name in BENCHMARKS}
    print(f"device {args.device}, {args.threads} threads, batch {args.batch}, fp32, 224 px")
    print("model                 images/s  " + "  ".join(f"{name} ({n:,})" for name, n in sizes.items()))
    for model in MODELS:
        cfg = OmegaConf.load(f"{config_dir()}/model/{model}.yaml")
        encoder = FrozenEncoder(cfg.library, cfg.arch, None, norm=cfg.norm, image_size=224).to(args.device)
        images = torch.randn(args.batch, 3, 224, 224, device=args.device)
        with torch.no_grad():
            encoder(images[:2], "photo")  # warm-up
            start, done = time.perf_counter(), 0
            while done < args.images:
                encoder(images, "photo")
                done += len(images)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
        rate = done / (time.perf_counter() - start)
        costs = "  ".join(f"{n / rate / 60:>{len(name) + len(f'{n:,}') + 3}.1f}" for name, n in sizes.items())
        print(f"{model:<20} {rate:>9.1f}  {costs}   (minutes)")


if __name__ == "__main__":
    main()
