"""trainer.max_steps=0 (evaluation-only runs) and the frozen foundation-model baselines (experiment=frozen)."""
from __future__ import annotations

import json

import pytest
import torch

from zsbir.errors import ConfigError, MissingWeightsError
from zsbir.models.frozen import FrozenEncoder, library_norm
from zsbir.train import run

FROZEN_MODELS = ("frozen_clip_b32", "frozen_clip_b16", "frozen_siglip_b16", "frozen_dinov2_b14")
NO_GRIDS = ["eval.grids.queries=0"]
TRAINING_STATE = ("last.pt", "best.pt")


def test_max_steps_zero_evaluates_the_untrained_network_and_writes_no_training_state(compose_cfg, tmp_path):
    # The same seed builds the same initial weights: a one-step run's "before" row is the untrained network.
    trained = run(compose_cfg("debug=smoke", "trainer.max_steps=1", *NO_GRIDS), str(tmp_path / "one_step"))
    run_dir = tmp_path / "zero"
    result = run(compose_cfg("debug=smoke", "trainer.max_steps=0", *NO_GRIDS), str(run_dir))

    assert result["steps"] == 0 and result["evaluation_only"] is True
    assert result["test"] == result["test_before_training"]  # before = after: nothing was trained
    for key in ("map_all", "prec_100", "map_200", "prec_200"):
        assert result["test"][key] == pytest.approx(trained["test_before_training"][key], abs=1e-6), key
    for name in TRAINING_STATE:
        assert not (run_dir / name).exists(), name
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["test"] == written["test_before_training"] == result["test"]
    assert written["params_total"] > 0 and written["params_trainable"] == written["params_total"]  # small_cnn: all trainable
    assert written["best_val"]["value"] is None and written["best_val"]["step"] == -1
    assert (run_dir / "config.yaml").is_file() and (run_dir / "run_info.json").is_file()
    assert "trainer.max_steps=0" in (run_dir / "results.txt").read_text()


def test_max_steps_zero_refuses_a_directory_with_a_training_checkpoint(compose_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run(compose_cfg("debug=smoke", "trainer.max_steps=1", *NO_GRIDS), str(run_dir))
    with pytest.raises(ConfigError, match="python -m zsbir.eval"):
        run(compose_cfg("debug=smoke", "trainer.max_steps=0", *NO_GRIDS), str(run_dir))


def test_a_model_without_trainable_parameters_cannot_be_trained(compose_cfg, tmp_path):
    cfg = compose_cfg("experiment=frozen", "data=synthetic", "debug=smoke", "trainer.max_steps=2", "loss=[triplet]")
    with pytest.raises(ConfigError, match="trainer.max_steps=0"):
        run(cfg, str(tmp_path / "run"))


def test_empty_loss_set_is_only_legal_without_training(compose_cfg):
    from zsbir.config import validate_config

    with pytest.raises(ConfigError, match="loss set is empty"):
        validate_config(compose_cfg("experiment=frozen", "data=synthetic", "debug=smoke", "trainer.max_steps=3"))
    validate_config(compose_cfg("experiment=frozen", "data=synthetic", "debug=smoke"))


@pytest.mark.parametrize("model", FROZEN_MODELS)
def test_frozen_preset_runs_end_to_end(model, compose_cfg, tmp_path):
    run_dir = tmp_path / "run"
    result = run(compose_cfg("experiment=frozen", f"model={model}", "data=synthetic", "debug=smoke", *NO_GRIDS),
                 str(run_dir))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == model and metrics["model"] == model
    assert metrics["test"] == metrics["test_before_training"] == result["test"]
    assert metrics["params_total"] > 0 and metrics["params_trainable"] == 0
    assert 0 <= metrics["test"]["map_all"] <= 1
    for name in TRAINING_STATE:
        assert not (run_dir / name).exists(), name


def test_report_shows_the_frozen_row(compose_cfg, tmp_path):
    from zsbir.report import build_table, collect_local

    run(compose_cfg("experiment=frozen", "model=frozen_dinov2_b14", "data=synthetic", "debug=smoke", *NO_GRIDS),
        str(tmp_path / "runs" / "frozen"))
    runs, _ = collect_local(tmp_path / "runs")
    table = build_table(runs)
    row = next(r for r in table.rows if r.method == "frozen_dinov2_b14")
    assert row.label.startswith("frozen DINOv2 ViT-B/14")
    assert row.cells[("synthetic", "map_all")].values == [runs[0].metrics["map_all"]]


@pytest.mark.parametrize("model", FROZEN_MODELS)
def test_norm_is_the_models_own(model, compose_cfg):
    cfg = compose_cfg("experiment=frozen", f"model={model}").model
    assert library_norm(cfg.library, cfg.arch, cfg.pretrained) == cfg.norm


def test_wrong_norm_for_the_tag_is_refused():
    with pytest.raises(ValueError, match="model.norm=half"):
        FrozenEncoder("open_clip", "ViT-B-16-SigLIP", "webli", norm="clip")


@pytest.mark.parametrize("model", FROZEN_MODELS)
def test_tag_offline_fails_with_the_way_to_provide_a_file(model, compose_cfg, tmp_path):
    from zsbir.models.encoder import build_encoder

    cfg = compose_cfg("experiment=frozen", f"model={model}").model
    with pytest.raises(MissingWeightsError, match="model.pretrained=/path/to/file"):
        build_encoder(cfg, num_seen_classes=3)


def _save(state: dict, path) -> str:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))
    return str(path)


def test_open_clip_tower_loads_from_a_local_file(tmp_path):
    from zsbir.models.clip_common import create_clip

    torch.manual_seed(1)
    reference = create_clip("ViT-B-32-quickgelu", None, 32, tiny=True)[0].eval()
    path = _save(reference.state_dict(), tmp_path / "clip.safetensors")
    torch.manual_seed(2)  # a different random init: only the file can make the outputs equal
    encoder = FrozenEncoder("open_clip", "ViT-B-32-quickgelu", path, norm="clip", image_size=32, tiny=True)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(encoder(images, "sketch")["embedding"], reference.encode_image(images), atol=1e-5)
    assert all(not p.requires_grad for p in encoder.parameters())


def test_timm_tower_loads_from_a_local_file(tmp_path):
    import timm

    from zsbir.models.frozen import TINY_TIMM

    torch.manual_seed(1)
    reference = timm.create_model("vit_base_patch14_dinov2", num_classes=0, img_size=32, **TINY_TIMM).eval()
    path = _save(reference.state_dict(), tmp_path / "dinov2.safetensors")
    torch.manual_seed(2)
    encoder = FrozenEncoder("timm", "vit_base_patch14_dinov2", path, norm="imagenet", image_size=32, tiny=True)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        cls = reference.forward_features(images)[:, 0]  # the CLS token after the final norm
        assert torch.allclose(encoder(images, "photo")["embedding"], cls, atol=1e-5)
    assert encoder.embed_dim == TINY_TIMM["embed_dim"]
