"""Search a run's photo index with a sketch:
`python -m zsbir.search run_dir=<run> <sketch.png> [--top 10] [--json] [--grid out.png]`.

`index=<name>` picks one of the run's indexes (default: the unseen-class gallery's, built
on first use), `ckpt=` and `device=` as in `zsbir.eval`. `--class <name>` frames the grid's
photos green / red by whether they are of that class (otherwise light grey). `--rerank N`
re-orders the top N by the model's relation network (zsbir/search/rerank.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from zsbir.errors import ZsbirError, run_cli

log = logging.getLogger("zsbir.search")

SETTINGS = ("run_dir", "index", "ckpt", "device")


class SearchUsageError(ZsbirError):
    """A bad command line or sketch file; the message names the fix."""


def split_settings(tokens: list[str]) -> tuple[dict[str, str], list[str]]:
    """`key=value` tokens (run_dir=..., index=..., ckpt=..., device=...) apart from sketch paths."""
    settings, paths = {}, []
    for token in tokens:
        key, eq, value = token.partition("=")
        if eq and key in SETTINGS:
            settings[key] = value
        elif eq and not Path(token).exists() and "/" not in key:
            raise SearchUsageError(f"unknown setting {key!r}; known: {', '.join(f'{k}=' for k in SETTINGS)}")
        else:
            paths.append(token)
    return settings, paths


def read_sketch(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise SearchUsageError(f"sketch {path} does not exist; pass the path of a sketch image (PNG, JPEG)") from None
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise SearchUsageError(f"cannot read sketch {path} ({err}); pass a PNG or JPEG image") from None


def search_sketch(model, store, sketch: Image.Image, top: int,
                  rerank: int = 0) -> tuple[list[dict], dict[str, float], dict]:
    """(ranked photos, {"encode_ms", "search_ms"[, "rerank_ms" = "rerank_photos_ms" + "rerank_pairs_ms"]},
    re-ranking facts) for one sketch.

    `rerank` N > 0: the index's top N are re-ordered by the model's pair scorer
    (zsbir/search/rerank.py) and the first `top` of that ranking are returned; the facts say
    {"applied": True, "top_n", "photos_encoded", "pairs_scored"}, else {"applied": False}.
    """
    started = time.perf_counter()
    if rerank:
        from zsbir.search.rerank import check_rerankable, rerank as rerank_shortlist

        check_rerankable(model)
        vector, sequence = model.encode_sketch_with_sequence(sketch)
    else:
        vector = model.encode_sketch(sketch)
    encoded = time.perf_counter()
    results = store.search(vector, max(top, rerank))
    done = time.perf_counter()
    timing = {"encode_ms": (encoded - started) * 1e3, "search_ms": (done - encoded) * 1e3}
    if not rerank:
        return results, timing, {"applied": False}
    results, facts = rerank_shortlist(model, store, sequence, results, rerank)
    timing.update(rerank_photos_ms=facts.pop("encode_ms"), rerank_pairs_ms=facts.pop("pair_ms"))
    timing["rerank_ms"] = timing["rerank_photos_ms"] + timing["rerank_pairs_ms"]
    return results[:top], timing, {"applied": True, "top_n": facts["photos_encoded"], **facts}


def write_grid(sketch: Image.Image, results: list[dict], out: Path, caption: str, query_class: str | None = None,
               tile: int = 96) -> Path:
    """The evaluation grids' layout: the sketch, then the ranked photos."""
    from zsbir.eval.visualize import draw_grid

    photos = [Image.open(r["path"]) for r in results]
    relevant = [None if query_class is None else r["class"] == query_class for r in results]
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_grid(sketch, photos, relevant, tile, caption=caption).save(out)
    return out


def format_results(sketch: str, store, results: list[dict], timing: dict, rerank: dict) -> str:
    reranked = (f"; top {rerank['top_n']} re-ranked by the relation network in {timing['rerank_ms']:.0f} ms"
                if rerank["applied"] else "")
    lines = [f"{sketch}: top {len(results)} of {len(store)} photos (index {store.folder.name}, {store.meta['kind']}; "
             f"sketch encoded in {timing['encode_ms']:.1f} ms, searched in {timing['search_ms']:.2f} ms{reranked})",
             f"{'rank':>4}  {'score':>7}  " + (f"{'relation':>8}  {'index':>5}  " if rerank["applied"] else "")
             + f"{'class':<20}  photo"]
    for r in results:
        pair = ""
        if rerank["applied"]:  # relation score (sigmoid of the logit; '-' after the shortlist), cosine rank
            pair = (f"{r['relation_score']:>8.4f}" if r["relation_logit"] is not None else f"{'-':>8}") \
                + f"  {r['index_rank']:>5}  "
        lines.append(f"{r['rank']:>4}  {r['score']:>7.4f}  {pair}{str(r['class'] or '-'):<20}  {r['path']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zsbir.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("args", nargs="+", help="run_dir=<run> [index=<name>] [ckpt=best] [device=cpu] <sketch> ...")
    parser.add_argument("--top", type=int, default=10, help="photos to show per sketch (default 10)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--grid", type=Path, help="write a grid PNG (one sketch: this file; several: <stem>-<n>.png)")
    parser.add_argument("--class", dest="query_class", help="the sketch's class, to frame the grid's photos green/red")
    parser.add_argument("--rerank", type=int, default=0, metavar="N",
                        help="re-order the index's top N by the model's pair scorer (relation network, "
                             "experiment=zse_sbir): N photo encodings + N pair passes per sketch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stderr)
    return run_cli(lambda: search(args), log)


def search(args: argparse.Namespace) -> None:
    """Search the run's index for each sketch; print a table or JSON, write grids when asked."""
    settings, sketches = split_settings(args.args)
    if "run_dir" not in settings:
        raise SearchUsageError("no run directory given: python -m zsbir.search run_dir=<run> <sketch.png>")
    if not sketches:
        raise SearchUsageError("no sketch given: python -m zsbir.search run_dir=<run> <sketch.png>")
    if args.top < 1:
        raise SearchUsageError(f"--top {args.top}: ask for at least 1 photo")
    if args.rerank < 0:
        raise SearchUsageError(f"--rerank {args.rerank}: give the number of top photos to re-rank (0: off)")
    from zsbir.search.build import find_index
    from zsbir.search.model import load_run_model

    images = [read_sketch(s) for s in sketches]
    model = load_run_model(settings["run_dir"], settings.get("ckpt", "best"), settings.get("device", "cpu"))
    if args.rerank:
        from zsbir.search.rerank import check_rerankable

        check_rerankable(model)
    store = find_index(model, settings.get("index"))
    report = []
    for n, (path, image) in enumerate(zip(sketches, images)):
        results, timing, rerank = search_sketch(model, store, image, args.top, args.rerank)
        entry = {"sketch": path, "index": str(store.folder), "rerank": rerank, "results": results, "timing_ms": timing}
        if args.grid:
            out = args.grid if len(sketches) == 1 else args.grid.with_name(f"{args.grid.stem}-{n}{args.grid.suffix}")
            entry["grid"] = str(write_grid(image, results, out, f"query: {Path(path).name}", args.query_class))
        report.append(entry)
        if not args.json:
            print(format_results(path, store, results, timing, rerank))
    if args.json:
        print(json.dumps(report if len(report) > 1 else report[0], indent=1))


if __name__ == "__main__":
    sys.exit(main())
