"""Config schemas: the composed config is checked before any work starts.

Hydra already refuses unknown keys in command-line overrides; these schemas also catch
what it lets through: typos in config files and presets, values of the wrong type, values
outside their allowed choices or range, and metric names the evaluator does not produce.
Every problem is reported at once, each naming the key, the bad value and what is expected.

Groups with fixed keys (`trainer`, `eval`, `sched`, `paths`, `logger`, the keys every
dataset shares in `data`) have a dataclass schema below; a new option is added to its
schema together with the code that reads it. Groups that are instantiated from a
`_target_` (`model`, `optim`, every `loss` term) are checked against the target's
constructor signature instead, so their schema is the code itself.
"""
import dataclasses
import difflib
import inspect
import logging
import re
import sys
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from zsbir.choices import (AUGMENT_RECIPES, ENCODE_MODES, EVAL_PROTOCOLS, FG_GALLERIES, GZS_SOURCES, LR_SCHEDULES,
                           RERANK_MODES, SyntheticFgSpec, SyntheticSpec, metric_names)
from zsbir.errors import ConfigError


def option(default: Any = MISSING, *, choices: tuple | None = None, minimum: float | None = None,
           maximum: float | None = None, pattern: tuple[str, str] | None = None):
    """A schema field. Without a default the key is required (the code reads it unguarded); a
    default is what the code assumes when the key is absent. `pattern`: (full-match regex, its
    meaning in words).
    """
    return field(default=default, metadata={"choices": choices, "minimum": minimum, "maximum": maximum,
                                            "pattern": pattern})


