"""ZSE-SBIR: the pair network (cross-attention + relation network), its losses, the preset and
the relation-network evaluation (eval.rerank: exhaustive and top-N)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.smokerun import fixed_batch_losses, train_smoke_run


def tiny_model(**kwargs):
    from zsbir.models.zse import ZSEEncoder

    torch.manual_seed(0)
    return ZSEEncoder(pretrained=None, image_size=32, tiny=True, **kwargs).eval()


def sequences(n: int, model, seed: int) -> torch.Tensor:
    """Random (n x 1 + patches x width) token sequences of the tiny model's shape."""
    grid = model.relation.grid
    return torch.randn(n, 1 + grid * grid, model.width, generator=torch.Generator().manual_seed(seed))


def test_encoder_outputs_the_retrieval_token_and_the_sequence():
    model = tiny_model()
    out = model(torch.randn(3, 3, 32, 32), "sketch")
    assert out["sequence"].shape == (3, 1 + 16, 64)  # 32 px at patch 8: 4 x 4 patches + CLS
    assert torch.equal(out["embedding"], out["sequence"][:, 0])
    assert torch.equal(out["tokens"], out["sequence"][:, 1:])
    mixed = model(torch.cat([torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)]), torch.tensor([0, 1]))
    assert mixed["embedding"].shape == (2, 64)


@pytest.mark.parametrize("values", ["own", "other"])
def test_pair_score_depends_only_on_its_own_pair(values):
    model = tiny_model(cross_values=values)
    sketches, photos = sequences(6, model, 1), sequences(6, model, 2)
    with torch.no_grad():
        together = model.relation_logits(sketches, photos)
        alone = torch.stack([model.relation_logits(sketches[i:i + 1], photos[i:i + 1])[0] for i in range(6)])
        # the other pairs replaced by unrelated ones and the order reversed: pair 0 scores the same
        others = torch.cat([sketches[:1], sequences(5, model, 3)]).flip(0)
        other_photos = torch.cat([photos[:1], sequences(5, model, 4)]).flip(0)
        shuffled = model.relation_logits(others, other_photos)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shuffled[-1], together[0], rtol=1e-5, atol=1e-5)
    assert together.std() > 0  # the score does depend on the pair


def test_relation_network_reads_the_spatial_token_map():
    """The 2x2 down-sampling conv sees patch (r, c) at map position (r, c) (the official `.view()` does not)."""
    model = tiny_model()
    grid, width = model.relation.grid, model.width
    tokens = torch.zeros(1, grid * grid, width)
    tokens[0, 0, :] = 1.0  # only the top-left patch is non-zero
    with torch.no_grad():
        anchors = model.relation.down(tokens.transpose(1, 2).reshape(1, width, grid, grid)) - model.relation.down.bias[
            None, :, None, None]
    nonzero = anchors.abs().sum(1)[0] > 0
    assert nonzero[0, 0] and int(nonzero.sum()) == 1  # it lands in the top-left anchor only


def test_bad_model_settings_are_clear_errors():
    from zsbir.models.zse import ZSEEncoder

    with pytest.raises(ValueError, match="model.cross_values"):
        ZSEEncoder(pretrained=None, image_size=32, tiny=True, cross_values="both")
    with pytest.raises(ValueError, match="odd"):
        ZSEEncoder(pretrained=None, image_size=24, tiny=True)  # 3 x 3 patches


def test_loss_terms_match_hand_computed_values():
    from zsbir.losses.base import LossContext
    from zsbir.losses.zse import PairTripletLoss, RelationLoss

    def out(**tensors):
        from zsbir.models.encoder import EncoderOutput

        return EncoderOutput(embedding=torch.zeros(2, 2), **tensors)

    outputs = {
        "sketch": out(),
        "photo_pos": out(pair_sketch_cls=torch.tensor([[0.0, 0.0], [1.0, 0.0]]),
                         pair_photo_cls=torch.tensor([[3.0, 4.0], [1.0, 0.0]]), relation_logit=torch.tensor([0.0, 2.0])),
        "photo_neg": out(pair_photo_cls=torch.tensor([[0.0, 1.0], [1.0, 3.0]]), relation_logit=torch.tensor([-1.0, 0.0])),
    }
    triplet = PairTripletLoss(margin=1.0)({}, outputs, LossContext())
    # pair 1: d+ = 5, d- = 1 -> 5; pair 2: d+ = 0, d- = 3 -> 0; mean 2.5 (eps of the L2 aside)
    assert float(triplet) == pytest.approx(2.5, abs=1e-5)
    relation = RelationLoss()({}, outputs, LossContext())
    sig = torch.sigmoid
    expected = ((sig(torch.tensor(0.0)) - 0.99) ** 2 + (sig(torch.tensor(2.0)) - 0.99) ** 2
                + (sig(torch.tensor(-1.0)) - 0.01) ** 2 + (sig(torch.tensor(0.0)) - 0.01) ** 2) / 4
    assert float(relation) == pytest.approx(float(expected), rel=1e-6)


