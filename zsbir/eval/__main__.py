"""Re-evaluate a training run: `python -m zsbir.eval run_dir=<run dir> [ckpt=best|last|<file>] [data=<dataset>]`.

The run's saved `config.yaml` says how to rebuild its encoder (`build_encoder`, no model
class is imported here) and which data it was trained on; `data=<dataset>` evaluates on
another dataset instead, at the run's input size (`image_size=` overrides it). Results go
to `<run_dir>/eval/<dataset>-<ckpt>/`: `eval_metrics.json`, `results.txt` and `grids/`.

Query and gallery embeddings are cached in `<run_dir>/embeddings/<key>.pt`. The key is a
SHA-256 of the checkpoint FILE BYTES (any re-saved or retrained checkpoint is a new key)
and of what the embeddings depend on: dataset root, both file lists (paths and labels, in
order), input size, normalisation and autocast precision. A stale cache can therefore
never be reused; an unreadable cache file is recomputed. Hashing streams the file: 0.9 s
per 256 MiB measured on a loaded 2-core VM, about a second for a ResNet-50 checkpoint with
its optimizer state, against minutes of embedding.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from zsbir._paths import config_dir
from zsbir.config import refuse_renamed_keys_on_command_line
from zsbir.errors import ZsbirError, exit_on_user_error
from zsbir.eval.protocols import PROTOCOLS

log = logging.getLogger("zsbir.eval")

CACHE_FORMAT = 2  # bump when the cached tensors or the key's contents change meaning


class RunDirError(ZsbirError):
    """`run_dir` is not a usable training run directory; the message says what is missing."""


def run_eval(cfg: DictConfig) -> dict:
    from zsbir.config import validate_eval_options
    from zsbir.data.datamodule import load_split
    from zsbir.engine.checkpoint import CheckpointError, load_checkpoint, save_atomic
    from zsbir.engine.device import amp_dtype, pick_device
    from zsbir.eval.crossdata import drop_training_classes, training_class_names
    from zsbir.eval.evaluator import Evaluator
    from zsbir.eval.protocols import selected_protocols
    from zsbir.eval.rerank import RESULT_KEY as RERANK_KEY
    from zsbir.eval.rerank import RerankError, check_pair_model, evaluate_rerank, rerank_settings, rerank_table
    from zsbir.eval.retrieval import Embeddings
    from zsbir.models.encoder import build_encoder

    validate_eval_options(cfg.eval)  # a typo must not cost an embedding pass
    rerank = rerank_settings(cfg.eval)  # relation-network mode (eval.rerank), null: off
    if not cfg.get("run_dir"):
        raise RunDirError("no run directory given: python -m zsbir.eval run_dir=<a training run directory> "
                          "(the folder a `python -m zsbir.train` run wrote)")
    run_dir = Path(str(cfg.run_dir)).expanduser().resolve()
    run_cfg = load_run_config(run_dir)
    ckpt_path, ckpt_label = resolve_checkpoint(run_dir, str(cfg.ckpt))
    state = load_checkpoint(ckpt_path, fix="pass another checkpoint (ckpt=best, ckpt=last or ckpt=<file>)")
    check_model_fingerprint(state, run_cfg.model, ckpt_path, run_dir)

    data_cfg = OmegaConf.create(OmegaConf.to_container(cfg.data if cfg.get("data") else run_cfg.data, resolve=True))
    data_cfg.image_size = int(cfg.image_size or run_cfg.data.image_size)
    data = load_split(data_cfg, seed=int(run_cfg.seed))

    device = pick_device(str(cfg.device))
    # The run's evaluation precision (fp32 unless the run opted in to eval.precision=bf16),
    # not its training autocast.
    requested = str(cfg.precision or (run_cfg.get("eval") or {}).get("precision") or "fp32")
    model_cfg = OmegaConf.to_container(run_cfg.model, resolve=True)
    if "pretrained" in model_cfg:
        model_cfg["pretrained"] = None  # every weight comes from the checkpoint: no download, no weight file
    encoder = build_encoder(OmegaConf.create(model_cfg), int(state["fingerprint"]["seen_classes"]))
    try:
        encoder.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt_path} does not fit the model of {run_dir / 'config.yaml'}: {err}") from None
    encoder.to(device)
    if rerank:
        check_pair_model(encoder)
        if "zs" not in selected_protocols(cfg.eval):
            raise RerankError("eval.rerank re-ranks the zs protocol: add zs to eval.protocols")
    excluded = []
    if cfg.eval.get("exclude_train_classes"):
        data, excluded = drop_training_classes(data, training_class_names(run_cfg.data))
        log.info("eval.exclude_train_classes: dropped %d test classes the run trained on: %s", len(excluded), excluded)
    names = selected_protocols(cfg.eval)
    evaluator = Evaluator(data, data_cfg, cfg.eval, encoder.norm, device, amp_dtype(requested, device), protocol=names[0])

    checkpoint_sha256 = file_sha256(ckpt_path)
    embeddings, cache_paths = {}, {}
    for name in names:
        task = evaluator.for_protocol(name).task("test")
        key = embedding_cache_key(checkpoint_sha256, data.root, task.queries, task.gallery, data_cfg.image_size,
                                  encoder.norm, evaluator.precision, (task.query_domain, task.gallery_domain))
        cache_paths[name] = run_dir / "embeddings" / f"{key}.pt"
        cached = load_cached_embeddings(cache_paths[name]) if cfg.cache else None
        if cached is not None:
            embeddings[name] = Embeddings(**cached)
            log.info("%s embeddings: reusing %s", name, cache_paths[name])
    missing = [name for name in names if name not in embeddings]
    if missing:
        embeddings.update(embed_split(evaluator, encoder, missing))
        for name in missing if cfg.cache else []:
            save_atomic(embeddings[name].state_dict(), cache_paths[name])
            log.info("%s embeddings: computed and cached in %s", name, cache_paths[name])

    results = {name: (evaluator.for_protocol(name).score(embeddings[name]), embeddings[name]) for name in names}
    out_dir = run_dir / "eval" / f"{data.name}-{ckpt_label}"
    drawn = evaluator.grids_protocol(names)
    grids = evaluator.for_protocol(drawn).write_grids(embeddings[drawn], out_dir / "grids") if drawn else []
    step = state.get("step")
    table = evaluator.tables(results, f"{ckpt_label} ({ckpt_path.name}, step {step})")
    headline = results[names[0]][0]
    result = {
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt_path),
        "checkpoint_sha256": checkpoint_sha256,
        "step": step,
        "dataset": data.name,
        "trained_on": str(run_cfg.data.name),
        "model": run_cfg.model.get("name"),
        "image_size": int(data_cfg.image_size),
        "norm": encoder.norm,
        "precision": evaluator.precision,
        **evaluator.describe(),
        "protocols": names,
        **evaluator.results_by_key(results),
        "n_queries": headline["n_queries"],  # of the first protocol; each protocol's own are in its metrics
        "n_gallery": headline["n_gallery"],
        "excluded_classes": excluded,
        "embeddings_cache": str(cache_paths[names[0]].relative_to(run_dir)) if cfg.cache else None,
        "embeddings_caches": {n: str(p.relative_to(run_dir)) for n, p in cache_paths.items()} if cfg.cache else None,
        "embeddings_reused": not missing,
        "retrieval_grids": [str(p.relative_to(run_dir)) for p in grids],
        "eval": OmegaConf.to_container(cfg.eval, resolve=True),
    }
    if rerank:  # relation-network mode of pair models, beside the retrieval-mode metrics
        result[RERANK_KEY] = evaluate_rerank(evaluator.for_protocol("zs"), encoder, embeddings["zs"], rerank)
        table += "\n\n" + rerank_table(evaluator, f"{ckpt_label} ({ckpt_path.name}, step {step})", result[RERANK_KEY])
    evaluator.write_results(out_dir, "eval_metrics.json", result, table)
    log.info("\n%s\nresults in %s", table, out_dir)
    return result


def embed_split(evaluator, encoder, names: list[str]) -> dict:
    """{protocol: embeddings} of the test split, one shared pass (a module-level name, so tests can count the calls)."""
    return evaluator.embed_protocols(encoder, names, "test")


def load_run_config(run_dir: Path) -> DictConfig:
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise RunDirError(
            f"{run_dir} is not a training run directory: it has no config.yaml. Pass the folder a "
            "`python -m zsbir.train` run wrote (it holds config.yaml, best.pt, metrics.json): run_dir=<that folder>"
        )
    try:
        return OmegaConf.load(config)
    except Exception as err:  # a YAML syntax error, an unreadable or binary file
        detail = " ".join(str(err).split())
        raise RunDirError(f"cannot read {config}: {detail}. Restore it (the run's checkpoints also hold the config), "
                          "or pass another run_dir") from None


def resolve_checkpoint(run_dir: Path, ckpt: str) -> tuple[Path, str]:
    """(checkpoint path, label for output folders): `best`, `last`, or a file (absolute, or relative to cwd or run_dir)."""
    if ckpt in ("best", "last"):
        path = run_dir / f"{ckpt}.pt"
        if not path.is_file():
            raise RunDirError(f"{path} does not exist: the run has no {ckpt}.pt yet (it may still be training "
                              "or have crashed before it); pass ckpt=last or ckpt=<checkpoint file>")
        return path, ckpt
    path = Path(ckpt).expanduser()
    for candidate in (path, run_dir / path):
        if candidate.is_file():
            return candidate.resolve(), re.sub(r"[^A-Za-z0-9_.-]+", "-", candidate.stem)
    raise RunDirError(f"checkpoint {ckpt!r} not found (looked at {path.resolve()} and {run_dir / path}); "
                      "use ckpt=best, ckpt=last or an existing file")


def check_model_fingerprint(state: dict, model_cfg, ckpt_path: Path, run_dir: Path) -> None:
    """The checkpoint must come from the run's model config (the model part of the training fingerprint)."""
    from zsbir.engine.checkpoint import check_fingerprint

    check_fingerprint(state, {"model": OmegaConf.to_container(model_cfg, resolve=True)}, ckpt_path,
                      f"Evaluate it with the run directory that wrote it, not {run_dir}")


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def embedding_cache_key(checkpoint_sha256: str, root, query_list, gallery_list, image_size: int, norm: str,
                        precision: str, domains: tuple[str, str] = ("sketch", "photo")) -> str:
    """SHA-256 (first 24 hex digits) of everything the embeddings depend on."""
    content = {
        "format": CACHE_FORMAT,
        "checkpoint_sha256": checkpoint_sha256,
        "root": str(Path(root).resolve()),
        "queries": [query_list.paths, query_list.labels],
        "gallery": [gallery_list.paths, gallery_list.labels],
        "domains": list(domains),  # PBIR embeds its queries as photos
        "transform": {"image_size": int(image_size), "norm": norm, "precision": precision},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:24]


def load_cached_embeddings(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated by a crash, or written by another version: recompute
        log.warning("embedding cache %s is unreadable (%s); recomputing", path, err)
        return None
    expected = {"queries", "query_labels", "gallery", "gallery_labels"}
    return cached if isinstance(cached, dict) and set(cached) == expected else None


@hydra.main(config_path=config_dir(), config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> float:
    result = exit_on_user_error(lambda: run_eval(cfg), log)
    first = PROTOCOLS[result["protocols"][0]]
    return float(result[first.result_key][first.headline_metric])


if __name__ == "__main__":
    refuse_renamed_keys_on_command_line()
    main()
