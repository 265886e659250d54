"""Pretrained weights: a timm / open_clip tag, a local file or folder, or none.

`model.pretrained` is resolved in this order:
- null: random initialisation;
- an existing local path: a state-dict file (`.safetensors`, or `.pth`/`.bin`/`.pt` read
  with `torch.load(weights_only=True)`), or a folder holding one (`model.safetensors`,
  `pytorch_model.bin`, `open_clip_model.safetensors`, ...: a timm / HF hub snapshot);
- otherwise a library tag (`resnet50.tv_in1k`, `openai`): taken from the local cache
  when it is there, downloaded by timm / open_clip when the machine is online, and
  otherwise a `MissingWeightsError` is raised at once, naming the weights and the ways to
  provide them. Nothing here retries or waits on a dead network: offline is decided up
  front from `HF_HUB_OFFLINE` (or one connection probe of at most `PROBE_TIMEOUT_S`).

On a networked machine, `python -m zsbir.models.weights timm legacy_seresnet50.in1k
se50.safetensors` (or `open_clip ViT-B-32-quickgelu openai clip.safetensors`) writes a
file to copy to an offline cluster and pass as `model.pretrained=/path/to/file`.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from zsbir.errors import MissingWeightsError

PROBE_HOST = ("huggingface.co", 443)
PROBE_TIMEOUT_S = 1.0
_TRUE = ("1", "true", "yes", "on")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ZSBIR_OFFLINE")
# Files a weights folder may hold, best first (timm / HF hub and open_clip names).
WEIGHT_FILES = (
    "model.safetensors",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
_online: bool | None = None


def _missing(what: str, save_cmd: str, reason: str) -> MissingWeightsError:
    return MissingWeightsError(
        f"pretrained weights {what} are not available: {reason}. Provide them with "
        f"`model.pretrained=/path/to/file` (a state-dict .safetensors/.pth/.bin file, or a folder "
        f"with model.safetensors / pytorch_model.bin), written on a networked machine by "
        f"`{save_cmd}`; or run once with network so that the library caches them; or set "
        f"`model.pretrained=null` for random initialisation."
    )


def is_offline() -> bool:
    """True when downloads must not be attempted (decided once, quickly)."""
    global _online
    if any(os.environ.get(var, "").strip().lower() in _TRUE for var in _OFFLINE_VARS):
        return True
    if _online is None:
        result: list[bool] = []

        def probe():  # in a thread so that a hanging DNS lookup cannot hold us up
            try:
                socket.create_connection(PROBE_HOST, timeout=PROBE_TIMEOUT_S).close()
                result.append(True)
            except OSError:
                result.append(False)

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(PROBE_TIMEOUT_S + 0.2)
        _online = bool(result and result[0])
        if not _online:
            # later imports of huggingface_hub (and the libraries using it) stay offline too
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return not _online


def local_weights_path(pretrained: str | None) -> Path | None:
    """The weight file `pretrained` names on this machine, or None if it is not a local path."""
    if pretrained is None:
        return None
    path = Path(str(pretrained)).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + sorted(path.glob("*.pth"))
        if len(found) == 1:
            return found[0]
        raise MissingWeightsError(
            f"model.pretrained={pretrained} is a folder but holds no single weight file "
            f"(looked for {', '.join(WEIGHT_FILES)}; found {[p.name for p in found]})"
        )
    if os.sep in str(pretrained) or str(pretrained).endswith((".safetensors", ".pth", ".bin", ".pt")):
        raise MissingWeightsError(
            f"model.pretrained={pretrained}: no such file or folder. Pass an existing weight file or folder, "
            "a library tag, or model.pretrained=null for random initialisation"
        )
    return None


def tiny_weights_fit(pretrained: str | None) -> bool:
    """A tiny (shrunk, model.tiny=true) network takes random weights or a local file, never a published tag."""
    return pretrained is None or local_weights_path(pretrained) is not None


def check_tiny_pretrained(pretrained: str | None, key: str = "model.pretrained", error: type = ValueError) -> None:
    """Raise `error` naming `key` when a tiny network is given a published weights tag."""
    if not tiny_weights_fit(pretrained):
        raise error(f"{key.rpartition('.')[0]}.tiny=true builds a shrunk random network; the pretrained tag "
                    f"{pretrained!r} does not fit it: set {key}=null (or a file saved from a tiny model)")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file, safely: safetensors, or torch.load(weights_only=True).

    Unwraps `{"state_dict": ...}` / `{"model": ...}` checkpoints and a DDP `module.` prefix.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                          ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load `state` into `model`; every model weight must be present.

    Keys starting with one of `ignore_prefixes` (a classifier the model was built without)
    may be in the file and are skipped; any other mismatch is an error naming the keys,
    so that a file for the wrong architecture never loads silently.
    """
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        def show(keys):
            return f"{keys[:6]}{'...' if len(keys) > 6 else ''} ({len(keys)})"

        raise ValueError(
            f"weights in {source} do not fit {type(model).__name__}: missing {show(missing)}, "
            f"unexpected {show(unexpected)}, wrong shape {show(wrong_shape)}"
        )
    model.load_state_dict(state)


