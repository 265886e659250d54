"""Benchmarks: `python -m zsbir.bench eval [...]`, `python -m zsbir.bench train model=... [...]`,
`python -m zsbir.bench seeds [overrides] --seeds 0-9` (zsbir/bench_seeds.py: the job over several seeds)
and `python -m zsbir.bench gpu` (zsbir/gpubench/: every GPU goal under one budget).

`eval` times the evaluation engine (`zsbir.eval.metrics.retrieval_metrics`) against the
papers' approach (`zsbir.eval.reference`) on random features with class structure, in
the same run, and prints both metric values, their max abs difference, seconds, the
speed ratio and peak memory. Heavy imports stay inside the functions so that `--help`
is instant.

`train` measures, for each backbone: the training step's images/s on in-memory data
(random tensors already on the device, so only the step is timed) with the trainer's
speed options and, in the same run, as a plain fp32 loop without them, with the ratio;
the real data loader's images/s; and the peak memory of each. On CPU the models are the
shrunk random variants (`model.tiny=true`).

`gpu` is the GPU acceptance run (zsbir/gpubench/, docs/benchmarks.md): every GPU goal in
one budgeted command that writes its reports after each step; `--dry-run` checks it on CPU.
"""
from __future__ import annotations

import argparse
import sys

from zsbir.bench_seeds import add_seeds_parser
from zsbir.bench_tools import (PLAIN_OPTIONS, _max_rss_mib, _memory_after, _memory_before, make_features, time_loader,
                               time_train_step)

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
    add_train_parser(commands)
    add_seeds_parser(commands)
    add_gpu_parser(commands)
    return parser


