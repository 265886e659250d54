"""The measurements of `bench gpu`, each run by `worker.py` in its own process.

Every function takes a `Recorder` first and records each figure as soon as it exists, so a
time cap that kills it keeps what was measured. Models carry random weights: throughput,
memory and compile behaviour do not depend on the values. Where the code refuses random
weights on purpose (SAKE's distillation teacher, PuXIM's VxL CLIP: random ones would
teach nothing), random weights are written to files once and passed as local weight
files, the path a cluster without internet uses anyway.
"""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

from zsbir.bench_tools import _current_rss_mib, _peak_mib
from zsbir.gpubench.worker import Recorder

# Evaluation metrics of the QuickDraw row in docs/benchmarks.md.
METRIC_ARGS = {"map_at": (200,), "prec_at": (100, 200)}
LARGE_CHUNK_BYTES = 4 * 2**30  # a GPU's alternative to the engine's 256 MiB default chunk budget
MAX_LOADER_EPOCHS = 20


# ---------------------------------------------------------------- setup

def setup(rec: Recorder, work: str, device: str, tiny: bool, vxl_image_size: int, cache_size: int,
          workers: int, data_overrides: list[str]) -> None:
    """Machine facts, then everything later sections share: synthetic benchmark, image cache, weight files."""
    rec.put("environment", environment(device))
    start = time.perf_counter()
    rec.put("image cache", {"folder": ensure_image_cache(work, cache_size, workers, data_overrides),
                            "seconds": round(time.perf_counter() - start, 1)})
    start = time.perf_counter()
    files = weight_files(work, tiny, vxl_image_size)
    rec.put("random weight files", {**files, "seconds": round(time.perf_counter() - start, 1)})


