"""The Hydra config tree ships inside a normal (non-editable) wheel and is found from it."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("hatchling", reason="the dev extra (hatchling) builds the wheel offline")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True)
    (found,) = out.glob("zsbir-*.whl")
    return found


def test_wheel_carries_every_config_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"zsbir/configs/{p.relative_to(REPO / 'configs').as_posix()}" for p in (REPO / "configs").rglob("*.yaml")}
    assert expected and expected <= names


def test_installed_wheel_finds_and_composes_its_configs(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True)
    probe = (
        "import zsbir, zsbir._paths as p\n"
        "from hydra import compose, initialize_config_dir\n"
        "d = p.config_dir()\n"
        "assert d.startswith(zsbir.__path__[0]), (d, zsbir.__path__)\n"
        "with initialize_config_dir(config_dir=d, version_base='1.3'):\n"
        "    cfg = compose('train', overrides=['model=resnet50', 'debug=smoke'])\n"
        "print(d, cfg.model.name)\n"
    )
    # Run from an empty folder, with only the installed copy importable (not this checkout).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r})\n" + probe],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0].startswith(str(site)) and result.stdout.split()[1] == "resnet50"


def test_wheel_carries_the_class_masks(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"zsbir/data/class_masks/{p.name}" for p in (REPO / "zsbir/data/class_masks").glob("*.json")}
    assert len(shipped) == 4 and shipped <= names