def add_gpu_parser(commands) -> None:
    p = commands.add_parser("gpu", help="GPU acceptance: every GPU goal in one budgeted run (docs/benchmarks.md)",
                            description="Runs the sections of docs/benchmarks.md 'GPU acceptance' in order, each "
                                        "measurement in its own process under a time cap, and rewrites report.json "
                                        "and report.md in --out after every step.")
    p.add_argument("--out", default="gpu_report", help="report folder (default: gpu_report)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of the sections in seconds, after a few seconds of imports "
                        "(default 470; 100 with --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="the same sections on CPU with tiny sizes (no GPU needed)")
    p.add_argument("--work-dir", default=None,
                   help="scratch folder for the image cache, weight files and logs (default: <tmp>/zsbir-gpubench-*)")
    p.set_defaults(run=bench_gpu)


def bench_gpu(args) -> int:
    from pathlib import Path

    from zsbir.gpubench.plan import run_gpu_bench

    if args.budget_s is not None and args.budget_s <= 0:
        raise SystemExit(f"bench gpu: --budget-s must be positive, got {args.budget_s}")
    command = (f"python -m zsbir.bench gpu --out {args.out}" + (f" --budget-s {args.budget_s:g}" if args.budget_s else "")
               + (" --dry-run" if args.dry_run else ""))
    report = run_gpu_bench(args.out, args.budget_s, args.dry_run, args.work_dir, command)
    out = Path(args.out)
    print(f"bench gpu: {report['seconds']} s; reports {out / 'report.md'} and {out / 'report.json'}")
    for section in report["sections"]:
        print(f"  {section['key']}. {section['title']}: {section['status']}")
        for row in section["goals"]:
            print(f"     {row['goal']}: {row['verdict']}")
    return 0


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


# Speed options of the "fast" variant (the trainer's own settings) and of the plain fp32 loop.
CNN_MODELS = ("small_cnn", "resnet50", "cse_resnet50")


def add_train_parser(commands) -> None:
    p = commands.add_parser(
        "train", help="time the training step (speed options vs plain fp32) and the data loader",
        description="Arguments are key=value: model=a,b (backbones, comma-separated; required), "
                    "batch_size=N, image_size=N, steps=N, warmup=N, loader_batches=N, device=cpu|cuda, "
                    "compile=true|false; any other key=value is a training-config override "
                    "(e.g. data=sketchy data.num_workers=8 data.gpu_augment=true).")
    p.add_argument("settings", nargs="+", metavar="key=value")
    p.set_defaults(run=bench_train)


def parse_train_settings(settings: list[str]) -> tuple[dict, list[str]]:
    import torch

    cuda = torch.cuda.is_available()
    options = {"model": None, "batch_size": 192 if cuda else 16, "image_size": 224 if cuda else 64, "steps": 20 if cuda else 5,
               "warmup": 5 if cuda else 2, "loader_batches": 20 if cuda else 5, "device": "cuda" if cuda else "cpu",
               "compile": "true" if cuda else "false"}
    overrides = []
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise SystemExit(f"bench train: expected key=value, got {setting!r}")
        if key in options:
            options[key] = value
        else:
            overrides.append(setting)
    if not options["model"]:
        raise SystemExit("bench train: give the backbones to time, e.g. model=clip_prompt or model=small_cnn,clip_prompt")
    for key in ("batch_size", "image_size", "steps", "warmup", "loader_batches"):
        options[key] = int(options[key])
    return options, overrides


def bench_train(args) -> int:
    import logging

    options, overrides = parse_train_settings(args.settings)
    logging.getLogger("zsbir").setLevel(logging.WARNING)
    print(f"device={options['device']}, batch_size={options['batch_size']}, image_size={options['image_size']}, "
          f"{options['steps']} timed steps after {options['warmup']} warm-up steps"
          + (" (CPU: shrunk random models, model.tiny=true)" if options["device"] == "cpu" else ""))
    for model in options["model"].split(","):
        report_train_model(model, options, overrides)
    return 0


def report_train_model(model: str, options: dict, overrides: list[str]) -> None:
    base = [f"model={model}", "model.pretrained=null", f"data.batch_size={options['batch_size']}",
            f"data.image_size={options['image_size']}", f"trainer.device={options['device']}", *overrides]
    if options["device"] == "cpu":
        base.append("model.tiny=true")
    fast = [*base, f"trainer.compile={options['compile']}",
            f"trainer.channels_last={'true' if model in CNN_MODELS else 'false'}"]
    rows = {"speed options": time_train_step(fast, options), "plain fp32": time_train_step([*base, *PLAIN_OPTIONS], options)}
    loader = time_loader(base, options)
    print(f"\n{model}")
    print(f"  {'variant':<16}{'images/s':>12}{'peak memory':>36}   settings")
    for name, row in rows.items():
        print(f"  {name:<16}{row['images_per_s']:>12.1f}{row['memory']:>36}   {row['settings']}")
    ratio = rows["speed options"]["images_per_s"] / rows["plain fp32"]["images_per_s"]
    print(f"  speed-up (speed options / plain fp32): {ratio:.2f}x")
    step = rows["speed options"]["images_per_s"]
    print(f"  data pipeline: {loader['images_per_s']:.1f} images/s ({loader['settings']}): "
          f"{'faster' if loader['images_per_s'] > step else 'SLOWER'} than the train step ({loader['images_per_s'] / step:.2f}x)")


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


def time_ours(data, args) -> dict:
    import time

    import torch

    from omegaconf import OmegaConf

    from zsbir.eval.evaluator import Evaluator
    from zsbir.eval.retrieval import Embeddings

    # Scored by the Evaluator the trainer and the eval CLI use (protocol zs, voc metrics).
    eval_cfg = OmegaConf.create({"protocol": "voc", "per_class": False, "chunk_size": args.chunk_size,
                                 **{k: list(v) for k, v in METRIC_ARGS.items()}})
    scorer = Evaluator(None, None, eval_cfg, norm=None, device=torch.device(args.device))
    data = {k: v.to(args.device) for k, v in data.items()}
    embeddings = Embeddings(data["query_emb"], data["query_labels"], data["gallery_emb"], data["gallery_labels"])
    baseline = _memory_before(args.device)
    start = time.perf_counter()
    values = scorer.score(embeddings)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"values": _metrics_only(values), "seconds": seconds, "memory": _memory_after(args.device, baseline)}


def time_reference(data, args, ours) -> dict:
    """The papers' approach on all queries, or on a random subset with time extrapolated."""
    import time

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
