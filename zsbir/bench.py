"""Benchmarks: `python -m zsbir.bench eval [...]`.

`eval` times the evaluation engine (`zsbir.eval.metrics.retrieval_metrics`) against the
papers' approach (`zsbir.eval.reference`) on random features with class structure, in
the same run, and prints both metric values, their max abs difference, seconds, the
speed ratio and peak memory. Heavy imports stay inside the functions so that `--help`
is instant.
"""
from __future__ import annotations

import argparse
import sys

# Split sizes of docs/metrics.md ("Scale"); d = 512 and 30 unseen classes for both.
PRESETS = {
    "tuberlin": {"queries": 2400, "gallery": 27989, "dim": 512, "classes": 30},
    "quickdraw": {"queries": 92291, "gallery": 54151, "dim": 512, "classes": 30},
}
METRIC_ARGS = {"map_at": (200,), "prec_at": (100, 200)}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m zsbir.bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(commands)
    return parser


def add_eval_parser(commands) -> None:
    p = commands.add_parser("eval", help="time retrieval metrics: ours vs the papers' per-query loops")
    p.add_argument("--preset", choices=sorted(PRESETS), help="split sizes; explicit flags override")
    p.add_argument("--queries", type=int, help="number of queries (default 2400)")
    p.add_argument("--gallery", type=int, help="gallery size (default 27989)")
    p.add_argument("--dim", type=int, help="embedding dimension (default 512)")
    p.add_argument("--classes", type=int, help="number of classes (default 30)")
    p.add_argument("--noise", type=float, default=3.5, help="within-class noise / centre scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=None, help="queries per chunk (default: memory budget)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the papers' approach (default on)")
    p.add_argument("--reference-queries", type=int, default=0,
                   help="run the reference on this many random queries only and extrapolate its "
                        "time to all queries (0 = all queries)")
    p.set_defaults(run=bench_eval)


def bench_eval(args) -> int:
    sizes = _resolve_sizes(args)
    print(f"problem: {sizes['queries']} queries x {sizes['gallery']} gallery, d={sizes['dim']}, "
          f"{sizes['classes']} classes, device={args.device}, seed={args.seed}")
    data = make_features(**sizes, noise=args.noise, seed=args.seed)
    ours = time_ours(data, args)
    rows = [("ours", ours)]
    if args.reference:
        rows.append(("papers", time_reference(data, args, ours)))
    else:
        print("reference: not run (--no-reference)")
    print_table(rows)
    return 0


def _resolve_sizes(args) -> dict[str, int]:
    sizes = dict(PRESETS[args.preset] if args.preset else PRESETS["tuberlin"])
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    return sizes


def make_features(queries: int, gallery: int, dim: int, classes: int, noise: float, seed: int):
    """Seeded float32 features: a random centre per class plus Gaussian noise.

    Queries are spread evenly over the classes (as the split's sketches are); gallery
    labels are drawn at random, so class sizes vary a little.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen)
    query_labels = torch.arange(queries) % classes
    gallery_labels = torch.randint(0, classes, (gallery,), generator=gen)
    query_emb = centres[query_labels] + noise * torch.randn(queries, dim, generator=gen)
    gallery_emb = centres[gallery_labels] + noise * torch.randn(gallery, dim, generator=gen)
    return {"query_emb": query_emb, "query_labels": query_labels,
            "gallery_emb": gallery_emb, "gallery_labels": gallery_labels}


def time_ours(data, args) -> dict:
    import time

    import torch

    from zsbir.eval.metrics import retrieval_metrics

    data = {k: v.to(args.device) for k, v in data.items()}
    baseline = _memory_before(args.device)
    start = time.perf_counter()
    values = retrieval_metrics(**data, chunk_size=args.chunk_size, **METRIC_ARGS)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"values": _metrics_only(values), "seconds": seconds, "memory": _memory_after(args.device, baseline)}


def time_reference(data, args, ours) -> dict:
    """The papers' approach on all queries, or on a random subset with time extrapolated."""
    import time

    import numpy as np
    import torch

    from zsbir.eval import reference
    from zsbir.eval.metrics import retrieval_metrics

    n_queries = data["query_emb"].shape[0]
    subset = args.reference_queries
    if 0 < subset < n_queries:
        pick = torch.randperm(n_queries, generator=torch.Generator().manual_seed(args.seed))[:subset]
        print(f"reference: run on {subset} of {n_queries} random queries; its time is "
              f"extrapolated x{n_queries / subset:.1f}; values compared with ours on the same {subset}")
        # Ours on the very same queries, for the value comparison only (not timed).
        ours_values = retrieval_metrics(data["query_emb"][pick].to(args.device), data["query_labels"][pick],
                                        data["gallery_emb"].to(args.device), data["gallery_labels"],
                                        chunk_size=args.chunk_size, **METRIC_ARGS)
        ours["values_on_subset"] = _metrics_only(ours_values)
    else:
        pick, subset = torch.arange(n_queries), n_queries
        print("reference: run on all queries (measured, not extrapolated)")
    start = time.perf_counter()
    scores = reference.cosine_scores(data["query_emb"][pick], data["gallery_emb"])
    values = reference.reference_metrics(scores, data["query_labels"][pick].numpy(),
                                         data["gallery_labels"].numpy(), **METRIC_ARGS)
    seconds = (time.perf_counter() - start) * n_queries / subset
    del scores
    return {"values": values, "seconds": seconds, "extrapolated": subset < n_queries,
            "memory": f"{_max_rss_mib():.0f} MiB process peak RSS"}


def _metrics_only(values: dict) -> dict[str, float]:
    return {k: v for k, v in values.items() if not k.startswith("n_")}


def _memory_before(device: str):
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return _current_rss_mib()


def _memory_after(device: str, baseline) -> str:
    import torch

    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        return f"{peak:.0f} MiB CUDA peak allocated ({peak - baseline / 2**20:.0f} MiB above inputs)"
    peak = _max_rss_mib()
    return f"{peak:.0f} MiB process peak RSS ({peak - baseline:.0f} MiB above the {baseline:.0f} MiB before)"


def _current_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _max_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def print_table(rows) -> None:
    ours = rows[0][1]
    names = list(ours["values"])
    header = f"{'':<26}" + "".join(f"{n:>12}" for n in names) + f"{'seconds':>12}"
    print(header)
    for label, row in rows:
        seconds = f"{row['seconds']:.2f}" + ("*" if row.get("extrapolated") else "")
        print(f"{label:<26}" + "".join(f"{row['values'][n]:>12.6f}" for n in names) + f"{seconds:>12}")
    if "values_on_subset" in ours:
        print(f"{'ours on reference subset':<26}" + "".join(f"{ours['values_on_subset'][n]:>12.6f}" for n in names))
    if len(rows) > 1:
        papers = rows[1][1]
        compared = ours.get("values_on_subset", ours["values"])
        diff = max(abs(compared[n] - papers["values"][n]) for n in names)
        print(f"max abs difference: {diff:.2e}")
        print(f"speed-up (papers / ours): {papers['seconds'] / ours['seconds']:.1f}x"
              + ("  (* extrapolated from a subset)" if papers.get("extrapolated") else ""))
    print(f"peak memory, ours: {ours['memory']}")
    if len(rows) > 1:
        print(f"peak memory after the papers' approach: {rows[1][1]['memory']}")


if __name__ == "__main__":
    sys.exit(main())