def environment(device: str) -> dict:
    import torch

    facts = {"torch": torch.__version__, "cuda": torch.version.cuda or "none", "cpu": _cpu_name(),
             "cpu_cores": os.cpu_count(), "platform": platform.platform()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        facts.update(device=f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs",
                     driver=_nvidia_smi("driver_version"), cudnn=torch.backends.cudnn.version())
    else:
        facts.update(device="CPU (no CUDA device used)", driver="none")
    return facts


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _nvidia_smi(field: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.strip()
        return out.splitlines()[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown (nvidia-smi not available)"


def ensure_image_cache(work: str, size: int, workers: int, data_overrides: list[str]) -> str:
    """The synthetic benchmark's uint8 image cache at `size` px (built once, by `zsbir.data.prepare`)."""
    import hashlib

    from zsbir.data.imagecache import INDEX
    from zsbir.data.prepare import compose, prepare

    variant = hashlib.sha1(" ".join(data_overrides).encode()).hexdigest()[:8]
    folder = Path(work) / f"image_cache_{size}px_{variant}"
    if not (folder / INDEX).is_file():
        prepare(compose(["data=synthetic", *data_overrides, "cache=true", f"cache_size={size}",
                         f"cache_folder={folder}", f"workers={workers}"]))
    return str(folder)


def weight_files(work: str, tiny: bool, vxl_image_size: int) -> dict[str, str]:
    """Random weights for SAKE's SE-ResNet-50 (student and teacher) and PuXIM's VxL CLIP ViT-B/16, as files."""
    import torch

    files = weight_file_paths(work, tiny, vxl_image_size)
    files["seresnet"].parent.mkdir(parents=True, exist_ok=True)
    if not files["seresnet"].is_file():
        from zsbir.models.cse_resnet import IMAGENET_CLASSES, build_seresnet

        _save(build_seresnet("legacy_seresnet50", None, tiny, num_classes=IMAGENET_CLASSES).state_dict(),
              files["seresnet"], torch)
    if not files["vxl_clip"].is_file():
        from zsbir.models.clip_common import create_clip

        model, _ = create_clip("ViT-B-16", None, vxl_image_size, tiny)
        _save(model.state_dict(), files["vxl_clip"], torch)
    return {name: str(path) for name, path in files.items()}


def weight_file_paths(work: str, tiny: bool, vxl_image_size: int) -> dict[str, Path]:
    folder = Path(work) / "weights" / ("tiny" if tiny else "full")
    return {"seresnet": folder / "seresnet50_random.pth", "vxl_clip": folder / f"vxl_clip_random_{vxl_image_size}.pth"}


def _save(state: dict, path: Path, torch) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a killed setup never leaves a half-written file that looks complete


# ---------------------------------------------------------------- 1 and 4: evaluation

def evaluation(rec: Recorder, device: str, queries: int, gallery: int, dim: int, classes: int) -> None:
    """The evaluation engine at the given size: exact fp32 metrics, time and peak memory."""
    from zsbir.bench_tools import make_features
    from zsbir.eval.metrics import default_chunk_size, retrieval_metrics

    data = {k: v.to(device) for k, v in make_features(queries, gallery, dim, classes, 3.5, 0).items()}
    _warm_up_kernels(data, device)
    for name, chunk in (("default chunk", None), ("4 GiB chunks", default_chunk_size(gallery, LARGE_CHUNK_BYTES))):
        base = _reset_peak(device)
        start = time.perf_counter()
        values = retrieval_metrics(**data, chunk_size=chunk, **METRIC_ARGS)
        _sync(device)
        seconds = time.perf_counter() - start
        rec.put(name, {"seconds": round(seconds, 3), "peak_mib": round(_peak_mib(device)),
                       "above_inputs_mib": round(_peak_mib(device) - base), "queries": queries, "gallery": gallery,
                       "chunk_size": chunk or default_chunk_size(gallery),
                       "metrics": {k: round(v, 6) for k, v in values.items() if not k.startswith("n_")}})


def bf16_evaluation(rec: Recorder, device: str, queries: int, gallery: int, dim: int, classes: int) -> None:
    """The same embeddings scored in fp32 and in bf16 (bf16 inputs and matrix product): largest metric difference."""
    import torch.nn.functional as F

    from zsbir.bench_tools import make_features
    from zsbir.eval.metrics import retrieval_metrics

    data = {k: v.to(device) for k, v in make_features(queries, gallery, dim, classes, 3.5, 0).items()}
    _warm_up_kernels(data, device)
    results = {}
    for name, scores_fn in (("fp32", None), ("bf16", _bf16_cosine)):
        inputs = dict(data)
        if scores_fn is not None:  # with a scores_fn the engine does not normalise: do it in fp32 first
            inputs["query_emb"], inputs["gallery_emb"] = (F.normalize(inputs[k], dim=1) for k in ("query_emb",
                                                                                                   "gallery_emb"))
        start = time.perf_counter()
        values = retrieval_metrics(**inputs, scores_fn=scores_fn, **METRIC_ARGS)
        _sync(device)
        results[name] = {k: v for k, v in values.items() if not k.startswith("n_")}
        rec.put(name, {"seconds": round(time.perf_counter() - start, 3),
                       "metrics": {k: round(v, 6) for k, v in results[name].items()}})
    differences = {k: abs(results["bf16"][k] - results["fp32"][k]) for k in results["fp32"]}
    rec.put("difference", {"max_abs": max(differences.values()), "per_metric": differences,
                           "queries": queries, "gallery": gallery})


def _bf16_cosine(queries, gallery):
    """Cosine scores of unit vectors as a bf16 evaluation computes them: bf16 operands, bf16 result."""
    import torch

    return queries.to(torch.bfloat16) @ gallery.to(torch.bfloat16).T


def _warm_up_kernels(data: dict, device: str) -> None:
    """One small evaluation first: CUDA context, cuBLAS handles and sort kernels are not the engine's time."""
    from zsbir.eval.metrics import retrieval_metrics

    retrieval_metrics(data["query_emb"][:64], data["query_labels"][:64], data["gallery_emb"][:512],
                      data["gallery_labels"][:512], **METRIC_ARGS)
    _sync(device)


# ---------------------------------------------------------------- 2: training step

def train_step(rec: Recorder, overrides: list[str], device: str, batch_size: int | None, image_size: int,
               steps: int, warmup: int, cnn: bool, compile_backend: str | None, weights: dict | None = None) -> None:
    """Train-step images/s in one process: plain fp32, then the speed options, then (with a
    `compile_backend`) the same with torch.compile too.

    `batch_size` None: the preset's own. `weights`: the arguments of `weight_files` when the
    overrides name its files (written here when setup did not get to it)."""
    import logging

    from zsbir.bench_tools import PLAIN_OPTIONS, _compose_train, time_train_step

    logging.getLogger("zsbir").setLevel(logging.WARNING)
    if weights:
        weight_files(**weights)
    if batch_size is None:
        batch_size = int(_compose_train(overrides).data.batch_size)
    options = {"batch_size": batch_size, "image_size": image_size, "steps": steps, "warmup": warmup,
               "device": device}
    base = [*overrides, f"data.batch_size={batch_size}", f"data.image_size={image_size}", f"trainer.device={device}"]
    fast = [*base, "trainer.precision=bf16", "trainer.fused_optimizer=true", "trainer.grad_checkpointing=false",
            f"trainer.channels_last={str(cnn).lower()}", "trainer.compile=false"]
    fast_name = "bf16 + fused optimizer" + (" + channels_last" if cnn else "")
    variants = [("plain fp32", [*base, *PLAIN_OPTIONS]), (fast_name, fast)]
    if compile_backend:
        variants.append((fast_name + " + compile", [*fast, "trainer.compile=true",
                                                    f"trainer.compile_backend={compile_backend}"]))
    for name, variant in variants:  # plain first: the slow compile comes last, so a cap cuts it alone
        row = time_train_step(variant, options)
        rec.put(name, {"images_per_s": round(row["images_per_s"], 1), "peak_mib": row["peak_mib"],
                       "first_step_s": row["first_step_s"], "settings": row["settings"],
                       "batch_size": batch_size, "image_size": image_size})
        _free_device_memory(device)


# ---------------------------------------------------------------- 3: data path

def data_path(rec: Recorder, work: str, device: str, batch_size: int, image_size: int, batches: int,
              num_workers: int, augment: str, overrides: list[str], data_overrides: list[str], cache_workers: int,
              step_images_per_s: float | None, step_source: str) -> None:
    """The training data path (uint8 image cache, loader workers, copy, GPU-side augmentation) in images/s."""
    import logging

    from zsbir.bench_tools import _build_trainer, time_train_step

    logging.getLogger("zsbir").setLevel(logging.WARNING)
    folder = ensure_image_cache(work, image_size, cache_workers, data_overrides)
    base = [*overrides, *data_overrides, f"data.batch_size={batch_size}", f"data.image_size={image_size}",
            f"trainer.device={device}"]
    trainer = _build_trainer([*base, f"data.preresized_folder={folder}", "data.gpu_augment=true", f"data.augment={augment}",
                              f"data.num_workers={num_workers}", "data.keep_decoded_in_memory=false"])
    wanted, images, seconds, device_s = batches * batch_size * len(trainer.views), 0, 0.0, 0.0
    for epoch in range(MAX_LOADER_EPOCHS):  # an epoch of the synthetic benchmark has few batches at 192
        counted, epoch_s, epoch_device_s = _time_one_epoch(trainer, epoch, device, wanted - images)
        images, seconds, device_s = images + counted, seconds + epoch_s, device_s + epoch_device_s
        if images >= wanted or counted == 0:
            break
    rec.put("data path", {"images_per_s": round(images / max(seconds, 1e-9), 1), "images": images,
                          "device_augment_share": round(device_s / max(seconds, 1e-9), 3),
                          "settings": f"uint8 image cache {image_size} px, {num_workers} loader workers, "
                                      f"gpu_augment={augment}, batch {batch_size} x {len(trainer.views)} views"})
    del trainer
    if step_images_per_s is None:
        row = time_train_step([*base, "trainer.precision=bf16"], {"batch_size": batch_size, "image_size": image_size,
                                                                  "steps": 3, "warmup": 1, "device": device})
        step_images_per_s = row["images_per_s"]
        step_source = f"measured here ({row['settings']}): no figure from section 2"
    rec.put("train step", {"images_per_s": round(step_images_per_s, 1), "source": step_source})


def _time_one_epoch(trainer, epoch: int, device: str, wanted: int) -> tuple[int, float, float]:
    """(images, seconds, seconds in the device-side part) over one epoch after its first batch (worker start-up)."""
    trainer.sampler.set_epoch(epoch)
    batches = iter(trainer.train_loader)
    trainer._prepare_batch(next(batches))
    _sync(device)
    images, device_s, start = 0, 0.0, time.perf_counter()
    for batch in batches:
        mark = time.perf_counter()
        trainer._prepare_batch(batch)  # copy to the device, augment there, normalise
        _sync(device)
        device_s += time.perf_counter() - mark
        images += len(batch["label"]) * len(trainer.views)
        if images >= wanted:
            break
    return images, time.perf_counter() - start, device_s


# ---------------------------------------------------------------- 5: process group

def process_group(rec: Recorder, overrides: list[str], device: str, batch_size: int, image_size: int, steps: int,
                  sync_bn: bool) -> None:
    """A 1-process group (NCCL on CUDA, gloo on CPU): the trainer's SyncBatchNorm + DDP path runs a few steps."""
    import logging
    import socket
    from datetime import timedelta

    import torch
    import torch.distributed as torch_dist

    from zsbir.bench_tools import _build_trainer, random_batch

    logging.getLogger("zsbir").setLevel(logging.WARNING)
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(0)
    torch_dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                  timeout=timedelta(seconds=60),
                                  device_id=torch.device("cuda", 0) if device == "cuda" else None)
    try:
        trainer = _build_trainer([*overrides, f"data.batch_size={batch_size}", f"data.image_size={image_size}",
                                  f"trainer.device={device}", f"trainer.sync_bn={str(sync_bn).lower()}"])
        wrapped = isinstance(trainer.train_module, torch.nn.parallel.DistributedDataParallel)
        sync_layers = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.encoder.modules())
        rec.put("setup", {"backend": torch_dist.get_backend(), "world_size": torch_dist.get_world_size(),
                          "ddp_wrapped": wrapped, "sync_bn_layers": sync_layers})
        before = [p.detach().clone() for p in trainer.encoder.parameters() if p.requires_grad]
        batch = random_batch(trainer, batch_size, image_size)
        losses, start = [], time.perf_counter()
        for _ in range(steps):
            losses.append(float(trainer.train_step(batch)["loss"]))
        _sync(device)
        seconds = time.perf_counter() - start
        after = [p.detach() for p in trainer.encoder.parameters() if p.requires_grad]
        flag = torch.ones(1, device=trainer.device)
        torch_dist.all_reduce(flag)  # a collective of the group itself, outside DDP's reducer
        rec.put("steps", {"steps": steps, "losses_finite": all(map(_finite, losses)),
                          "weights_updated": any(not torch.equal(a, b) for a, b in zip(after, before)),
                          "all_reduce_ok": float(flag) == 1.0, "seconds_per_step": round(seconds / steps, 4),
                          "note": "at world size 1 torch runs SyncBatchNorm layers as plain BatchNorm; the "
                                  "cross-GPU statistics kernel needs 2 or more GPUs"})
    finally:
        torch_dist.destroy_process_group()


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


# ---------------------------------------------------------------- 6: torch.compile

def compile_encoder(rec: Recorder, overrides: list[str], device: str, batch_size: int, image_size: int,
                    backend: str, cnn: bool) -> None:
    """torch.compile of one encoder (forward + backward, bf16 autocast on CUDA): compile time, whether it ran,
    graph breaks, step time against eager and the largest output difference."""
    import logging
    from contextlib import nullcontext

    import torch

    from zsbir.bench_tools import _compose_train
    from zsbir.models.encoder import build_encoder

    logging.getLogger("zsbir").setLevel(logging.WARNING)
    cfg = _compose_train([*overrides, f"data.image_size={image_size}", f"trainer.device={device}"])
    encoder = build_encoder(cfg.model, int(cfg.data.synthetic.seen_classes)).to(device).train()
    images = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
    if cnn and device == "cuda":
        encoder, images = encoder.to(memory_format=torch.channels_last), images.contiguous(
            memory_format=torch.channels_last)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else nullcontext

    def step(module) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        with autocast():
            embedding = module(images, "photo")["embedding"]
        embedding.float().square().mean().backward()
        _sync(device)
        return embedding.detach().float(), time.perf_counter() - start

    step(encoder)
    reference, eager_s = step(encoder)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(encoder, backend=backend)
    rec.put("started", {"backend": backend, "batch_size": batch_size, "image_size": image_size})
    _, compile_s = step(compiled)
    output, compiled_s = step(compiled)
    counters = torch._dynamo.utils.counters
    scale = float(reference.abs().max()) or 1.0
    rec.put("compile", {"ran": True, "compile_s": round(compile_s, 2), "compiled_step_s": round(compiled_s, 4),
                        "eager_step_s": round(eager_s, 4), "speed_up": round(eager_s / compiled_s, 2),
                        "graph_breaks": int(sum(counters["graph_break"].values())),
                        "graphs": int(counters["stats"].get("unique_graphs", 0)),
                        "max_rel_difference": float((output - reference).abs().max()) / scale,
                        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default")})


# ---------------------------------------------------------------- helpers

def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> float:
    """Reset the peak counter; returns the memory in use now (MiB)."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    return _current_rss_mib()


def _free_device_memory(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
