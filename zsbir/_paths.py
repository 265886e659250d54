"""Where the Hydra config tree lives, in a source checkout and in an installed wheel."""
from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """Absolute path of the `configs/` tree.

    A source checkout (or editable install) keeps it at the repository top level; a wheel
    carries a copy inside the package (see `force-include` in pyproject.toml).
    """
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "configs", package / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"zsbir's config tree was not found next to {package} (looked for configs/train.yaml); "
        "reinstall the package with `pip install .`"
    )