# ---------------------------------------------------------------- timm


def load_timm_file(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local file into a timm-style model (one with `pretrained_cfg` and `num_classes`).

    The file's classifier is skipped when the model was built without one (num_classes=0).
    """
    classifier = model.pretrained_cfg.get("classifier") if model.num_classes == 0 else None
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    ignore = tuple(f"{c}." for c in classifiers)
    load_backbone_weights(model, load_state_dict_file(path), str(path), ignore_prefixes=ignore)
    return model


def _timm_cached_file(pretrained_cfg) -> str | None:
    """The locally cached weight file of a timm pretrained config, if any."""
    if pretrained_cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        names = [pretrained_cfg.hf_hub_filename] if pretrained_cfg.hf_hub_filename else []
        for name in names + ["model.safetensors", "pytorch_model.bin"]:
            repo, _, revision = pretrained_cfg.hf_hub_id.partition("@")
            found = try_to_load_from_cache(repo, name, revision=revision or None)
            if isinstance(found, str):
                return found
    if pretrained_cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(pretrained_cfg.url).path).name
        if cached.is_file():
            return str(cached)
    return None


def create_timm_model(arch: str, pretrained: str | None = None, **kwargs) -> nn.Module:
    """A timm model `arch` with weights from `pretrained` (see the module docstring).

    A tag is either a full timm name (`resnet50.tv_in1k`) or just the tag (`tv_in1k`).
    A local file must hold the timm model's own state dict (what `model.state_dict()` of
    `timm.create_model(arch)` writes, or timm's hub files); a classifier in it is dropped
    when the model is built without one.
    """
    import timm

    if pretrained is None:
        return timm.create_model(arch, pretrained=False, **kwargs)
    path = local_weights_path(pretrained)
    if path is not None:
        return load_timm_file(timm.create_model(arch, pretrained=False, **kwargs), path)

    tag = str(pretrained)
    name = tag if tag.split(".")[0] == arch.split(".")[0] else f"{arch.split('.')[0]}.{tag}"
    try:
        pretrained_cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    except RuntimeError:
        pretrained_cfg = None
    if pretrained_cfg is None or not (pretrained_cfg.hf_hub_id or pretrained_cfg.url or pretrained_cfg.file):
        raise ValueError(
            f"model.pretrained={tag!r} is neither a local file nor a timm tag of {arch}; "
            f"known tags: {timm.list_pretrained(arch.split('.')[0] + '.*')}"
        )
    save_cmd = f"python -m zsbir.models.weights timm {name} {name}.safetensors"
    cached = _timm_cached_file(pretrained_cfg)
    if cached is not None:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs)
    if is_offline():
        raise _missing(f"'{name}' (timm)", save_cmd, "this machine is offline and they are not in the timm/HF cache")
    return timm.create_model(name, pretrained=True, **kwargs)


# ---------------------------------------------------------------- open_clip


def open_clip_checkpoint(model_name: str, pretrained: str | None) -> str | None:
    """A local checkpoint file for `open_clip.create_model(model_name, pretrained=...)`.

    None for random initialisation; the user's file; the cached file of a tag; else the
    tag is downloaded through open_clip when online, or MissingWeightsError offline.
    """
    if pretrained is None:
        return None
    path = local_weights_path(pretrained)
    if path is not None:
        return str(path)
    import open_clip

    tag = str(pretrained)
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        raise ValueError(
            f"model.pretrained={tag!r} is neither a local file nor an open_clip tag of {model_name}; "
            f"known tags: {open_clip.list_pretrained_tags_by_model(model_name)}"
        )
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        for name in ["open_clip_model.safetensors", filename or "open_clip_pytorch_model.bin"]:
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str):
                return found
    what = f"'{model_name}' / '{tag}' (open_clip)"
    save_cmd = f"python -m zsbir.models.weights open_clip {model_name} {tag} clip_{tag}.safetensors"
    if is_offline():
        raise _missing(what, save_cmd, "this machine is offline and they are not in the HF cache")
    return open_clip.download_pretrained(cfg) or None


def _save(args: list[str]) -> None:
    """`timm NAME OUT` or `open_clip MODEL TAG OUT`: download weights and write a safetensors file."""
    from safetensors.torch import save_file

    if len(args) == 3 and args[0] == "timm":
        import timm

        model = timm.create_model(args[1], pretrained=True)
    elif len(args) == 4 and args[0] == "open_clip":
        import open_clip

        model = open_clip.create_model(args[1], pretrained=args[2])
    else:
        sys.exit(__doc__ + "\nusage: python -m zsbir.models.weights timm NAME OUT | open_clip MODEL TAG OUT")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, args[-1])
    print(f"wrote {len(state)} tensors to {args[-1]}; use model.pretrained={Path(args[-1]).resolve()}")


if __name__ == "__main__":
    _save(sys.argv[1:])