def test_zse_losses_refuse_a_model_without_the_pair_network():
    from zsbir.losses.base import LossConfigError, LossContext
    from zsbir.losses.zse import RelationLoss
    from zsbir.models.puxim import PuXIMEncoder

    ctx = LossContext(encoder=PuXIMEncoder(pretrained=None, image_size=32, tiny=True))
    with pytest.raises(LossConfigError, match="model=zse_sbir"):
        RelationLoss().on_train_start(ctx, ["a", "b"])


# ----------------------------------------------------------------------------- eval.rerank

def rerank_inputs(n_queries=7, n_gallery=11):
    from zsbir.eval.retrieval import Embeddings

    model = tiny_model()
    gen = torch.Generator().manual_seed(5)
    embeddings = Embeddings(torch.randn(n_queries, 8, generator=gen), torch.arange(n_queries) % 3,
                            torch.randn(n_gallery, 8, generator=gen), torch.arange(n_gallery) % 3)
    return model, embeddings, sequences(n_queries, model, 6), sequences(n_gallery, model, 7)


def eval_cfg(**overrides):
    from omegaconf import OmegaConf

    return OmegaConf.create({"protocol": "voc", "map_at": [5], "prec_at": [3], "per_class": False,
                             "chunk_size": 2, **overrides})


def test_exhaustive_reranking_equals_top_n_with_n_the_gallery_size():
    from zsbir.eval.rerank import PairScorer, exhaustive_scores, rerank_metrics, top_n_scores

    model, embeddings, queries, gallery = rerank_inputs()
    n_gallery = len(gallery)
    scorer = PairScorer(model, queries, gallery, torch.device("cpu"), pair_batch=4)
    rows = torch.arange(len(queries))
    exhaustive = exhaustive_scores(scorer, rows)
    top_all = top_n_scores(scorer, rows, embeddings.queries, embeddings.gallery, n_gallery)
    torch.testing.assert_close(top_all, exhaustive, rtol=1e-6, atol=1e-6)
    assert torch.equal(torch.sort(top_all, dim=1, descending=True, stable=True).indices,
                       torch.sort(exhaustive, dim=1, descending=True, stable=True).indices)

    device = torch.device("cpu")
    full = rerank_metrics(model, embeddings, queries, gallery, eval_cfg(), device, {"mode": "exhaustive",
                                                                                    "pair_batch": 5})
    top = rerank_metrics(model, embeddings, queries, gallery, eval_cfg(), device, {"mode": "top_n",
                                                                                  "top_n": n_gallery,
                                                                                  "pair_batch": 3})
    for key in ("map_all", "map_5", "prec_3"):
        assert top[key] == pytest.approx(full[key], abs=1e-12)
    assert full["pairs_scored"] == top["pairs_scored"] == len(queries) * n_gallery
    assert (full["mode"], top["mode"], top["top_n"]) == ("exhaustive", "top_n", n_gallery)


def test_exhaustive_mode_scores_at_most_pair_batch_pairs_per_call():
    from zsbir.eval.rerank import rerank_metrics

    model, embeddings, queries, gallery = rerank_inputs()
    sizes = []
    relation_logits = model.relation_logits

    def recording(sketches, photos):
        sizes.append(len(sketches))
        return relation_logits(sketches, photos)

    model.relation_logits = recording
    metrics = rerank_metrics(model, embeddings, queries, gallery, eval_cfg(chunk_size=None), torch.device("cpu"),
                             {"mode": "exhaustive", "pair_batch": 4})
    assert max(sizes) == 4 and sum(sizes) == metrics["pairs_scored"] == len(queries) * len(gallery)


def test_top_n_reorders_only_the_shortlist():
    from zsbir.eval.rerank import PairScorer, retrieval_order, top_n_scores

    model, embeddings, queries, gallery = rerank_inputs()
    scorer = PairScorer(model, queries, gallery, torch.device("cpu"), pair_batch=8)
    rows, n = torch.arange(len(queries)), 3
    scores = top_n_scores(scorer, rows, embeddings.queries, embeddings.gallery, n)
    assert scorer.pairs_scored == len(queries) * n  # only the shortlist goes through the pair network
    ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices
    _, retrieval = retrieval_order(embeddings.queries, embeddings.gallery)
    for q in range(len(queries)):
        assert set(ranked[q, :n].tolist()) == set(retrieval[q, :n].tolist())  # same shortlist, re-ordered
        assert torch.equal(ranked[q, n:], retrieval[q, n:])  # the rest keeps its retrieval order
        logits = scorer(torch.full((n,), q), ranked[q, :n])
        assert bool((logits[:-1] >= logits[1:]).all())  # shortlist by descending relation logit


