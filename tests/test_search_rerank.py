"""`--rerank N` of `python -m zsbir.search` and the app's re-rank slider on a tiny ZSE-SBIR run:
the index's top N re-ordered by the relation network rank exactly as zsbir.eval.rerank does."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install -e '.[app]')")

from zsbir.data.datamodule import eval_loader, load_split  # noqa: E402
from zsbir.eval.rerank import PairScorer, exhaustive_scores, token_sequences, top_n_scores  # noqa: E402
from zsbir.eval.retrieval import embed  # noqa: E402
from zsbir.search import __main__ as search_cli  # noqa: E402
from zsbir.search.__main__ import search_sketch  # noqa: E402
from zsbir.search.build import build_index, find_index  # noqa: E402
from zsbir.search.model import load_run_model  # noqa: E402
from smokerun import train_smoke_run  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def zse_run(tmp_path_factory, zsbir_cache):
    # one optimiser step: a real checkpoint of the pair model, trained as little as it can be
    return train_smoke_run(tmp_path_factory.mktemp("rerank"), "experiment=zse_sbir", "data=synthetic",
                           "trainer.device=cpu", "trainer.max_steps=1")


@pytest.fixture(scope="module")
def model(zse_run):
    return load_run_model(zse_run)


@pytest.fixture(scope="module")
def evaluator_side(model):
    """The unseen-class split as zsbir.eval.rerank sees it: embeddings, token sequences, its scorer."""
    cfg, norm = model.run_cfg.data, model.encoder.norm
    data = load_split(cfg, seed=int(model.run_cfg.seed))
    loaders = {d: eval_loader(data, items, d, cfg, norm) for d, items in (("sketch", data.zero_sketch),
                                                                          ("photo", data.zero_photo))}
    queries, _ = embed(model.encoder, loaders["sketch"], "sketch", CPU)
    gallery, _ = embed(model.encoder, loaders["photo"], "photo", CPU)
    sequences = {d: token_sequences(model.encoder, loader, d, CPU, dtype=torch.float32)
                 for d, loader in loaders.items()}
    scorer = PairScorer(model.encoder, sequences["sketch"], sequences["photo"], CPU)
    return data, queries, gallery, scorer


def sketch_path(data, q: int) -> str:
    return str(data.root / data.zero_sketch.paths[q])


def test_rerank_of_the_whole_gallery_is_the_exhaustive_relation_ranking(zse_run, evaluator_side, capsys):
    data, _, gallery, scorer = evaluator_side
    n = len(gallery)
    picked = [0, 17, len(data.zero_sketch) - 1]
    code = search_cli.main([f"run_dir={zse_run}", *[sketch_path(data, q) for q in picked],
                            "--top", str(n), "--rerank", str(n), "--json"])
    assert code == 0
    reports = json.loads(capsys.readouterr().out)
    for q, report in zip(picked, reports):
        logits = exhaustive_scores(scorer, torch.tensor([q]))[0]
        ids = [r["id"] for r in report["results"]]
        assert sorted(ids) == list(range(n)), f"query {q}"
        # Search encodes the photos in another batching than the evaluator: logits agree to ~1e-6,
        # so the order must be the exhaustive ranking's up to swaps of such near-ties.
        reference = logits[ids].numpy()
        assert np.all(np.diff(reference) <= 1e-5), f"query {q}: not in relation-logit order"
        np.testing.assert_allclose([r["relation_logit"] for r in report["results"]], reference, rtol=1e-5, atol=1e-6)
        assert report["rerank"] == {"applied": True, "top_n": n, "photos_encoded": n, "pairs_scored": n}
        assert sorted(r["index_rank"] for r in report["results"]) == list(range(1, n + 1))
        cosines = sorted(((r["index_rank"], r["score"]) for r in report["results"]))
        assert [s for _, s in cosines] == sorted((s for _, s in cosines), reverse=True)  # both scores carried
        assert all(r["relation_score"] == pytest.approx(1 / (1 + np.exp(-r["relation_logit"])))
                   for r in report["results"])
        timing = report["timing_ms"]
        assert timing["rerank_ms"] == pytest.approx(timing["rerank_photos_ms"] + timing["rerank_pairs_ms"])
        assert timing["rerank_photos_ms"] > 0 and timing["rerank_pairs_ms"] > 0


def test_rerank_n_reorders_the_top_n_and_keeps_the_rest_in_index_order(model, evaluator_side):
    data, queries, gallery, scorer = evaluator_side
    store = find_index(model)
    n, top = 5, 15
    for q in (3, 40):
        sketch = Image.open(sketch_path(data, q))
        plain, _, facts = search_sketch(model, store, sketch, top)
        assert facts == {"applied": False} and all("relation_logit" not in r for r in plain)
        reranked, timing, facts = search_sketch(model, store, sketch, top, rerank=n)
        assert facts["applied"] and facts["pairs_scored"] == facts["photos_encoded"] == n
        ids = [r["id"] for r in reranked]
        assert sorted(ids[:n]) == sorted(r["id"] for r in plain[:n])  # the same shortlist, re-ordered
        assert ids[n:] == [r["id"] for r in plain[n:]]  # the rest keeps the index order
        assert [r["index_rank"] for r in reranked[n:]] == list(range(n + 1, top + 1))
        assert all(r["relation_logit"] is None for r in reranked[n:])
        logits = [r["relation_logit"] for r in reranked[:n]]
        assert logits == sorted(logits, reverse=True)
        assert [r["rank"] for r in reranked] == list(range(1, top + 1))
        # the ranking eval.rerank.mode=top_n evaluates for this query
        scores = top_n_scores(scorer, torch.tensor([q]), queries, gallery, n)[0]
        assert ids == torch.sort(scores, descending=True, stable=True).indices[:top].tolist(), f"query {q}"

        fewer, _, _ = search_sketch(model, store, sketch, 3, rerank=n)  # --top below N: the head of the same ranking
        assert [r["id"] for r in fewer] == ids[:3]


def test_the_table_shows_both_scores(zse_run, evaluator_side, capsys):
    data = evaluator_side[0]
    assert search_cli.main([f"run_dir={zse_run}", sketch_path(data, 0), "--top", "4", "--rerank", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "top 2 re-ranked by the relation network" in lines[0]
    assert lines[1].split()[:4] == ["rank", "score", "relation", "index"]
    assert [line.split()[2] for line in lines[4:]] == ["-", "-"]  # after the shortlist: no relation score
    assert search_cli.main([f"run_dir={zse_run}", sketch_path(data, 0), "--rerank", "-1"]) == 1


def test_a_shortlisted_photo_gone_since_indexing_is_named(model, zse_run, tmp_path, caplog):
    data = load_split(model.run_cfg.data, seed=0)
    folder = tmp_path / "photos"
    for i in range(8):
        rel = Path(data.zero_photo.paths[i])
        (folder / rel.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(data.root / rel, folder / rel.parent.name / f"{i}{rel.suffix}")
    store = build_index(model, images=str(folder), name="mine", progress=False)
    try:
        gone = Path(store.meta["root"]) / store.items[3]["path"]
        gone.unlink()
        assert search_cli.main([f"run_dir={zse_run}", "index=mine", sketch_path(data, 0), "--rerank", "8"]) == 1
        assert f"photo {gone} of index mine cannot be read for re-ranking" in caplog.text
        assert f"images={folder.resolve()} name=mine rebuild=true" in caplog.text
    finally:
        shutil.rmtree(store.folder)  # the run's other tests search its default index


def test_app_handler_reranks_the_top_n(model, evaluator_side):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[app]')")
    from zsbir.app import build_app, search_handler

    data = evaluator_side[0]
    store = find_index(model)
    sketch = Image.open(sketch_path(data, 5)).convert("RGBA")
    n = 6
    gallery, status = search_handler(model, store)({"composite": sketch}, n, n)
    expected, _, _ = search_sketch(model, store, sketch, n, rerank=n)
    plain, _, _ = search_sketch(model, store, sketch, n)
    assert [path for path, _ in gallery] == [r["path"] for r in expected]  # N results, relation order
    assert sorted(path for path, _ in gallery) == sorted(r["path"] for r in plain)
    relation = [float(caption.split(" · rel ")[1]) for _, caption in gallery]
    assert relation == sorted(relation, reverse=True)  # shown in relation-score order
    assert f"top {n} re-ranked by the relation network" in status
    off, _ = search_handler(model, store)({"composite": sketch}, n, 0)
    assert [path for path, _ in off] == [r["path"] for r in plain] and all(" · rel " not in c for _, c in off)

    demo = build_app(model, store)  # the pair model's page has the re-rank slider
    assert "rerank" in {getattr(block, "elem_id", None) for block in demo.blocks.values()}


def test_rerank_bench_times_each_part_per_n(zse_run):
    from zsbir.search.bench import main as bench_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench_main(["rerank", f"run_dir={zse_run}", "--n", "2", "7", "--sketches", "2", "--threads", "1"])
    report = json.loads(out.getvalue())
    assert report["sketches"] == 2 and report["model"].endswith("(tiny)")
    for n in (2, 7):
        assert report[f"rerank_{n}"]["pairs_per_query"] == n
        assert {k: v["n"] for k, v in report[f"rerank_{n}"].items() if isinstance(v, dict)} == \
            {"encode_sketch": 2, "search": 2, "rerank": 2, "rerank_photos": 2, "rerank_pairs": 2, "total": 2}
