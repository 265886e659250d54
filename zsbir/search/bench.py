"""Search speed figures for docs/benchmarks.md: `python -m zsbir.search.bench <what> ...`.

- `vectors --n 1000000 --dim 512`: random unit vectors; per-query search time (p50, p95)
  of the exact index and of an approximate one, with its recall@10 against exact search.
- `run run_dir=<run>`: a trained run's unseen-class gallery: index build throughput,
  per-sketch encoding and search time, and the mean P@10 of 20 test sketches searched
  through the index beside the evaluator's P@10 for the same sketches.
- `rerank run_dir=<run> --n 10 50`: a pair model's (experiment=zse_sbir) `--rerank N` per
  query: sketch pass, index search and re-ranking (N photo encodings + N pair passes)
  times (p50, p95) for each N.
- `app run_dir=<run>`: the web app in headless Chromium: click-to-results round trip
  (p50, p95) of drawn sketches; `--screenshot <png>` keeps a picture of the page.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3),
            "n": len(ms)}


def random_unit(n: int, dim: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """(n x dim) float32 unit rows, generated in chunks so memory stays at the result's size."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        out[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def time_queries(index, queries: np.ndarray, k: int = 10) -> tuple[dict, np.ndarray]:
    """Per-query search time, one query at a time as the app searches; also the ids found."""
    from zsbir.search.store import ranked

    seconds, found = [], []
    for q in queries:
        started = time.perf_counter()
        _, ids = ranked(index, q[None], k)
        seconds.append(time.perf_counter() - started)
        found.append(ids[0])
    return percentiles(seconds), np.stack(found)


def built_index(faiss, params, gallery: np.ndarray, index_file: str | None, kind: str):
    """(index, build seconds). With --index-file the graph / lists built once are written there and
    read back by later runs (a 1M x 512 HNSW graph takes most of an hour to build on 2 cores), so
    the query timings can be re-taken on an idle machine; the first build's seconds are kept beside it."""
    from pathlib import Path

    from zsbir.search.store import make_index

    path = Path(f"{index_file}.{kind}") if index_file else None
    built_with = {"kind": params.kind, "M": params.hnsw_m, "efConstruction": params.ef_construction,
                  "nlist": params.nlist, "pq_m": params.pq_m, "seed": params.seed, "n": len(gallery),
                  "dim": int(gallery.shape[1])}
    if path is not None and path.is_file():
        stored = json.loads(path.with_suffix(path.suffix + ".json").read_text())
        if stored["built_with"] != built_with:
            raise SystemExit(f"{path} was built with {stored['built_with']}, not {built_with}: "
                             "delete it or pass another --index-file")
        return faiss.read_index(str(path)), stored["build_s"]
    started = time.perf_counter()
    index = make_index(params, gallery)
    build = time.perf_counter() - started
    if path is not None:
        faiss.write_index(index, str(path))
        path.with_suffix(path.suffix + ".json").write_text(json.dumps({"built_with": built_with, "build_s": build}))
    return index, build


def bench_vectors(args) -> dict:
    from zsbir.search.store import IndexParams, import_faiss

    faiss = import_faiss()
    gallery = random_unit(args.n, args.dim, seed=0)
    queries = random_unit(args.queries, args.dim, seed=1)
    report = {"n": args.n, "dim": args.dim, "queries": args.queries, "threads": faiss.omp_get_max_threads()}
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(gallery)
    report["exact"], truth = time_queries(exact, queries)
    print(json.dumps({"exact": report["exact"]}), flush=True)
    del exact
    for kind in args.kinds:
        params = IndexParams(kind, hnsw_m=args.hnsw_m, ef_search=args.ef_search[0], nlist=args.nlist,
                             nprobe=args.nprobe[0], ef_construction=args.ef_construction, pq_m=args.pq_m,
                             k_factor=args.k_factor[0])
        index, build = built_index(faiss, params, gallery, args.index_file, kind)
        if kind == "ivf":
            knob, sweep, built = "nprobe", args.nprobe, {"nlist": index.nlist}
        elif kind == "hnsw":
            knob, sweep, built = "efSearch", args.ef_search, {"M": args.hnsw_m, "efConstruction": args.ef_construction}
        else:
            knob, sweep, built = "k_factor", args.k_factor, {"pq_m": params.sub_quantisers(args.dim), "bits": 4}
        for value in sweep:
            if kind == "hnsw":
                index.hnsw.efSearch = value
            else:  # IndexIVFFlat.nprobe, IndexRefineFlat.k_factor
                setattr(index, knob, value)
            timing, ids = time_queries(index, queries)
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)]))
            setting = f"{knob}={value}"
            report[f"{kind} {setting}"] = {**timing, "recall@10": round(recall, 4), "build_s": round(build, 1), **built}
            print(json.dumps({f"{kind} {setting}": report[f"{kind} {setting}"]}), flush=True)
        del index
    return report


