"""model.pretrained: local files and folders round-trip, tags fail fast offline, loading is safe."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from zsbir.models import weights
from zsbir.models.encoder import build_encoder
from zsbir.models.weights import MissingWeightsError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def build(name: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    from zsbir._paths import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}", *(f"model.{o}" for o in overrides)])
    return build_encoder(cfg.model, 5)


def write(state: dict, tmp_path: Path, form: str) -> Path:
    """A state dict as a .pth file, or as a timm/HF-style folder holding model.safetensors."""
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if form == "file":
        torch.save(state, tmp_path / "weights.pth")
        return tmp_path / "weights.pth"
    folder = tmp_path / "snapshot"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    return folder


def assert_same(loaded: dict, saved: dict, skip=()):
    keys = [k for k in saved if not k.startswith(skip)]
    assert keys
    for key in keys:
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("form", ["file", "folder"])
def test_resnet_weights_round_trip(tmp_path, form):
    import timm

    from zsbir.models.cnn import TINY_ARCH, TINY_KWARGS

    torch.manual_seed(3)
    source = timm.create_model(TINY_ARCH, **TINY_KWARGS)  # with its 1000-way fc: dropped on load
    path = write(source.state_dict(), tmp_path, form)
    encoder = build("resnet50", "tiny=true", f"pretrained={path}", "towers=separate")
    assert_same(encoder.photo_backbone.state_dict(), source.state_dict(), skip=("fc.",))
    assert_same(encoder.sketch_backbone.state_dict(), source.state_dict(), skip=("fc.",))


@pytest.mark.parametrize("form", ["file", "folder"])
def test_cse_weights_round_trip(tmp_path, form):
    from zsbir.models.cse_resnet import build_seresnet

    torch.manual_seed(4)
    source = build_seresnet(tiny=True, num_classes=1000)
    saved = source.state_dict()
    path = write(saved, tmp_path, form)
    encoder = build("cse_resnet50", "tiny=true", f"pretrained={path}", "svd_init=false")
    loaded = encoder.backbone.senet.state_dict()
    fc2 = [k for k in saved if k.endswith("se_module.fc2.weight")]
    assert len(fc2) == 4
    assert_same(loaded, saved, skip=("last_linear.",) + tuple(fc2))
    for key in fc2:  # the ImageNet columns, then the zero tag column
        torch.testing.assert_close(loaded[key][:, :-1], saved[key], rtol=0, atol=0)
        assert torch.count_nonzero(loaded[key][:, -1]) == 0


@pytest.mark.parametrize("form", ["file", "folder"])
def test_clip_weights_round_trip(tmp_path, form):
    torch.manual_seed(5)
    source = build("clip_prompt", "tiny=true", "pretrained=null", "image_size=32").clip
    path = write(source.state_dict(), tmp_path, form)
    torch.manual_seed(6)
    encoder = build("clip_prompt", "tiny=true", f"pretrained={path}", "image_size=32")
    assert_same(encoder.clip.state_dict(), source.state_dict())


def test_a_file_for_another_model_is_refused_naming_keys(tmp_path):
    from zsbir.models.cse_resnet import build_seresnet

    path = write(build_seresnet(tiny=True).state_dict(), tmp_path, "file")
    with pytest.raises(ValueError, match="do not fit.*wrong shape"):
        build("resnet50", "tiny=true", f"pretrained={path}")


def test_missing_local_path_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        build("resnet50", f"pretrained={tmp_path}/nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no single weight file"):
        build("resnet50", f"pretrained={tmp_path / 'empty'}")


class NotATensor:
    pass


def test_pickled_objects_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": NotATensor()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        weights.load_state_dict_file(path)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No network, nothing cached: a fresh HF hub cache and torch hub dir."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


@pytest.mark.parametrize(
    "name, tag",
    [("resnet50", "resnet50.tv_in1k"), ("cse_resnet50", "legacy_seresnet50.in1k"), ("clip_prompt", "openai")],
)
def test_offline_tag_fails_fast_naming_the_weights(empty_caches, monkeypatch, name, tag):
    # Fast = no connection attempt (no retries or timeouts against an unreachable hub): every
    # socket connect is recorded and refused. (Not a timed assertion: CI machines are shared.)
    attempts = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    with pytest.raises(MissingWeightsError) as error:
        build(name)
    assert attempts == []
    message = str(error.value)
    assert tag in message and "model.pretrained=/path/to/file" in message
    assert "python -m zsbir.models.weights" in message


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(ValueError, match="known tags.*resnet50.tv_in1k"):
        build("resnet50", "pretrained=not_a_tag")
    with pytest.raises(ValueError, match="known tags.*openai"):
        build("clip_prompt", "pretrained=not_a_tag")


def test_cached_tag_is_loaded_from_the_cache_without_network(empty_caches, tmp_path):
    """A tag whose file is in the torch hub cache loads offline (legacy SE-ResNet is a url tag)."""
    import timm

    cfg = timm.models.get_pretrained_cfg("legacy_seresnet50.in1k")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(cfg.url).name
    cached.parent.mkdir(parents=True)
    torch.manual_seed(7)
    source = timm.create_model("legacy_seresnet50")
    torch.save(source.state_dict(), cached)
    encoder = build("cse_resnet50", "embed_dim=64")
    assert_same(encoder.backbone.senet.state_dict(), source.state_dict(),
                skip=("last_linear.",) + tuple(k for k in source.state_dict() if "se_module.fc2.weight" in k))


def test_offline_detection(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights.is_offline()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for var in weights._OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    def hanging_connect(*args, **kwargs):  # a DNS lookup or connect that never returns
        time.sleep(60)

    monkeypatch.setattr(socket, "create_connection", hanging_connect)
    monkeypatch.setattr(weights, "_online", None)
    start = time.perf_counter()
    assert weights.is_offline()
    # The probe is abandoned after its timeout: far below the hang, whatever the machine's load.
    assert time.perf_counter() - start < 30
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
