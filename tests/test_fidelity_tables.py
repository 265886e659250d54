"""The fidelity tables of docs/methods.md are the presets' specification: every `key=value` in
a table's "ours" column must hold in the composed config of that preset with every dataset."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

METHODS_DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
PRESETS = ("dann", "sake", "dsn", "sketch_lvm", "puxim", "ma_zs_sbir", "zse_sbir", "sketch_lvm_fg")
DATASETS = ("sketchy", "sketchy_split2", "tuberlin", "quickdraw")
DATASETS_OF = {"sketch_lvm_fg": ("sketchy_fg",)}  # fine-grained presets need sketch-photo instance pairs
# every table names these settings (first column, by prefix) ...
REQUIRED_ROWS = ("architecture", "encoder calls per step", "trainable set", "loss:", "optimiser", "learning rate",
                 "schedule", "warm-up", "gradient clipping", "epochs", "batch composition", "steps per epoch",
                 "augmentation", "normalisation", "resize / pad", "training precision", "evaluation precision",
                 "evaluation protocol", "model selection")
# ... and states these keys
REQUIRED_KEYS = ("model.name", "model.encode", "optim._target_", "optim.weight_decay", "sched.name",
                 "sched.warmup_steps", "sched.warmup_fraction", "trainer.grad_clip", "data.sampler", "data.augment",
                 "model.norm", "data.image_size", "eval.precision", "eval.protocol", "trainer.select_metric",
                 "steps_per_epoch")
TUBERLIN_TRAIN_PHOTOS = 176_500  # built from the class folders, not listed (docs/datasets.md: about 176.5k)
ASSERTION = re.compile(r"`([A-Za-z_][\w.]*)=([^`]*)`(?:\s*\[([^\]]*)\])?")


def fidelity_tables() -> dict[str, list[list[str]]]:
    """preset -> table rows (lists of cells) of its `### Fidelity: <preset>` section."""
    tables: dict[str, list[list[str]]] = {}
    preset = None
    for line in METHODS_DOC.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"#{2,3} (.*)", line)
        if heading:
            found = re.fullmatch(r"Fidelity: (\w+)", heading.group(1).strip())
            preset = found.group(1) if found else None
            if preset:
                tables[preset] = []
        elif preset and line.startswith("|") and not re.match(r"\|\s*-", line):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0] != "setting":
                tables[preset].append(cells)
    return tables


def assertions(rows: list[list[str]], every=DATASETS) -> list[tuple[str, str, tuple[str, ...]]]:
    """(key, value text, datasets it applies to) for every `key=value` of the "ours" column."""
    found = []
    for row in rows:
        for key, value, where in ASSERTION.findall(row[2]):
            datasets = tuple(d.strip() for d in where.split(",")) if where else every
            found.append((key, value, datasets))
    return found


def parse_value(text: str):
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-06 as a string
        except ValueError:
            return value
    return value


def steps_per_epoch(cfg) -> int:
    """Training steps of one epoch from the dataset's documented counts and the batch composition."""
    counts = cfg.data.counts
    sketches = int(counts.train_sketch)
    if not cfg.data.lists.get("val_sketch"):  # no validation list: the loader holds out val_fraction of the sketches
        sketches -= int(sketches * float(cfg.data.val_fraction))
    photos = int(counts.train_photo) if counts.train_photo is not None else TUBERLIN_TRAIN_PHOTOS
    if cfg.data.sampler == "streams":
        steps = min(sketches // int(cfg.data.stream_batch.sketch), photos // int(cfg.data.stream_batch.photo))
    else:
        balanced = cfg.data.get("balanced")
        batch = (int(balanced.classes_per_batch) * int(balanced.items_per_class) if balanced
                 else int(cfg.data.batch_size))
        steps = sketches // batch
    limit = cfg.trainer.get("limit_train_batches")  # a preset's fixed epoch length (ZSE-SBIR: 666)
    return min(steps, int(limit)) if limit else steps


def test_every_preset_has_a_complete_fidelity_table():
    tables = fidelity_tables()
    assert sorted(tables) == sorted(PRESETS)
    for preset, rows in tables.items():
        assert all(len(row) == 4 for row in rows), f"{preset}: rows must have 4 cells"
        names = [row[0] for row in rows]
        missing = [r for r in REQUIRED_ROWS if not any(n.startswith(r) for n in names)]
        assert not missing, f"{preset}: the fidelity table lacks the rows {missing}"
        assert all(row[1] for row in rows), f"{preset}: every row names the official value (or —)"
        keys = {key for key, _, _ in assertions(rows)}
        assert not set(REQUIRED_KEYS) - keys, f"{preset}: the table states no value for {set(REQUIRED_KEYS) - keys}"
        for _, _, datasets in assertions(rows, DATASETS_OF.get(preset, DATASETS)):
            assert set(datasets) <= set(DATASETS_OF.get(preset, DATASETS)), f"{preset}: unknown dataset in {datasets}"


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_compose_to_the_values_their_fidelity_table_states(preset, compose_cfg):
    from zsbir.config import validate_config

    datasets_of_preset = DATASETS_OF.get(preset, DATASETS)
    stated = assertions(fidelity_tables()[preset], datasets_of_preset)
    checked = 0
    for dataset in datasets_of_preset:
        cfg = compose_cfg(f"experiment={preset}", f"data={dataset}", "paths.data_dir=/data")
        validate_config(cfg)
        for key, text, datasets in stated:
            if dataset not in datasets:
                continue
            expected = parse_value(text)
            if key == "steps_per_epoch":
                if cfg.data.counts.train_sketch is None:  # QuickDraw's training lists are built: no count
                    continue
                actual = steps_per_epoch(cfg)
            else:
                node = OmegaConf.select(cfg, key, default="<absent>")
                actual = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
            if isinstance(expected, float) and not isinstance(actual, bool):
                assert actual == pytest.approx(expected), f"{preset} data={dataset}: {key}={actual!r}, table: {text}"
            else:
                assert actual == expected, f"{preset} data={dataset}: {key}={actual!r}, table: {text}"
            checked += 1
    assert checked >= 20 * len(datasets_of_preset) - 10, f"{preset}: only {checked} values checked"


def test_stated_value_parser_reads_the_tables_notation():
    rows = [["x", "y", "`a.b=1e-06` `c=[sketch, photo]` `d=null` [tuberlin] `e=torch.optim.Adam`", ""]]
    assert [(k, parse_value(v), d) for k, v, d in assertions(rows)] == [
        ("a.b", 1e-6, DATASETS), ("c", ["sketch", "photo"], DATASETS), ("d", None, ("tuberlin",)),
        ("e", "torch.optim.Adam", DATASETS)]