def twenty_sketches(model, seed: int = 0):
    from zsbir.data.datamodule import load_split

    data = load_split(model.run_cfg.data, seed=int(model.run_cfg.seed))
    picked = np.random.default_rng(seed).choice(len(data.zero_sketch), min(20, len(data.zero_sketch)), replace=False)
    return data, picked


def bench_run(args) -> dict:
    import torch
    from PIL import Image

    from zsbir.data.datamodule import eval_loader
    from zsbir.eval.metrics import retrieval_metrics
    from zsbir.eval.retrieval import embed
    from zsbir.search.build import build_index
    from zsbir.search.model import load_run_model

    torch.set_num_threads(args.threads)
    model = load_run_model(args.run_dir)
    store = build_index(model, rebuild=True, progress=False)
    report = {"gallery": len(store), "build": store.meta["last_update"], "threads": args.threads}
    data, picked = twenty_sketches(model)
    sketches = [Image.open(data.root / p).convert("RGB") for p in data.zero_sketch.paths]
    model.encode_sketch(sketches[0])  # the first forward pass allocates; not a query's cost
    encode, search = [], []
    for _ in range(args.repeats):
        for sketch in sketches:
            started = time.perf_counter()
            vector = model.encode_sketch(sketch)
            encoded = time.perf_counter()
            store.search(vector, 10)
            encode.append(encoded - started)
            search.append(time.perf_counter() - encoded)
    report["encode_sketch"], report["search"] = percentiles(encode), percentiles(search)

    precisions = []
    for q in picked:
        query_class = data.unseen_classes[data.zero_sketch.labels[q]]
        results = store.search(model.encode_sketch(sketches[q]), 10)
        precisions.append(np.mean([r["class"] == query_class for r in results]))
    norm = model.encoder.norm
    queries, query_labels = embed(model.encoder, eval_loader(data, data.zero_sketch, "sketch", model.run_cfg.data, norm),
                                  "sketch", model.device)
    gallery, gallery_labels = embed(model.encoder, eval_loader(data, data.zero_photo, "photo", model.run_cfg.data, norm),
                                    "photo", model.device)
    evaluator = retrieval_metrics(queries[picked], query_labels[picked], gallery, gallery_labels, prec_at=(10,))
    report["p_at_10_20_sketches"] = {"search": float(np.mean(precisions)), "evaluator": evaluator["prec_10"],
                                     "sketches": picked.tolist()}
    return report


def bench_rerank(args) -> dict:
    import torch
    from PIL import Image

    from zsbir.search.__main__ import search_sketch
    from zsbir.search.build import find_index
    from zsbir.search.model import load_run_model
    from zsbir.search.rerank import check_rerankable

    torch.set_num_threads(args.threads)
    model = load_run_model(args.run_dir)
    check_rerankable(model)
    store = find_index(model)
    data, picked = twenty_sketches(model)
    sketches = [Image.open(data.root / data.zero_sketch.paths[q]).convert("RGB") for q in picked[:args.sketches]]
    search_sketch(model, store, sketches[0], 1, rerank=1)  # the first forward passes allocate; not a query's cost
    report = {"gallery": len(store), "threads": args.threads, "sketches": len(sketches),
              "model": f"{model.run_cfg.model.arch}{' (tiny)' if model.run_cfg.model.get('tiny') else ''}",
              "image_size": model.image_size}
    for n in args.n:
        times = {"encode_sketch": [], "search": [], "rerank": [], "rerank_photos": [], "rerank_pairs": [], "total": []}
        for sketch in sketches:
            started = time.perf_counter()
            _, timing, facts = search_sketch(model, store, sketch, 10, rerank=n)
            times["total"].append(time.perf_counter() - started)
            for key in times:
                if key != "total":
                    times[key].append(timing[f"{key.replace('encode_sketch', 'encode')}_ms"] / 1e3)
        report[f"rerank_{n}"] = {key: percentiles(values) for key, values in times.items()}
        report[f"rerank_{n}"]["pairs_per_query"] = facts["pairs_scored"]
    return report


