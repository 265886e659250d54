"""Presets train as their official code does: one encoder call per step (joint BatchNorm) and
two-stream batches (SAKE / DSN), on the synthetic benchmark and on trees built from the real lists."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.datatree import build_tree

STREAM_PRESETS = ("sake", "dsn")
# official images per step: SAKE batch 40 split //3 (Sketchy) or //10 (TU-Berlin); DSN batch 96
OFFICIAL_STREAMS = {("sake", "sketchy"): (13, 26), ("sake", "tuberlin"): (4, 36),
                    ("dsn", "sketchy"): (32, 64), ("dsn", "tuberlin"): (9, 81)}


def smoke_trainer(compose_cfg, tmp_path, preset: str, *extra: str):
    from zsbir.engine.trainer import Trainer

    cfg = compose_cfg(f"experiment={preset}", "data=synthetic", "debug=smoke", "trainer.device=cpu",
                      "eval.before_training=false", *extra)
    return Trainer(cfg, tmp_path / "run")


def first_batch(trainer) -> dict:
    trainer.sampler.set_epoch(0)
    return next(iter(trainer.train_loader))


def batchnorm_stats(module: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for t in (m.running_mean, m.running_var)]


@pytest.mark.parametrize("preset", STREAM_PRESETS)
def test_one_encoder_call_per_training_step(preset, compose_cfg, tmp_path):
    trainer = smoke_trainer(compose_cfg, tmp_path, preset)
    assert trainer.encode_mode == "joint"
    calls = []
    trainer.encoder.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    trainer.encoder.backbone.register_forward_hook(lambda module, args, out: calls.append("backbone"))
    batch = first_batch(trainer)
    trainer.train_step(batch)
    images = sum(len(batch[v]) for v in trainer.views)
    assert calls == ["backbone", images], f"{preset}: encoder calls in one step: {calls}"


@pytest.mark.parametrize("preset", STREAM_PRESETS)
def test_batchnorm_statistics_after_a_step_equal_one_forward_over_the_concatenated_batch(preset, compose_cfg, tmp_path):
    from zsbir.models.encoder import DOMAIN_IDS

    trainer = smoke_trainer(compose_cfg, tmp_path, preset)
    batch = first_batch(trainer)
    joint, per_domain = copy.deepcopy(trainer.encoder).train(), copy.deepcopy(trainer.encoder).train()
    images = torch.cat([batch[v] for v in trainer.views])
    tags = torch.cat([torch.full((len(batch[v]),), DOMAIN_IDS["sketch" if v.startswith("sketch") else "photo"])
                      for v in trainer.views])
    with torch.no_grad():
        joint(images, tags)
        for domain in ("sketch", "photo"):  # what the per-domain encoding would have done
            per_domain(torch.cat([batch[v] for v in trainer.views if v.startswith(domain)]), domain)
    trainer.train_step(batch)
    after = batchnorm_stats(trainer.encoder)
    assert len(after) > 10
    for ours, expected in zip(after, batchnorm_stats(joint)):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(after, batchnorm_stats(per_domain)))


def test_per_domain_encoding_keeps_one_call_per_domain(compose_cfg, tmp_path):
    from zsbir.engine.trainer import Trainer

    cfg = compose_cfg("data=synthetic", "debug=smoke", "trainer.device=cpu", "eval.before_training=false")
    assert cfg.model.encode == "per_domain"  # the default model (findings: its recipe needs per-domain statistics)
    trainer = Trainer(cfg, tmp_path / "run")
    domains = []
    trainer.encoder.register_forward_hook(lambda module, args, out: domains.append(args[1]))
    trainer.train_step(first_batch(trainer))
    assert domains == ["sketch", "photo"]


def test_mixed_domain_fallback_equals_per_domain_calls():
    from zsbir.models.encoder import Encoder, EncoderOutput

    class Doubler(Encoder):  # a model without batch statistics: the per-domain fallback is exact
        embed_dim, norm = 2, "imagenet"

        def encode(self, images, domain):
            scale = 1.0 if domain == "sketch" else 10.0
            return EncoderOutput(embedding=images * scale, scalar=torch.tensor(3.0))

    x = torch.arange(10.0).view(5, 2)
    out = Doubler()(x, torch.tensor([0, 1, 1, 0, 1]))
    torch.testing.assert_close(out["embedding"], x * torch.tensor([[1.0], [10.0], [10.0], [1.0], [10.0]]))
    assert float(out["scalar"]) == 3.0
    with pytest.raises(ValueError, match="shape"):
        Doubler()(x, torch.tensor([0, 1]))


# ---------------------------------------------------------------------------- two streams
@pytest.fixture
def real_trees(shared_splits, tmp_path):
    data_dir = tmp_path / "data"
    for dataset in ("sketchy", "tuberlin"):
        build_tree(shared_splits, data_dir, dataset, per_class=2)
    return data_dir


@pytest.mark.parametrize("preset,dataset", sorted(OFFICIAL_STREAMS))
def test_two_stream_batches_and_epoch_length_on_trees_from_the_real_lists(preset, dataset, real_trees, compose_cfg):
    from zsbir.data.datamodule import load_split, train_loader

    cfg = compose_cfg(f"experiment={preset}", f"data={dataset}", f"paths.data_dir={real_trees}", "data.image_size=16",
                      "data.num_workers=0", "data.max_per_class=999")  # max_per_class: the tree is not the full count
    n_sketch, n_photo = OFFICIAL_STREAMS[preset, dataset]
    assert (cfg.data.sampler, cfg.data.stream_batch.sketch, cfg.data.stream_batch.photo) == ("streams", n_sketch, n_photo)
    data = load_split(cfg.data, seed=0)
    views = ("sketch", "photo") if preset == "sake" else ("sketch", "photo", "sketch_v2", "photo_v2", "sketch_v3", "photo_v3")
    loader = train_loader(data, cfg.data, "imagenet", views, seed=0)
    sampler = loader.batch_sampler
    expected = min(len(data.train_sketch) // n_sketch, len(data.train_photo) // n_photo)  # the shorter stream
    assert expected > 1 and sampler.batches_per_epoch() == len(sampler) == expected
    keys = list(sampler)
    assert len(keys) == expected
    sketches = [k[2] for batch in keys for k in batch if k[1] == 0]
    photos = [k[2] for batch in keys for k in batch if k[1] == 1]
    assert len(sketches) == expected * n_sketch and len(photos) == expected * n_photo
    assert len(set(sketches)) == len(sketches) and len(set(photos)) == len(photos)  # one pass, no repeats
    batch = next(iter(loader))
    for view in views:
        assert batch[view].shape == (n_sketch if view.startswith("sketch") else n_photo, 3, 16, 16)
    assert torch.equal(batch["label"], torch.tensor([data.train_sketch.labels[i] for i in batch["index"]]))
    assert torch.equal(batch["photo_label"], torch.tensor([data.train_photo.labels[i] for i in batch["photo_index"]]))
    if preset == "dsn":  # independently augmented views of the same sketches
        assert not torch.equal(batch["sketch"], batch["sketch_v2"])


def test_stream_sampler_is_seeded_resumable_and_rank_sharded():
    from zsbir.data.streams import StreamBatchSampler

    def batches(**kwargs):
        return list(StreamBatchSampler(100, 300, 4, 36, **{"seed": 7, **kwargs}))

    assert batches() == batches()                      # reproducible from the seed
    assert batches() != batches(seed=8)
    assert len(batches()) == min(100 // 4, 300 // 36)  # epoch = the shorter stream (photos here)
    sampler = StreamBatchSampler(100, 300, 4, 36, seed=7)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != batches() and all(k[0] == 1 for b in epoch1 for k in b)
    sampler.set_epoch(1, start_batch=3)                # a run resumed after 3 batches of epoch 2
    assert list(sampler) == epoch1[3:] and len(sampler) == len(epoch1) - 3
    rank0, rank1 = batches(rank=0, world_size=2), batches(rank=1, world_size=2)
    whole = batches()
    assert rank0 == whole[0:8:2] and rank1 == whole[1:8:2]  # every other batch of the same sequence
    with pytest.raises(ValueError, match="data.stream_batch.sketch=40 x 3 ranks exceeds the 100 training sketches"):
        StreamBatchSampler(100, 300, 40, 36, world_size=3)


def test_streams_reject_triplet_views_with_the_fix(compose_cfg, tmp_path):
    from zsbir.data.filelist import DatasetError

    with pytest.raises(DatasetError, match=r"no views \['photo_pos'\].*data.sampler=triplets"):
        smoke_trainer(compose_cfg, tmp_path, "sake", "loss.ce.views=[sketch,photo_pos]")


@pytest.mark.parametrize("preset", STREAM_PRESETS)
def test_stream_preset_trains_and_its_epoch_is_the_shorter_stream(preset, compose_cfg, tmp_path):
    trainer = smoke_trainer(compose_cfg, tmp_path, preset, "trainer.limit_train_batches=null", "trainer.max_steps=2")
    n_sketch, n_photo = trainer.cfg.data.stream_batch.sketch, trainer.cfg.data.stream_batch.photo
    assert trainer.steps_per_epoch == min(len(trainer.data.train_sketch) // n_sketch,
                                          len(trainer.data.train_photo) // n_photo)
    logs = trainer.train_step(first_batch(trainer))
    assert torch.isfinite(logs["loss"])


def test_dsn_main_view_is_affine_only_and_contrastive_views_add_colour(compose_cfg):
    from zsbir.data.datamodule import transforms_for

    cfg = compose_cfg("experiment=dsn", "data=synthetic")
    transforms = transforms_for(cfg.data, "imagenet", train=True)
    names = {view: [type(op).__name__ for op in transforms[view].transforms] for view in ("photo", "photo_v2", "sketch_v3")}
    assert "RandomGrayscale" not in names["photo"] and "RandomApply" in names["photo"]  # SAKE's affine
    assert "RandomGrayscale" in names["photo_v2"] and "RandomGrayscale" in names["sketch_v3"]


def test_evaluation_embeddings_are_fp32_unless_opted_in(compose_cfg):
    from zsbir.engine.device import amp_dtype

    cuda = torch.device("cuda")
    for preset in ("dann", "sake", "dsn", "sketch_lvm", "puxim", None):
        cfg = compose_cfg(*([f"experiment={preset}"] if preset else []))
        assert cfg.eval.precision == "fp32" and amp_dtype(cfg.eval.precision, cuda) is None
    assert amp_dtype(compose_cfg("eval.precision=bf16").eval.precision, cuda) is torch.bfloat16


def test_bad_encode_mode_and_missing_stream_batch_are_named(compose_cfg):
    from zsbir.config import validate_config
    from zsbir.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.encode='both': must be one of joint\|per_domain"):
        validate_config(compose_cfg("model.encode=both"))
    with pytest.raises(ConfigError, match=r"data.sampler=streams needs data.stream_batch"):
        validate_config(compose_cfg("data.sampler=streams"))
    with pytest.raises(ConfigError, match=r"no entry for dataset 'mydata' \(only sketchy, .*data.by_dataset.mydata"):
        validate_config(compose_cfg("experiment=sake", "data.name=mydata"))
    validate_config(compose_cfg("experiment=sake", "data.name=mydata", "data.stream_batch={sketch:2,photo:4}"))
