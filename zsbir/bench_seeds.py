"""`python -m zsbir.bench seeds [overrides] --seeds 0-9`: the same job over several seeds.

Each seed is one real `python -m zsbir.train seed=S hydra.run.dir=<out>/seed_S [overrides]`
in its own process (a fresh interpreter: no state carried between seeds, and the wall time
is what a user waits). `--jobs 2` runs two seeds at a time. It prints, per seed, the unseen
mAP@all of best.pt and the wall time, then the mean ± sample std over the seeds and the
worst seed. A seed whose run directory already holds metrics.json is read, not re-run
(`--out` of an earlier call continues it).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


class SeedsError(SystemExit):
    """A bad `bench seeds` argument, or a run that failed; the message names it."""


def add_seeds_parser(commands) -> None:
    p = commands.add_parser(
        "seeds", help="run the training job for several seeds: unseen mAP@all, wall time, mean ± std",
        description="Runs `python -m zsbir.train seed=S [overrides]` once per seed (a process each) and prints each "
                    "seed's unseen mAP@all and wall time, the mean ± sample std and the worst seed. Without overrides "
                    "it is the README's default job.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training-config overrides (not seed=)")
    p.add_argument("--seeds", default="0-9", help="seeds: 0-9, 0,3,7 or a mix (default 0-9)")
    p.add_argument("--jobs", type=int, default=1, choices=[1, 2],
                   help="seeds trained at the same time (default 1; wall times then include the other job's load)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder of the runs (default outputs/bench/seeds/<time>); runs already finished there are reused")
    p.add_argument("--metric", default="map_all", help="unseen-class metric to summarise (default map_all)")
    p.set_defaults(run=bench_seeds)


def parse_seeds(text: str) -> list[int]:
    """'0-9' -> [0..9]; '0,3,7' -> [0, 3, 7]; '0-2,7' -> [0, 1, 2, 7] (order kept, duplicates dropped)."""
    seeds: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            values = range(int(first), int(last) + 1) if dash else [int(first)]
        except ValueError:
            raise SeedsError(f"bench seeds: --seeds {text!r} is not a list of seeds; write e.g. 0-9 or 0,3,7") from None
        if dash and int(last) < int(first):
            raise SeedsError(f"bench seeds: --seeds range {part!r} runs backwards; write it low-high, e.g. 0-9")
        seeds += [s for s in values if s not in seeds]
    return seeds


def train_command(seed: int, run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "zsbir.train", f"seed={seed}", f"hydra.run.dir={run_dir}",
            "trainer.progress_bar=false", *overrides]


def run_seed(seed: int, out: Path, overrides: list[str], metric: str) -> dict:
    """Train one seed (unless its metrics.json exists) and return its row."""
    run_dir = out / f"seed_{seed}"
    metrics_file = run_dir / "metrics.json"
    reused = metrics_file.exists()
    wall = None
    if not reused:
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with open(run_dir.parent / f"seed_{seed}.log", "w") as log:
            code = subprocess.run(train_command(seed, run_dir, overrides), stdout=log, stderr=subprocess.STDOUT,
                                  env=os.environ.copy()).returncode
        wall = time.monotonic() - start
        if code != 0 or not metrics_file.exists():
            raise SeedsError(f"bench seeds: seed {seed} failed (exit {code}); its log: {run_dir.parent / f'seed_{seed}.log'}")
    result = json.loads(metrics_file.read_text())
    if metric not in result["test"]:
        raise SeedsError(f"bench seeds: --metric {metric!r} is not among the run's metrics {sorted(result['test'])}")
    return {"seed": seed, "value": float(result["test"][metric]), "before": (result.get("test_before_training") or {}).get(metric),
            "process_s": wall, "train_s": float(result["wall_time_s"]), "best_step": result["best_val"]["step"],
            "reused": reused}


def summarise(rows: list[dict], metric: str) -> str:
    """The per-seed table, mean ± sample std and the worst seed, as printed."""
    lines = [f"{'seed':>6}{'unseen ' + metric:>20}{'untrained':>12}{'wall s':>10}{'train s':>10}{'best step':>11}"]
    for row in rows:
        before = "" if row["before"] is None else f"{row['before']:.4f}"
        wall = "reused" if row["process_s"] is None else f"{row['process_s']:.0f}"
        lines.append(f"{row['seed']:>6}{row['value']:>20.4f}{before:>12}{wall:>10}{row['train_s']:>10.0f}"
                     f"{row['best_step']:>11}")
    values = [row["value"] for row in rows]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    worst = min(rows, key=lambda row: row["value"])
    walls = [row["process_s"] for row in rows if row["process_s"] is not None]
    lines.append(f"{metric}: mean {statistics.mean(values):.4f} ± {std:.4f} (sample std, n={len(values)}); "
                 f"worst seed {worst['seed']}: {worst['value']:.4f}; best {max(values):.4f}")
    if walls:
        lines.append(f"wall time per run: mean {statistics.mean(walls):.0f} s, max {max(walls):.0f} s "
                     "(process start to exit: data, evaluations and training)")
    return "\n".join(lines)


def bench_seeds(args) -> int:
    seeds = parse_seeds(args.seeds)
    if any(o.split("=", 1)[0].lstrip("+~") in ("seed", "hydra.run.dir") for o in args.overrides):
        raise SeedsError("bench seeds: seed= and hydra.run.dir= are set per run; use --seeds and --out instead")
    out = args.out or Path("outputs/bench/seeds") / time.strftime("%Y-%m-%d_%H-%M-%S")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(seeds)} seeds {seeds}, {args.jobs} at a time; runs in {out}; overrides: {args.overrides or 'none'}",
          flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda seed: _announce(run_seed(seed, out, args.overrides, args.metric)), seeds))
    summary = summarise(rows, args.metric)
    print(summary)
    (out / "summary.txt").write_text(summary + "\n")
    return 0


def _announce(row: dict) -> dict:
    wall = "reused" if row["process_s"] is None else f"{row['process_s']:.0f} s"
    print(f"seed {row['seed']}: {row['value']:.4f} ({wall})", flush=True)
    return row
