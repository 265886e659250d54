"""`python -m zsbir.index` / `python -m zsbir.search`: the index ranks as the evaluator does,
stale indexes are refused, incremental adds equal fresh builds, decode failures are listed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

faiss = pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install -e '.[app]')")

from zsbir.data.datamodule import eval_loader, load_split  # noqa: E402
from zsbir.eval.metrics import retrieval_metrics  # noqa: E402
from zsbir.eval.retrieval import embed, ranked_gallery  # noqa: E402
from zsbir.search import __main__ as search_cli  # noqa: E402
from zsbir.search.build import build_index, find_index  # noqa: E402
from zsbir.search.model import load_run_model  # noqa: E402
from smokerun import train_smoke_run  # noqa: E402
from zsbir.search.store import (IndexParams, SearchIndexError, StaleIndexError, make_index, open_index,  # noqa: E402
                                ranked, stored_vectors)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, zsbir_cache):
    return train_smoke_run(tmp_path_factory.mktemp("search"))


@pytest.fixture
def run_copy(trained_run, tmp_path):
    return Path(shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("index")))


@pytest.fixture(scope="module")
def model(trained_run):
    return load_run_model(trained_run)


@pytest.fixture(scope="module")
def evaluator_embeddings(model):
    """The unseen-class queries and gallery as the evaluator embeds them (its loader, its `embed`)."""
    data_cfg = model.run_cfg.data
    data = load_split(data_cfg, seed=int(model.run_cfg.seed))
    queries, query_labels = embed(model.encoder, eval_loader(data, data.zero_sketch, "sketch", data_cfg, model.encoder.norm),
                                  "sketch", model.device)
    gallery, gallery_labels = embed(model.encoder, eval_loader(data, data.zero_photo, "photo", data_cfg, model.encoder.norm),
                                    "photo", model.device)
    return data, queries, query_labels, gallery, gallery_labels


def test_index_search_ranks_as_the_evaluator(model, evaluator_embeddings):
    data, queries, _, gallery, _ = evaluator_embeddings
    store = build_index(model, progress=False)
    assert len(store) == len(data.zero_photo) == len(gallery)
    assert [it["path"] for it in store.items] == data.zero_photo.paths
    expected = ranked_gallery(queries, gallery, len(gallery))
    for q in range(len(data.zero_sketch)):
        sketch = Image.open(data.root / data.zero_sketch.paths[q])
        vector = model.encode_sketch(sketch)
        assert np.allclose(vector, torch.nn.functional.normalize(queries[q], dim=0).numpy(), atol=1e-5)
        results = store.search(vector, len(gallery))
        assert [r["id"] for r in results] == expected[q].tolist(), f"query {q}"
        scores = [r["score"] for r in results]
        assert scores == sorted(scores, reverse=True)


def test_mean_precision_at_10_of_20_sketches_equals_the_evaluators(model, evaluator_embeddings):
    data, queries, query_labels, gallery, gallery_labels = evaluator_embeddings
    store = build_index(model, progress=False)
    picked = np.random.default_rng(0).choice(len(data.zero_sketch), 20, replace=False)
    precisions = []
    for q in picked:
        results = store.search(model.encode_sketch(Image.open(data.root / data.zero_sketch.paths[q])), 10)
        query_class = data.unseen_classes[data.zero_sketch.labels[q]]
        precisions.append(np.mean([r["class"] == query_class for r in results]))
    evaluator = retrieval_metrics(queries[picked], query_labels[picked], gallery, gallery_labels, prec_at=(10,))
    assert np.mean(precisions) == pytest.approx(evaluator["prec_10"], abs=1e-6)


def test_ties_are_broken_by_gallery_index_like_the_evaluator():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((40, 8)).astype(np.float32)
    gallery = np.concatenate([base, base[::2], base[:5]])  # exact duplicates: equal scores
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = gallery[rng.choice(len(gallery), 12)] + 0.01 * rng.standard_normal((12, 8)).astype(np.float32)
    _, ids = ranked(make_index(IndexParams("exact"), gallery), queries, 15)
    expected = ranked_gallery(torch.from_numpy(queries), torch.from_numpy(gallery), 15)
    assert ids.tolist() == expected.tolist()


def test_approximate_index_stores_its_recall(model, tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    from zsbir.search.store import measure_recall

    for kind in ("hnsw", "ivf", "pq"):
        params = IndexParams(kind, nprobe=64)
        recall = measure_recall(make_index(params, vectors), params, vectors)
        assert recall["k"] == 10 and recall["queries"] == 1000 and 0.9 <= recall["value"] <= 1.0
    with pytest.raises(SearchIndexError, match="index.kind='annoy' is not one of"):
        make_index(IndexParams("annoy"), vectors)


def test_pq_index_rescores_its_candidates_exactly_and_keeps_its_settings(tmp_path):
    from zsbir.search.store import PQ_MIN_TRAIN, SketchIndex, open_index

    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((3000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:50] + 0.05 * rng.standard_normal((50, 32)).astype(np.float32)
    params = IndexParams("pq", k_factor=7)
    index = make_index(params, vectors)
    base = faiss.downcast_index(index.base_index)
    assert type(base).__name__ == "IndexPQFastScan" and (base.pq.M, base.pq.nbits) == (16, 4)  # d / 2 of 4 bits
    exact_scores, exact_ids = ranked(make_index(IndexParams("exact"), vectors), queries, 10)
    scores, ids = ranked(index, queries, 10)
    found = ids == exact_ids
    assert found.mean() > 0.9
    # what it returns carries the exact cosine, not the code's estimate
    assert np.allclose(scores[found], exact_scores[found], atol=1e-5)
    store = SketchIndex(tmp_path / "pq", index, {"format": 1, "kind": "pq", "params": {"k_factor": 7},
                                                 "items": [{"path": f"{i}.png"} for i in range(len(vectors))]})
    store.save()
    again = open_index(tmp_path / "pq")
    assert again.index.k_factor == 7 and ranked(again.index, queries, 10)[1].tolist() == ids.tolist()
    again.index.add(vectors[:5])  # adding encodes the new vectors with the trained quantisers
    assert again.index.ntotal == len(vectors) + 5
    with pytest.raises(SearchIndexError, match=f"needs at least {PQ_MIN_TRAIN} photos.*index.kind=exact"):
        make_index(params, vectors[:100])
    with pytest.raises(SearchIndexError, match="index.pq_m=5 must divide the embedding size 32"):
        make_index(IndexParams("pq", pq_m=5), vectors)


# ----------------------------------------------------------------------------- stale indexes

def test_an_index_of_another_checkpoint_is_refused_with_the_rebuild_command(run_copy):
    model = load_run_model(run_copy)
    build_index(model, progress=False)
    state = torch.load(run_copy / "best.pt", weights_only=True)
    first = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][first] = state["model"][first] + 0.5
    torch.save(state, run_copy / "best.pt")
    retrained = load_run_model(run_copy)
    with pytest.raises(StaleIndexError, match=r"another checkpoint .*Rebuild it: python -m zsbir.index "
                                              rf"run_dir={run_copy} source=zero_photo rebuild=true"):
        find_index(retrained)
    with pytest.raises(StaleIndexError, match="another checkpoint"):
        build_index(retrained, progress=False)  # adding to it is refused too
    rebuilt = build_index(retrained, rebuild=True, progress=False)
    assert rebuilt.meta["checkpoint_sha256"] == retrained.checkpoint_sha256
    assert find_index(retrained).meta["last_update"]["embedded"] == len(rebuilt)


def test_an_index_of_another_transform_is_refused(run_copy):
    build_index(load_run_model(run_copy), progress=False)
    config = (run_copy / "config.yaml").read_text()
    (run_copy / "config.yaml").write_text(config.replace("image_size: 32", "image_size: 28", 1))
    with pytest.raises(StaleIndexError, match="another photo transform .*image_size"):
        find_index(load_run_model(run_copy))


# ----------------------------------------------------------------------------- a folder of photos

def photo_folder(model, folder: Path, count: int, start: int = 0) -> list[Path]:
    """Copy `count` unseen-class photos of the benchmark into `<folder>/<class>/`."""
    data = load_split(model.run_cfg.data, seed=0)
    written = []
    for i in range(start, start + count):
        rel = Path(data.zero_photo.paths[i])
        target = folder / rel.parent.name / f"{i:03d}{rel.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        written.append(Path(shutil.copy(data.root / rel, target)))
    return written


def test_incremental_add_equals_a_fresh_build_and_embeds_only_new_photos(run_copy, tmp_path, caplog):
    model = load_run_model(run_copy)
    folder = tmp_path / "photos"
    photo_folder(model, folder, 30)
    (folder / "broken.png").write_bytes(b"not a png")
    first = build_index(model, images=str(folder), progress=False)
    assert len(first) == 30 and [s["path"] for s in first.meta["skipped"]] == ["broken.png"]
    assert "skipped" in caplog.text and "broken.png" in caplog.text
    assert first.meta["items"][0]["class"] == Path(first.meta["items"][0]["path"]).parts[0]

    photo_folder(model, folder, 20, start=30)
    added = build_index(model, images=str(folder), progress=False)
    assert added.meta["last_update"]["embedded"] == 20 and len(added) == 50
    fresh = build_index(model, images=str(folder), name="fresh", progress=False)
    assert fresh.meta["last_update"]["embedded"] == 50

    # same photos, same vectors, same rankings
    by_path = lambda store: dict(zip([it["path"] for it in store.items], stored_vectors(store.index)))  # noqa: E731
    a, b = by_path(open_index(added.folder)), by_path(open_index(fresh.folder))
    assert set(a) == set(b) and all(np.allclose(a[p], b[p], atol=1e-6) for p in a)
    sketch = model.encode_sketch(Image.open(folder / first.items[0]["path"]).convert("L"))
    hits = lambda store: [(Path(r["path"]).name, round(r["score"], 5)) for r in store.search(sketch, 50)]  # noqa: E731
    assert hits(open_index(added.folder)) == hits(fresh)

    again = build_index(model, images=str(folder), progress=False)
    assert again.meta["last_update"]["embedded"] == 0 and len(again) == 50


def test_empty_or_missing_folders_and_unknown_sources_are_refused(model, tmp_path):
    with pytest.raises(SearchIndexError, match="is not a folder"):
        build_index(model, images=str(tmp_path / "nowhere"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SearchIndexError, match="holds no image files"):
        build_index(model, images=str(tmp_path / "empty"), progress=False)
    with pytest.raises(SearchIndexError, match="source='test_photo' is not one of"):
        build_index(model, source="test_photo", progress=False)


# ----------------------------------------------------------------------------- the commands

def test_index_command_writes_index_and_metadata(run_copy, compose_cfg):
    from zsbir.index import run_index

    store = run_index(compose_cfg(f"run_dir={run_copy}", "progress=false", "index.kind=hnsw", config_name="index"))
    meta = json.loads((run_copy / "index" / "synthetic-zero_photo" / "meta.json").read_text())
    assert meta["kind"] == "hnsw" and meta["count"] == len(store) > 0
    assert 0.9 <= meta["recall"]["value"] <= 1.0
    assert meta["transform"]["image_size"] == 32 and meta["checkpoint"].endswith("best.pt")
    assert meta["build_command"].endswith("source=zero_photo index.kind=hnsw")
    # a gallery too small to train a pq index is refused before any photo is embedded
    with pytest.raises(SearchIndexError, match=r"a pq index needs at least 624 photos .*, got \d+; use index.kind=exact"):
        run_index(compose_cfg(f"run_dir={run_copy}", "progress=false", "index.kind=pq", "name=small-pq",
                              config_name="index"))
    assert not (run_copy / "index" / "small-pq").exists()


def test_search_command_prints_json_and_writes_a_grid(trained_run, model, tmp_path, capsys):
    data = load_split(model.run_cfg.data, seed=0)
    sketch = str(data.root / data.zero_sketch.paths[0])
    grid = tmp_path / "grid.png"
    code = search_cli.main([f"run_dir={trained_run}", sketch, "--top", "4", "--json", "--grid", str(grid)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in report["results"]] == [1, 2, 3, 4]
    assert all(Path(r["path"]).is_file() and r["class"] in data.unseen_classes for r in report["results"])
    assert Image.open(grid).size == (5 * (96 + 4) - 4, 16 + 96)

    assert search_cli.main([f"run_dir={trained_run}", sketch, "--top", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "top 3 of" in table[0] and len(table) == 5


def test_search_command_errors_are_one_line(trained_run, model, tmp_path, caplog):
    assert search_cli.main([f"run_dir={trained_run}", str(tmp_path / "missing.png")]) == 1
    assert "missing.png does not exist" in caplog.text
    (tmp_path / "bad.png").write_text("no")
    assert search_cli.main([f"run_dir={trained_run}", str(tmp_path / "bad.png")]) == 1
    assert "cannot read sketch" in caplog.text
    assert search_cli.main([str(tmp_path / "bad.png")]) == 1
    assert "no run directory given" in caplog.text
    assert search_cli.main([f"run_dir={trained_run}", "topk=3", str(tmp_path / "bad.png")]) == 1
    assert "unknown setting 'topk'" in caplog.text
    data = load_split(model.run_cfg.data, seed=0)
    assert search_cli.main([f"run_dir={trained_run}", "index=nope", str(data.root / data.zero_sketch.paths[0])]) == 1
    assert "no index named 'nope'" in caplog.text


def test_rerank_on_a_model_without_a_pair_scorer_is_refused(trained_run, model, caplog):
    data = load_split(model.run_cfg.data, seed=0)
    sketch = str(data.root / data.zero_sketch.paths[0])
    assert search_cli.main([f"run_dir={trained_run}", sketch, "--rerank", "5"]) == 1
    refusal = [r.getMessage() for r in caplog.records if "--rerank needs" in r.getMessage()]
    assert len(refusal) == 1 and "\n" not in refusal[0]
    assert "a relation network: experiment=zse_sbir" in refusal[0] and "search without --rerank" in refusal[0]
    assert type(model.encoder).__name__ in refusal[0]
    from zsbir.search.rerank import RerankUsageError

    with pytest.raises(RerankUsageError, match="has none: search without --rerank"):  # the app's path too
        search_cli.search_sketch(model, None, Image.open(sketch), 3, rerank=3)
