"""Domain-specific BatchNorm (model.dsbn) of the CNN encoders: routing by per-sample domains,
per-domain statistics used the same way in training and evaluation, clear errors."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from zsbir.models.cnn import CNNEncoder
from zsbir.models.dsbn import DomainBatchNorm2d
from zsbir.models.encoder import UnsupportedModelOption, domain_indices

TINY = {"arch": "resnet10t", "embed_dim": 16, "model_kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}}
MIXED = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])


def encoder(dsbn="per_domain", seed=0, **kwargs) -> CNNEncoder:
    torch.manual_seed(seed)
    return CNNEncoder(**TINY, dsbn=dsbn, **kwargs)


def images(n=8, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def dsbn_layers(model):
    return [m for m in model.modules() if isinstance(m, DomainBatchNorm2d)]


@pytest.mark.parametrize("affine", ["per_domain", "shared"])
def test_every_batchnorm_becomes_domain_specific_and_starts_as_the_plain_one(affine):
    plain, dsbn = encoder(dsbn=None), encoder(dsbn=affine)
    plain_bns = [m for m in plain.modules() if type(m) is nn.BatchNorm2d]
    layers = dsbn_layers(dsbn)
    assert len(layers) == len(plain_bns) > 0
    x = images()
    plain.eval(), dsbn.eval()
    with torch.no_grad():  # identical at init in every domain: only the statistics will diverge
        for domain in ("sketch", "photo"):
            assert torch.allclose(plain(x, domain)["embedding"], dsbn(x, domain)["embedding"], atol=1e-6)
    per_domain_params = sum(p.numel() for layer in layers for p in layer.parameters())
    plain_params = sum(p.numel() for bn in plain_bns for p in bn.parameters())
    assert per_domain_params == (2 if affine == "per_domain" else 1) * plain_params


@pytest.mark.parametrize("affine", ["per_domain", "shared"])
def test_a_mixed_batch_equals_one_call_per_domain_in_outputs_gradients_and_statistics(affine):
    mixed, split = encoder(dsbn=affine), encoder(dsbn=affine)
    x = images()
    out = mixed(x, MIXED)["embedding"]
    sketch, photo = split(x[MIXED == 0], "sketch")["embedding"], split(x[MIXED == 1], "photo")["embedding"]
    assert torch.allclose(out[MIXED == 0], sketch, atol=1e-6) and torch.allclose(out[MIXED == 1], photo, atol=1e-6)
    out.square().sum().backward()
    (sketch.square().sum() + photo.square().sum()).backward()
    for (name, a), b in zip(mixed.named_parameters(), split.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5), name
    for (name, a), b in zip(mixed.named_buffers(), split.buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_each_domain_keeps_its_own_running_statistics_and_evaluation_uses_them():
    model = encoder()
    sketches, photos = images(seed=1) * 0.2 + 2.0, images(seed=2)  # very different input statistics
    model.train()
    for _ in range(3):
        model(sketches, "sketch"), model(photos, "photo")
    first = dsbn_layers(model)[0]
    sketch_mean, photo_mean = (norm.running_mean for norm in first.norms)
    assert not torch.allclose(sketch_mean, photo_mean)
    model.eval()
    with torch.no_grad():  # the same images, normalised with each domain's statistics, give different embeddings
        as_sketch, as_photo = model(sketches, "sketch")["embedding"], model(sketches, "photo")["embedding"]
        assert not torch.allclose(as_sketch, as_photo)
        # and a mixed evaluation batch routes each sample to its own domain's statistics
        both = model(torch.cat([sketches, photos]), torch.tensor([0] * 8 + [1] * 8))["embedding"]
        assert torch.allclose(both[:8], as_sketch, atol=1e-5)
        assert torch.allclose(both[8:], model(photos, "photo")["embedding"], atol=1e-5)


def test_state_dict_round_trip_keeps_both_domains():
    model = encoder()
    model(images(seed=3) + 1.0, "sketch"), model(images(seed=4), "photo")
    copy = encoder(seed=5)
    copy.load_state_dict(model.state_dict())
    model.eval(), copy.eval()
    with torch.no_grad():
        for domain in ("sketch", "photo"):
            assert torch.equal(model(images(), domain)["embedding"], copy(images(), domain)["embedding"])


def test_the_default_model_uses_domain_specific_batchnorm(compose_cfg):
    from zsbir.models.encoder import build_encoder

    cfg = compose_cfg()
    assert cfg.model.name == "small_cnn" and cfg.model.dsbn == "per_domain"
    assert dsbn_layers(build_encoder(cfg.model, 5))


def test_domain_indices_accepts_names_and_tensors_and_names_the_fix():
    assert domain_indices("photo", 3).tolist() == [1, 1, 1]
    assert domain_indices(torch.tensor([0, 1]), 2).tolist() == [0, 1]
    with pytest.raises(ValueError, match="domain must be one of"):
        domain_indices("drawing", 2)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        domain_indices(torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match=r"index \('sketch', 'photo'\)"):
        domain_indices(torch.tensor([0, 2]), 2)


def test_bad_settings_fail_with_the_fix():
    with pytest.raises(ValueError, match="model.dsbn must be one of"):
        encoder(dsbn="per_class")
    with pytest.raises(ValueError, match="model.towers=shared"):
        encoder(towers="separate")
    with pytest.raises(UnsupportedModelOption, match="grad_checkpointing"):
        encoder().set_grad_checkpointing(True)
    with pytest.raises(RuntimeError, match="ran without domains"):
        encoder().photo_backbone(images())  # bypassing the encoder: no domains routed


def test_separate_towers_encode_a_mixed_batch_as_each_domain_alone():
    model = encoder(dsbn=None, towers="separate").eval()
    batch, ids = images(), MIXED
    mixed = model(batch, ids)["embedding"]
    for name, index in (("sketch", 0), ("photo", 1)):
        rows = torch.nonzero(ids == index).squeeze(1)
        torch.testing.assert_close(mixed[rows], model(batch[rows], name)["embedding"])