@dataclass(kw_only=True)
class TrainerSchema:
    device: str = option(pattern=(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, mps, cuda or cuda:<index>"))
    precision: str = option(choices=("bf16", "fp16", "fp32"))
    max_epochs: int = option(minimum=1)
    max_steps: Optional[int] = option(None, minimum=0)  # 0: evaluate the network as built, no training
    limit_train_batches: Optional[int] = option(None, minimum=1)
    grad_clip: Optional[float] = option(minimum=0)
    log_every: int = option(minimum=1)
    val_every_epochs: int = option(minimum=1)
    select_metric: str = option()
    ckpt_every_s: Optional[float] = option(None, minimum=0)
    ckpt_every_steps: Optional[int] = option(None, minimum=1)
    resume: bool = option()
    skip_nonfinite: bool = option()
    skip_nonfinite_max_fraction: float = option(0.2, minimum=0, maximum=1)
    skip_nonfinite_window: int = option(50, minimum=1)
    overwrite: bool = option(False)
    progress_bar: bool = option()
    # scale (docs/distributed.md): launch, DDP and speed options
    distributed: str = option("auto", choices=("auto", "off"))
    dist_timeout_s: float = option(1800, minimum=1)
    ddp_find_unused_parameters: bool = option(False)
    sync_bn: bool = option(False)
    channels_last: bool = option(False)
    fused_optimizer: bool = option(True)
    compile: bool = option(False)
    compile_backend: str = option("inductor")
    grad_checkpointing: bool = option(False)


@dataclass(kw_only=True)
class BinarySchema:
    enabled: bool = option(False)
    bits: int = option(64, minimum=1)
    fit_on: str = option("gallery", choices=("gallery", "queries", "all"))
    iterations: int = option(50, minimum=1)
    seed: int = option(0, minimum=0)


@dataclass(kw_only=True)
class GzsSchema:
    fraction: float = option(0.2, minimum=0, maximum=1)
    seed: int = option(0, minimum=0)
    source: str = option("train", choices=GZS_SOURCES)


@dataclass(kw_only=True)
class PbirSchema:
    queries_per_class: int = option(10, minimum=1)


@dataclass(kw_only=True)
class FgSchema:  # fine-grained protocol (eval.protocols=[..., fg]; docs/metrics.md)
    gallery: str = option("category", choices=FG_GALLERIES)
    ks: Optional[List[int]] = option(None)  # acc@K cut-offs; null: [1, 5]


@dataclass(kw_only=True)
class GridsSchema:
    protocol: str = option("zs", choices=EVAL_PROTOCOLS)
    queries: int = option(8, minimum=0)
    top_k: int = option(10, minimum=1)
    seed: int = option(0, minimum=0)
    tile: int = option(96, minimum=8)


@dataclass(kw_only=True)
class RerankSchema:  # relation-network evaluation (zsbir/eval/rerank.py)
    mode: Optional[str] = option(None, choices=RERANK_MODES)
    top_n: int = option(100, minimum=1)
    pair_batch: int = option(128, minimum=1)
    token_dtype: str = option("fp16", choices=("fp32", "fp16", "bf16"))
    token_store: str = option("disk", choices=("disk", "memory"))
    token_dir: Optional[str] = option(None)


@dataclass(kw_only=True)
class EvalSchema:
    protocol: str = option(choices=("voc", "plain"))
    map_at: List[int] = option()
    prec_at: List[int] = option()
    per_class: bool = option()
    chunk_size: Optional[int] = option(None, minimum=1)
    protocols: Optional[List[str]] = option(None)  # absent: [zs]
    gzs: Optional[GzsSchema] = option(None)
    pbir: Optional[PbirSchema] = option(None)
    fg: Optional[FgSchema] = option(None)
    exclude_train_classes: bool = option(False)
    before_training: bool = option()
    binary: Optional[BinarySchema] = option(None)
    grids: Optional[GridsSchema] = option(None)
    precision: str = option("fp32", choices=("fp32", "bf16", "fp16"))  # embeddings; autocast on CUDA only
    rerank: Optional[RerankSchema] = option(None)


@dataclass(kw_only=True)
class SchedSchema:
    name: str = option(choices=LR_SCHEDULES)
    warmup_steps: int = option(0, minimum=0)
    warmup_fraction: float = option(0.0, minimum=0, maximum=1)
    min_lr_ratio: float = option(0.0, minimum=0, maximum=1)
    final_ratio: float = option(1e-3, minimum=0)


@dataclass(kw_only=True)
class PathsSchema:
    data_dir: str = option()
    cache_dir: str = option()
    output_dir: str = option()


@dataclass(kw_only=True)
class ListsSchema:
    """File-list names inside the split folder; null where a dataset has no such list."""

    train_sketch: Optional[str] = option()
    train_photo: Optional[str] = option()
    val_sketch: Optional[str] = option(None)
    zero_sketch: str = option()
    zero_photo: str = option()


@dataclass(kw_only=True)
class BalancedSchema:
    classes_per_batch: int = option(minimum=1)
    items_per_class: int = option(minimum=1)


@dataclass(kw_only=True)
class StreamBatchSchema:
    sketch: int = option(minimum=1)
    photo: int = option(minimum=1)


@dataclass(kw_only=True)
class FineGrainedSchema:  # data.fine_grained: instance pairs (zsbir/data/instances.py)
    photo_folder: Optional[str] = option(None)  # only photos under this folder pair with sketches; null: any
    counts: Optional[Dict[str, Optional[int]]] = option(None)  # photos with sketches: {train_photo, zero_photo}


@dataclass(kw_only=True)
class DataSchema:
    """Keys every dataset config shares (zsbir/data/datamodule.py reads them)."""

    name: str = option()
    root: Optional[str] = option(None)
    cache_dir: Optional[str] = option(None)
    split_dir: str = option()
    synthetic: Optional[SyntheticSpec] = option(None)
    synthetic_fg: Optional[SyntheticFgSpec] = option(None)  # the generated fine-grained benchmark
    fine_grained: Optional[FineGrainedSchema] = option(None)  # sketch-photo instance pairs (data=sketchy_fg)
    lists: ListsSchema = option()
    counts: Optional[Dict[str, Optional[int]]] = option(None)
    metrics: List[str] = option()
    image_size: int = option(minimum=1)
    augment: str = option(choices=AUGMENT_RECIPES)
    augment_views: Optional[str] = option(None, choices=AUGMENT_RECIPES)  # recipe of the extra views (_v2, _v3)
    sampler: str = option("triplets", choices=("triplets", "streams", "instances"))
    stream_batch: Optional[StreamBatchSchema] = option(None)  # data.sampler=streams: images per step
    by_dataset: Optional[Dict[str, Any]] = option(None)  # presets: {dataset name: values that differ per dataset}
    batch_size: int = option(minimum=2)  # BatchNorm and in-batch negatives need two items
    eval_batch_size: int = option(minimum=1)
    num_workers: int = option(minimum=0)
    keep_decoded_in_memory: bool = option(False)
    val_fraction: float = option(0.1, minimum=0, maximum=1)
    val_gallery_size: int = option(minimum=1)
    max_per_class: Optional[int] = option(None, minimum=1)
    balanced: Optional[BalancedSchema] = option(None)
    folders: Optional[Dict[str, str]] = option(None)  # list key -> image folder, for built train lists
    folder_extensions: Optional[List[str]] = option(None)
    preresized_folder: Optional[str] = option(None)
    gpu_augment: bool = option(False)  # augmentation and normalisation on the training device
    strict: bool = option(True)
    download: Optional[Dict[str, Any]] = option(None)


@dataclass(kw_only=True)
class RootSchema:
    method: Optional[str] = option(None)
    seed: int = option(0, minimum=0)
    deterministic: bool = option(False)


# group -> schema; the groups in INSTANTIATED are checked against their `_target_` instead.
GROUP_SCHEMAS = {"trainer": TrainerSchema, "eval": EvalSchema, "sched": SchedSchema, "paths": PathsSchema,
                 "data": DataSchema}
# group -> (keys the builder removes before instantiating, arguments the builder passes itself)
INSTANTIATED = {"model": ({"name", "encode"}, {"num_classes"}), "optim": ({"name"}, {"params"}),
                "logger": ({"name"}, {"run_dir", "cfg", "resume_state"})}
FLOAT32_MAX = 3.4028234663852886e38
LOSS_TERM_KEYS = ({"weight"}, set())
HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
# Renamed keys: the old name, from the command line or a config file, is refused with the new one.
RENAMED_KEYS = {
    "data.cache_images": "data.keep_decoded_in_memory",  # keep decoded images in memory (small datasets)
    "data.image_cache": "data.preresized_folder",  # folder of pre-resized uint8 arrays (prepare cache=true)
}
TOP_LEVEL = set(GROUP_SCHEMAS) | set(INSTANTIATED) | {"loss"} | {f.name for f in dataclasses.fields(RootSchema)}


def refuse_renamed_keys(overrides: list[str]) -> None:
    """ConfigError naming the new key when a command-line override (`key=`, `+key=`, `~key`) uses an old one.

    Hydra would refuse the old key too, but in several lines that do not say what it became.
    """
    for override in overrides:
        key = override.lstrip("+~").partition("=")[0]
        if key in RENAMED_KEYS:
            raise ConfigError(_renamed(key))


def refuse_renamed_keys_on_command_line() -> None:
    """`refuse_renamed_keys(sys.argv[1:])` before a Hydra entry point starts: one line on stderr, exit 1."""
    try:
        refuse_renamed_keys(sys.argv[1:])
    except ConfigError as err:
        print(f"ConfigError: {err}", file=sys.stderr)
        sys.exit(1)


def _renamed(key: str) -> str:
    return f"{key} was renamed to {RENAMED_KEYS[key]}: set {RENAMED_KEYS[key]}=<value> instead"


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem of the composed config (no-op for a valid one)."""
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        by_dataset = OmegaConf.select(cfg, "data.by_dataset", throw_on_resolution_failure=False)
        name = OmegaConf.select(cfg, "data.name", throw_on_resolution_failure=False)
        if "data.by_dataset." in str(err.msg) and by_dataset is not None and name not in by_dataset:
            raise ConfigError(
                f"{err.full_key} comes from the preset's per-dataset values (data.by_dataset), which have no entry for "
                f"dataset {name!r} (only {', '.join(by_dataset)}); set {err.full_key} yourself, or add "
                f"data.by_dataset.{name} like the preset's other entries") from None
        raise ConfigError(f"cannot resolve config key {err.full_key}: {err.msg}") from None
    values.pop("hydra", None)
    problems = check_fields(values, RootSchema, "", allow=TOP_LEVEL - {f.name for f in dataclasses.fields(RootSchema)})
    for group, schema in GROUP_SCHEMAS.items():
        problems += _check_group(values, group, lambda node, g=group, s=schema: check_fields(node, s, g))
    for group, (reserved, injected) in INSTANTIATED.items():
        problems += _check_group(values, group, lambda node, g=group, r=reserved, i=injected: check_target(node, g, r, i))
    evaluation_only = (values.get("trainer") or {}).get("max_steps") == 0  # a run without training needs no loss
    problems += [] if evaluation_only and not values.get("loss") else _check_loss(values.get("loss"))
    problems += _check_across_groups(values)
    if problems:
        listing = "; ".join(problems)
        raise ConfigError(
            f"{len(problems)} problem{'s' if len(problems) > 1 else ''} in the config: {listing}. "
            "Fix them on the command line (key=value) or in the config file that sets them"
        )


def validate_eval_options(eval_cfg: DictConfig) -> None:
    """The `eval` group of `python -m zsbir.eval`, checked before any checkpoint is loaded or image embedded."""
    try:
        node = OmegaConf.to_container(eval_cfg, resolve=True) if isinstance(eval_cfg, DictConfig) else eval_cfg
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve config key {err.full_key}: {err.msg}") from None
    if isinstance(node, dict):
        node = {"before_training": False, **node}  # a training-only key
    problems = _check_group({"eval": node}, "eval", lambda n: check_fields(n, EvalSchema, "eval"))
    if not problems:
        problems = _check_across_groups({"eval": node})
    if problems:
        raise ConfigError(f"{len(problems)} problem{'s' if len(problems) > 1 else ''} in the eval options: "
                          f"{'; '.join(problems)}. Fix them on the command line (eval.<key>=<value>)")


def _check_group(values: dict, group: str, check) -> list[str]:
    node = values.get(group)
    if node is None:
        return [f"config group '{group}' is missing: select one, e.g. {group}=<option>"]
    if not isinstance(node, dict):
        return [f"{group}={node!r}: expected a config group (a mapping)"]
    return check(node)


def check_fields(node: dict, schema: type, path: str, allow: set[str] = frozenset()) -> list[str]:
    """Problems of `node` against the dataclass `schema`; keys in `allow` are checked elsewhere."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    problems = [_renamed(f"{path}.{key}") if f"{path}.{key}" in RENAMED_KEYS else _unknown_key(key, path, set(fields) | allow)
                for key in node if key not in fields and key not in allow]
    for name, spec in fields.items():
        key = f"{path}.{name}" if path else name
        if name not in node:
            if spec.default is MISSING and spec.default_factory is MISSING:
                problems.append(f"{key} is missing ({_describe(hints[name])})")
            continue
        value, nested = node[name], _dataclass_in(hints[name])
        if nested is not None and isinstance(value, dict):
            problems += check_fields(value, nested, key)
            continue
        converted, ok = _convert(schema, name, value)
        if not ok:
            problems.append(f"{key}={_show(value)}: expected {_describe(hints[name])}")
        elif converted is not None:
            problems += _check_constraints(converted, spec.metadata, key)
    return problems


def _convert(schema: type, name: str, value: Any) -> tuple[Any, bool]:
    """The value as the schema's type (OmegaConf's conversion rules), and whether it converts."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), {name: value})
    except OmegaConfBaseException:
        return None, False
    return OmegaConf.to_container(merged)[name], True


def _check_constraints(value: Any, metadata, key: str) -> list[str]:
    choices, pattern = metadata.get("choices"), metadata.get("pattern")
    low, high = metadata.get("minimum"), metadata.get("maximum")
    if choices and value not in choices:
        return [f"{key}={_show(value)}: must be one of {'|'.join(choices)}"]
    if pattern and not re.fullmatch(pattern[0], str(value)):
        return [f"{key}={_show(value)}: must be {pattern[1]}"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if low is not None and value < low:
            return [f"{key}={_show(value)}: must be >= {low}"]
        if high is not None and value > high:
            return [f"{key}={_show(value)}: must be <= {high}"]
    return []


def check_target(node: dict, path: str, reserved: set[str], injected: set[str]) -> list[str]:
    """Problems of an instantiated group: an importable `_target_` whose constructor takes these keys."""
    target = node.get("_target_")
    if not isinstance(target, str):
        return [f"{path}._target_ is missing: name the class to build, e.g. {path}._target_=package.module.Class"]
    try:
        built = import_target(target)
    except (ImportError, AttributeError) as err:
        return [f"{path}._target_={target!r} cannot be imported ({err})"]
    try:
        params = inspect.signature(built).parameters
    except (TypeError, ValueError):  # builtins without a signature: nothing more to check
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    accepted = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    problems = [_unknown_key(key, path, accepted, f" of {target}") for key in node
                if key not in accepted and key not in reserved and key not in HYDRA_KEYS]
    required = [n for n in accepted if params[n].default is inspect.Parameter.empty and n not in injected]
    problems += [f"{path}.{n} is missing: {target} requires it" for n in required if n not in node]
    return problems


def _check_loss(loss: Any) -> list[str]:
    if not loss:
        return ["the loss set is empty: select at least one term, e.g. loss=[triplet] (or trainer.max_steps=0 to "
                "evaluate without training)"]
    if not isinstance(loss, dict):
        return [f"loss={loss!r}: expected a mapping of term name -> {{_target_, weight, ...}}"]
    reserved, injected = LOSS_TERM_KEYS
    problems = []
    for name, term in loss.items():
        path = f"loss.{name}"
        if not isinstance(term, dict):
            problems.append(f"{path}={_show(term)}: expected a loss term ({{_target_, weight, ...}})")
            continue
        weight = term.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            problems.append(f"{path}.weight={_show(weight)}: expected a number (the term's weight in the total loss)")
        problems += check_target(term, path, reserved, injected)
    return problems


def _check_across_groups(values: dict) -> list[str]:
    """Rules that tie groups together; metric names would otherwise fail only after an epoch."""
    trainer, data, eval_cfg = (values.get(g) if isinstance(values.get(g), dict) else {} for g in ("trainer", "data", "eval"))
    problems = []
    model = values.get("model") if isinstance(values.get("model"), dict) else {}
    if model.get("encode", "joint") not in ENCODE_MODES:
        problems.append(f"model.encode={_show(model.get('encode'))}: must be one of {'|'.join(ENCODE_MODES)}")
    if data.get("sampler") == "instances" and not data.get("fine_grained"):
        problems.append("data.sampler=instances needs sketch-photo pairs: use a fine-grained dataset "
                        "(data=sketchy_fg or data=synthetic_fg)")
    problems += _check_relative_distance(values.get("loss"), data)
    if data.get("sampler") == "streams" and not data.get("stream_batch"):
        problems.append("data.sampler=streams needs data.stream_batch: {sketch: <sketches per step>, photo: <photos>}")
    generated = data.get("synthetic") or data.get("synthetic_fg")
    if data and not generated and not data.get("root"):
        problems.append("data.root is null: set data.root=/path/to/the/dataset (or paths.data_dir / ZSBIR_DATA)")
    problems += _check_model_and_optim(values.get("model"), values.get("optim"))
    problems += _check_protocols(eval_cfg)
    cutoffs = [(key, k) for key in ("map_at", "prec_at") for k in eval_cfg.get(key) or []]
    if not all(isinstance(k, int) for _, k in cutoffs):
        return problems  # eval.map_at / prec_at themselves are wrong, and reported as such
    problems += [f"eval.{key} contains {k}: a cut-off K must be >= 1" for key, k in cutoffs if k < 1]
    known = metric_names(eval_cfg.get("map_at") or [], eval_cfg.get("prec_at") or [])
    hint = f"the evaluator reports {'|'.join(known)} (set by eval.map_at / eval.prec_at)"
    select = trainer.get("select_metric")
    if isinstance(select, str) and select not in known:
        problems.append(f"trainer.select_metric={select!r}: {hint}")
    metrics = data.get("metrics") if isinstance(data.get("metrics"), list) else []
    problems += [f"data.metrics contains {m!r}: {hint}" for m in metrics if m not in known]
    return problems


def _check_relative_distance(losses, data: dict) -> list[str]:
    """Sketch_LVM's L_delta compares categories' distributions over the same number of triplets:
    without P x K batches it would quietly cut every category to the batch's smallest count."""
    losses = losses if isinstance(losses, dict) else {}
    names = [name for name, term in losses.items() if isinstance(term, dict) and term.get("weight", 1) != 0
             and str(term.get("_target_", "")).endswith("RelativeDistanceRegulariser")]
    if not names:
        return []
    balanced = data.get("balanced") if isinstance(data.get("balanced"), dict) else None
    fix = ("set data.balanced={classes_per_batch:P,items_per_class:K} with P, K >= 2 "
           "(experiment=sketch_lvm_fg uses 8 x 8)")
    if balanced is None:
        return [f"loss.{names[0]} compares the distributions of relative distances of categories with equally many "
                f"triplets and needs P categories x K sketches per batch: {fix}"]
    if int(balanced.get("classes_per_batch") or 0) < 2 or int(balanced.get("items_per_class") or 0) < 2:
        return [f"loss.{names[0]} needs at least 2 categories of at least 2 triplets per batch, data.balanced is "
                f"{balanced['classes_per_batch']} x {balanced['items_per_class']}: {fix}"]
    return []


def _check_protocols(eval_cfg: dict) -> list[str]:
    """eval.protocols names registered protocols; grids are drawn for an evaluated one."""
    names = eval_cfg.get("protocols")
    if not isinstance(names, list):
        return []  # a wrong type is reported by the schema check
    problems = [f"eval.protocols contains {n!r}: known protocols are {'|'.join(EVAL_PROTOCOLS)}" for n in names
                if n not in EVAL_PROTOCOLS]
    grids = eval_cfg.get("grids") if isinstance(eval_cfg.get("grids"), dict) else {}
    drawn = grids.get("protocol", "zs")
    if drawn != "zs" and drawn not in names:
        problems.append(f"eval.grids.protocol={drawn!r} is not evaluated: add it to eval.protocols "
                        f"(now {names}) or draw zs")
    return problems


def _check_model_and_optim(model: Any, optim: Any) -> list[str]:
    """Values the constructors accept but that cannot train: no embedding, a negative or overflowing lr."""
    problems = []
    embed_dim = model.get("embed_dim") if isinstance(model, dict) else None
    if embed_dim is not None and (isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1):
        problems.append(f"model.embed_dim={_show(embed_dim)}: must be an integer >= 1")
    lr = optim.get("lr") if isinstance(optim, dict) else None
    if lr is not None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)):
            problems.append(f"optim.lr={_show(lr)}: expected a number")
        elif not 0 < lr <= FLOAT32_MAX:
            problems.append(f"optim.lr={_show(lr)}: must be a finite number > 0"
                            + (" that fits in float32 (<= 3.4e38)" if lr > 0 else ""))
    return problems


def import_target(dotted: str) -> Any:
    """The object a `_target_` names, found as `instantiate` will find it (hydra.utils.get_object).

    A failure is an ImportError whose message is the underlying one (Hydra's own adds the
    dotted path and a question on further lines; the config check reports one line).
    """
    from hydra.utils import get_object

    hydra_utils_log = logging.getLogger("hydra.utils")
    was_disabled, hydra_utils_log.disabled = hydra_utils_log.disabled, True  # it logs the failure we report
    try:
        return get_object(dotted)
    except ImportError as err:
        raise ImportError(str(err.__cause__ or err).splitlines()[0]) from None
    finally:
        hydra_utils_log.disabled = was_disabled


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)


def _unknown_key(key: str, path: str, known, where: str = "") -> str:
    full = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(str(key), sorted(known), n=1)
    hint = f"did you mean {path + '.' if path else ''}{close[0]}?" if close else f"known keys: {', '.join(sorted(known))}"
    return f"unknown key {full}{where} ({hint})"


def _dataclass_in(hint) -> type | None:
    """The dataclass in `hint` (`X` or `Optional[X]`), if any."""
    candidates = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return f"{_describe(inner[0])} or null"
    if origin in (list, List):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin in (dict, Dict):
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(hint))}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))