def bench_app(args) -> dict:
    from zsbir.app import build_app, launch
    from zsbir.search.browser import draw_square_and_search, find_browser, free_port, start_chromium
    from zsbir.search.build import find_index
    from zsbir.search.model import load_run_model

    browser, driver, why = find_browser()
    if why:
        raise SystemExit(why)
    model = load_run_model(args.run_dir)
    store = find_index(model)
    port = free_port()
    demo = build_app(model, store, top=args.top)
    launch(demo, store, "127.0.0.1", port, block=False)
    page = start_chromium(browser, driver)
    try:
        trips = [draw_square_and_search(page, f"http://127.0.0.1:{port}/", expect=args.top)]  # warm-up
        for _ in range(args.repeats):
            trips.append(draw_square_and_search(page, f"http://127.0.0.1:{port}/", expect=args.top))
        if args.screenshot:
            page.save_screenshot(args.screenshot)
    finally:
        page.quit()
        demo.close()
    return {"round_trip": percentiles([t.round_trip_s for t in trips[1:]]), "top": args.top,
            "seen_by_chromedriver": percentiles([t.driver_s for t in trips[1:]]),
            "first_query_s": round(trips[0].round_trip_s, 3), "last_status": trips[-1].status,
            "trips_ms": [round(t.round_trip_s * 1e3) for t in trips]}  # in order: a trend shows up here


def main(argv: list[str] | None = None) -> None:
    from zsbir.search.store import IndexParams

    parser = argparse.ArgumentParser(prog="python -m zsbir.search.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    vectors = sub.add_parser("vectors", help="random unit vectors: exact vs approximate search")
    vectors.add_argument("--n", type=int, default=1_000_000)
    vectors.add_argument("--dim", type=int, default=512)
    vectors.add_argument("--queries", type=int, default=200)
    vectors.add_argument("--kinds", nargs="*", default=["pq"], choices=["pq", "hnsw", "ivf"])
    vectors.add_argument("--nlist", type=int, default=1024)
    vectors.add_argument("--nprobe", type=int, nargs="+", default=[16, 64, 256])
    vectors.add_argument("--hnsw-m", type=int, default=32)
    vectors.add_argument("--ef-construction", type=int, default=IndexParams.ef_construction)
    vectors.add_argument("--ef-search", type=int, nargs="+", default=[64, 256])
    vectors.add_argument("--pq-m", type=int, help="pq sub-quantisers; default: dim / 2")
    vectors.add_argument("--k-factor", type=int, nargs="+", default=[30, 100, 300])
    vectors.add_argument("--index-file", help="write the built index to <path>.<kind> (or read it back if there)")
    for name in ("run", "app", "rerank"):
        p = sub.add_parser(name)
        p.add_argument("run_dir", type=lambda s: s.split("=", 1)[1] if s.startswith("run_dir=") else s)
        if name != "rerank":
            p.add_argument("--repeats", type=int, default=3 if name == "run" else 10)
        if name != "app":
            p.add_argument("--threads", type=int, default=2)
    sub.choices["rerank"].add_argument("--n", type=int, nargs="+", default=[10, 50], help="shortlist sizes")
    sub.choices["rerank"].add_argument("--sketches", type=int, default=5, help="queries per N (of the 20 picked)")
    sub.choices["app"].add_argument("--top", type=int, default=10)
    sub.choices["app"].add_argument("--screenshot")
    args = parser.parse_args(argv)
    report = {"vectors": bench_vectors, "run": bench_run, "app": bench_app, "rerank": bench_rerank}[args.what](args)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
