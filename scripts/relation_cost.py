"""What ZSE-SBIR's relation-network evaluation (eval.rerank) costs on this machine.

Builds the real-size model (ViT-B/16 at 224 px, random weights: the cost does not depend
on them), times the pair network (cross-attention + relation network) on random token
sequences through the same PairScorer that eval.rerank uses, and the encoder's pass per
image; then extrapolates to each benchmark's test split (query and gallery counts from
configs/data/*.yaml): exhaustive mode (every query x photo pair, the paper's protocol)
and top-N mode. Prints a Markdown table (docs/benchmarks.md).

    python scripts/relation_cost.py [--pairs 256] [--pair-batch 32] [--images 32] [--top-n 100] [--device cpu]
                                   [--threads N]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from zsbir.eval.rerank import PairScorer
from zsbir.models.zse import ZSEEncoder

DATASETS = ("sketchy", "sketchy_split2", "tuberlin", "quickdraw")


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: all threads) of fn()."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def human(seconds: float) -> str:
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=256, help="pairs timed (after one warm-up batch)")
    parser.add_argument("--pair-batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=32, help="images timed through the encoder")
    parser.add_argument("--top-n", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = ZSEEncoder(pretrained=None, image_size=224).to(device).eval()
    n_tokens = 1 + model.relation.grid ** 2
    sketches = torch.randn(8, n_tokens, model.width).half()
    photos = torch.randn(8, n_tokens, model.width).half()
    scorer = PairScorer(model, sketches, photos, device, args.pair_batch)
    rows = torch.randint(0, 8, (args.pairs,))
    scorer(rows[:args.pair_batch], rows[:args.pair_batch])  # warm-up
    pair_wall, pair_cpu = (t / args.pairs for t in timed(lambda: scorer(rows, rows.flip(0)), device))
    images = torch.randn(args.images, 3, 224, 224, device=device)
    with torch.no_grad():
        model(images[:2], "photo")  # warm-up
        image_wall, image_cpu = (t / args.images for t in
                                 timed(lambda: [model(batch, "photo") for batch in images.split(16)], device))
    # A loaded machine stretches the wall time; the CPU time (all threads) / threads is the
    # wall time the same work takes when the threads have their cores to themselves.
    threads = torch.get_num_threads()
    pair_s, image_s = (pair_wall, image_wall) if device.type == "cuda" else (pair_cpu / threads, image_cpu / threads)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device}, {threads} threads, load average {load:.2f} at the end; fp32; pair batch {args.pair_batch}")
    print(f"pair network: {pair_wall * 1000:.1f} s wall, {pair_cpu * 1000:.1f} CPU-s per 1,000 pairs "
          f"({args.pairs} pairs timed); encoder: {image_wall * 1000:.0f} ms wall, {image_cpu * 1000:.0f} CPU-ms "
          f"per image ({args.images} images timed)")
    print(f"extrapolated with {pair_s * 1000:.1f} s per 1,000 pairs and {image_s * 1000:.0f} ms per image "
          f"({'wall' if device.type == 'cuda' else f'CPU time / {threads} threads'}):\n")
    print(f"| benchmark | queries | gallery | exhaustive pairs | exhaustive | top-{args.top_n} pairs | top-{args.top_n} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    data_dir = Path(__file__).resolve().parents[1] / "configs" / "data"
    for name in DATASETS:
        counts = OmegaConf.load(data_dir / f"{name}.yaml").counts
        queries, gallery = int(counts.zero_sketch), int(counts.zero_photo)
        tokens_s = (queries + gallery) * image_s
        full, short = queries * gallery, queries * min(args.top_n, gallery)
        print(f"| {name} | {queries:,} | {gallery:,} | {full:,} | {human(full * pair_s + tokens_s)} | {short:,} "
              f"| {human(short * pair_s + tokens_s)} |")


if __name__ == "__main__":
    main()