def test_token_store_on_disk_equals_in_memory(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from zsbir.eval.rerank import token_sequences

    model = tiny_model()
    images = torch.randn(5, 3, 32, 32)
    loader = DataLoader(TensorDataset(images, torch.zeros(5), torch.arange(5)), batch_size=2)
    in_ram = token_sequences(model, loader, "photo", torch.device("cpu"), dtype=torch.float32)
    on_disk = token_sequences(model, loader, "photo", torch.device("cpu"), dtype=torch.float32, store_dir=tmp_path)
    assert (tmp_path / "photo.npy").is_file() and torch.equal(on_disk, in_ram)
    with torch.no_grad():
        torch.testing.assert_close(in_ram, model(images, "photo")["sequence"])  # batches of 2 vs 5: rounding


def test_rerank_needs_a_pair_model_and_valid_settings():
    from omegaconf import OmegaConf

    from zsbir.eval.rerank import RerankError, check_pair_model, rerank_settings
    from zsbir.models.puxim import PuXIMEncoder

    assert rerank_settings(OmegaConf.create({"rerank": {"mode": None}})) is None
    with pytest.raises(RerankError, match="eval.rerank.mode='all'"):
        rerank_settings(OmegaConf.create({"rerank": {"mode": "all"}}))
    with pytest.raises(RerankError, match="NumPy has no bf16"):
        rerank_settings(OmegaConf.create({"rerank": {"mode": "top_n", "token_dtype": "bf16"}}))
    with pytest.raises(RerankError, match="model=zse_sbir"):
        check_pair_model(PuXIMEncoder(pretrained=None, image_size=32, tiny=True))


def test_rerank_without_a_pair_model_fails_before_training(compose_cfg, tmp_path):
    from zsbir.engine.trainer import Trainer
    from zsbir.eval.rerank import RerankError

    cfg = compose_cfg("data=synthetic", "debug=smoke", "trainer.device=cpu", "eval.rerank.mode=top_n")
    with pytest.raises(RerankError, match="model=zse_sbir"):
        Trainer(cfg, tmp_path / "run")


# ----------------------------------------------------------------------------- preset

def test_preset_sets_the_official_settings(compose_cfg):
    cfg = compose_cfg("experiment=zse_sbir", "data=sketchy")
    assert cfg.method == "zse_sbir" and cfg.model.name == "zse_sbir"
    assert (cfg.model.arch, cfg.model.pretrained, cfg.model.norm) == ("vit_base_patch16_224", "sam_in1k", "half")
    assert list(cfg.loss) == ["zse_triplet", "zse_relation"]
    assert (cfg.loss.zse_triplet.weight, cfg.loss.zse_triplet.margin, cfg.loss.zse_relation.weight) == (2.0, 1.0, 4.0)
    assert (cfg.optim._target_, cfg.optim.lr, cfg.optim.weight_decay) == ("torch.optim.AdamW", 1e-5, 1e-2)
    assert (cfg.data.batch_size, cfg.trainer.max_epochs, cfg.trainer.limit_train_batches) == (15, 30, 666)
    assert cfg.eval.rerank.mode is None and cfg.eval.protocol == "voc"


def test_preset_loss_goes_down_on_a_fixed_batch(compose_cfg, tmp_path):
    from zsbir.engine.trainer import Trainer

    # the paper's lr (1e-5) barely moves a tiny random network in 8 steps
    cfg = compose_cfg("experiment=zse_sbir", "data=synthetic", "debug=smoke", "trainer.device=cpu",
                      "optim.lr=1e-3", "model.dropout=0", "model.cross_dropout=0", "model.relation_dropout=0")
    losses, history = fixed_batch_losses(Trainer(cfg, tmp_path / "run"))
    assert all({"loss/zse_triplet", "loss/zse_relation"} <= set(logs) for logs in history)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses


def test_smoke_run_writes_retrieval_and_reranked_metrics(tmp_path, compose_cfg):
    from zsbir.eval import __main__ as eval_cli

    run_dir = train_smoke_run(tmp_path, "experiment=zse_sbir", "data=synthetic", "trainer.device=cpu",
                              "eval.rerank.mode=top_n", "eval.rerank.top_n=10")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "zse_sbir"
    assert metrics["params_trainable"] == metrics["params_total"] > 0  # every part trains, as the official AdamW
    rerank = metrics["test_rerank"]
    assert (rerank["mode"], rerank["top_n"]) == ("top_n", 10)
    assert rerank["pairs_scored"] == metrics["n_queries"] * 10
    assert rerank["n_queries"] == metrics["test"]["n_queries"] and 0 <= rerank["map_all"] <= 1
    assert "relation-network re-ranking (top-10)" in (run_dir / "results.txt").read_text()

    # re-evaluation: exhaustive mode through python -m zsbir.eval, beside the retrieval metrics
    cfg = compose_cfg(f"run_dir={run_dir}", "device=cpu", "eval.grids.queries=0", "eval.rerank.mode=exhaustive",
                      config_name="eval")
    result = eval_cli.run_eval(cfg)
    assert result["test_rerank"]["mode"] == "exhaustive"
    assert result["test_rerank"]["pairs_scored"] == result["n_queries"] * result["n_gallery"]
    assert result["test"]["map_all"] == pytest.approx(metrics["test"]["map_all"], abs=1e-6)
