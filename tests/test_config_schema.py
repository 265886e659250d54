"""Config schemas: every shipped config passes; each kind of mistake is named with its fix."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from zsbir._paths import config_dir
from zsbir.config import validate_config
from zsbir.errors import ConfigError


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


def problems(compose_cfg, *overrides: str) -> str:
    with pytest.raises(ConfigError) as raised:
        validate_config(compose_cfg(*overrides))
    return str(raised.value)


# options that are only valid together with another setting (each checked by its own test)
NEEDS = {"loss=[fg_relative]": ("data.balanced={classes_per_batch:4,items_per_class:2}",)}  # P x K batches


@pytest.mark.parametrize("override", [
    *(f"{group}={option}" for group in ("data", "model", "optim", "sched", "trainer", "logger", "paths", "debug")
      for option in group_options(group)),
    *(f"loss=[{option}]" for option in group_options("loss")),
    *(f"experiment={option}" for option in group_options("experiment")),
])
def test_every_shipped_config_option_is_valid(compose_cfg, override):
    """A schema that lags behind a config file fails here, naming the key to add to zsbir/config.py."""
    validate_config(compose_cfg(override, *NEEDS.get(override, ())))


def test_wrong_types_are_named_with_the_expected_type(compose_cfg):
    message = problems(compose_cfg, "trainer.max_epochs=ten", "trainer.resume=maybe", "eval.map_at=[all]",
                       "trainer.grad_clip=[1]")
    assert message.startswith("4 problems in the config: ")
    assert "trainer.max_epochs='ten': expected an integer" in message
    assert "trainer.resume='maybe': expected true or false" in message
    assert "trainer.grad_clip=[1]: expected a number or null" in message
    assert "eval.map_at=['all']: expected a list of integers" in message
    assert message.endswith("Fix them on the command line (key=value) or in the config file that sets them")


def test_choices_and_ranges(compose_cfg):
    message = problems(compose_cfg, "trainer.precision=fp8", "eval.protocol=trec", "sched.name=linear",
                       "data.augment=mixup", "trainer.device=gpu0", "data.batch_size=0",
                       "logger._target_=zsbir.tracking.mlflow.Tracker")
    assert "trainer.precision='fp8': must be one of bf16|fp16|fp32" in message
    assert "eval.protocol='trec': must be one of voc|plain" in message
    assert "sched.name='linear': must be one of constant|cosine|exp" in message
    assert "data.augment='mixup': must be one of none|flip|sake|dsn|clip" in message
    assert "trainer.device='gpu0': must be auto, cpu, mps, cuda or cuda:<index>" in message
    assert "data.batch_size=0: must be >= 2" in message
    assert "logger._target_='zsbir.tracking.mlflow.Tracker' cannot be imported" in message
    validate_config(compose_cfg("trainer.device=cuda:1", "trainer.precision=fp32"))


def test_unknown_keys_in_files_are_caught_with_a_suggestion(compose_cfg):
    """Hydra refuses `trainer.max_epoch=3`; a `+key`, or a typo inside a config file, reaches the schema."""
    message = problems(compose_cfg, "+trainer.max_epoch=3", "+data.batchsize=4", "+traner.seed=1",
                       "+data.synthetic.seen_class=3", "+data.lists.val_photo=x.txt")
    assert "unknown key trainer.max_epoch (did you mean trainer.max_epochs?)" in message
    assert "unknown key data.batchsize (did you mean data.batch_size?)" in message
    assert "unknown key traner (did you mean trainer?)" in message
    assert "unknown key data.synthetic.seen_class (did you mean data.synthetic.seen_classes?)" in message
    assert "unknown key data.lists.val_photo" in message


def test_instantiated_groups_are_checked_against_their_constructor(compose_cfg):
    message = problems(compose_cfg, "+model.embeding_dim=64", "+loss.triplet.margn=0.3", "loss.triplet.weight=heavy",
                       "optim._target_=torch.optim.Adamm", "+optim.betas2=0.9")
    assert "unknown key model.embeding_dim of zsbir.models.cnn.CNNEncoder (did you mean model.embed_dim?)" in message
    assert "unknown key loss.triplet.margn of zsbir.losses.triplet.TripletLoss (did you mean loss.triplet.margin?)" in message
    assert "loss.triplet.weight='heavy': expected a number" in message
    assert "optim._target_='torch.optim.Adamm' cannot be imported (No module named 'torch.optim.Adamm')" in message
    message = problems(compose_cfg, "model._target_=zsbir.models.nope.Encoder")
    assert "model._target_='zsbir.models.nope.Encoder' cannot be imported (No module named 'zsbir.models.nope')" in message


def test_missing_keys_and_empty_loss(compose_cfg):
    message = problems(compose_cfg, "~trainer.max_epochs", "~data.lists.zero_photo", "loss=[]")
    assert "trainer.max_epochs is missing (an integer)" in message
    assert "data.lists.zero_photo is missing (a string)" in message
    assert "the loss set is empty: select at least one term, e.g. loss=[triplet]" in message


def test_metric_names_must_be_ones_the_evaluator_reports(compose_cfg):
    message = problems(compose_cfg, "trainer.select_metric=map@all", "data.metrics=[map_all,prec_50]")
    assert "trainer.select_metric='map@all': the evaluator reports map_all|map_200|prec_100|prec_200" in message
    assert "data.metrics contains 'prec_50'" in message
    validate_config(compose_cfg("trainer.select_metric=prec_50", "eval.prec_at=[50]", "data.metrics=[prec_50]"))


def test_a_dataset_needs_a_root(compose_cfg):
    assert "data.root is null: set data.root=/path/to/the/dataset" in problems(compose_cfg, "data.synthetic=null")


def test_unresolvable_interpolation_names_the_key(compose_cfg):
    message = problems(compose_cfg, "paths.data_dir=${oc.env:ZSBIR_TEST_SURELY_UNSET}")
    assert re.search(r"cannot resolve config key paths.data_dir: .*ZSBIR_TEST_SURELY_UNSET", message)


@pytest.mark.parametrize("old,new", [("data.cache_images", "data.keep_decoded_in_memory"),
                                     ("data.image_cache", "data.preresized_folder")])
def test_a_renamed_key_is_refused_with_its_new_name(compose_cfg, tmp_path, old, new):
    import subprocess
    import sys

    from zsbir.config import refuse_renamed_keys
    from zsbir.data.prepare import compose as compose_prepare

    expected = f"{old} was renamed to {new}: set {new}=<value> instead"
    for override in (f"{old}=true", f"+{old}=x", f"++{old}=1", f"~{old}"):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            refuse_renamed_keys(["debug=smoke", override])
    with pytest.raises(ConfigError, match=re.escape(expected)):
        compose_prepare([f"{old}=true"])
    # in a config file (here an added key), the schema names the new key too
    assert expected in problems(compose_cfg, f"+{old}=true")
    # the entry point: one line on stderr, exit 1, before Hydra composes anything
    done = subprocess.run([sys.executable, "-m", "zsbir.train", f"{old}=true", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.strip() == f"ConfigError: {expected}"
    assert not (tmp_path / "run").exists()
