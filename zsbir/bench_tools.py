"""Measurement helpers shared by `python -m zsbir.bench` (zsbir/bench.py) and the GPU acceptance
run (zsbir/gpubench/): composing and building a trainer, timing training steps and the data
loader, random retrieval features, memory figures. No CLI here, so both can import it.
"""
from __future__ import annotations

PLAIN_OPTIONS = ["trainer.precision=fp32", "trainer.channels_last=false", "trainer.fused_optimizer=false",
                 "trainer.compile=false", "trainer.grad_checkpointing=false"]


def _compose_train(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from zsbir._paths import config_dir
    from zsbir.config import refuse_renamed_keys

    refuse_renamed_keys(overrides)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=["trainer.progress_bar=false", "eval.before_training=false", *overrides])


def _build_trainer(overrides: list[str]):
    import tempfile

    from zsbir.engine.trainer import Trainer

    return Trainer(_compose_train(overrides), tempfile.mkdtemp(prefix="zsbir-bench-"))


def time_train_step(overrides: list[str], options: dict) -> dict:
    """Images/s of `Trainer.train_step` on random in-memory batches already on the device."""
    import gc
    import time

    gc.collect()
    device = options["device"]
    baseline = _memory_before(device)
    trainer = _build_trainer(overrides)
    batch_size = options["batch_size"]
    batch = random_batch(trainer, batch_size, options["image_size"])
    start, first_step_s = time.perf_counter(), None
    for i in range(options["warmup"]):
        trainer.train_step(batch)
        if i == 0:  # the first step alone: it includes torch.compile's compilation
            _synchronize(device)
            first_step_s = round(time.perf_counter() - start, 2)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(options["steps"]):
        trainer.train_step(batch)
    _synchronize(device)
    seconds = time.perf_counter() - start
    tcfg = trainer.cfg.trainer
    amp = "autocast " + str(trainer.amp).removeprefix("torch.") if trainer.amp else "fp32"
    settings = (f"{amp}, channels_last={tcfg.channels_last}, fused={trainer.optimizer.defaults.get('fused') or False}, "
                f"compile={tcfg.compile}")
    images = options["steps"] * batch_size * len(trainer.views)
    memory = _memory_after(device, baseline)
    del trainer, batch
    return {"images_per_s": images / seconds, "memory": memory.split(" (")[0], "peak_mib": round(_peak_mib(device)),
            "first_step_s": first_step_s, "settings": settings}


def random_batch(trainer, batch_size: int, size: int) -> dict:
    """A seeded batch of every view the trainer's losses need, already on its device (uint8 under gpu_augment)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    uint8 = trainer.gpu_augment is not None
    batch = {view: (torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=gen) if uint8
                    else torch.randn(batch_size, 3, size, size, generator=gen)).to(trainer.device)
             for view in trainer.views}
    n_classes = len(trainer.data.seen_classes)
    batch["label"] = torch.randint(0, n_classes, (batch_size,), generator=gen).to(trainer.device)
    batch["neg_label"] = (batch["label"] + 1) % n_classes
    batch["index"] = torch.arange(batch_size, device=trainer.device)
    # Indices of the photos in the training list (PuXIM caches each photo's mask under it).
    n_photos = len(trainer.data.train_photo)
    batch["pos_index"] = torch.arange(batch_size, device=trainer.device) % n_photos
    batch["neg_index"] = (batch["pos_index"] + batch_size) % n_photos
    # Two-stream batches (data.sampler=streams) label and index their photo stream separately.
    batch["photo_label"] = batch["neg_label"]
    batch["photo_index"] = batch["pos_index"]
    return batch


def time_loader(overrides: list[str], options: dict) -> dict:
    """Images/s of the real training DataLoader (decode, pad, resize, augment, collate)."""
    import time

    trainer = _build_trainer(overrides)
    data_cfg = trainer.cfg.data
    trainer.sampler.set_epoch(0)
    batches = iter(trainer.train_loader)
    next(batches)  # worker start-up and the first decode are not throughput
    start, images, count = time.perf_counter(), 0, 0
    for batch in batches:
        images += len(batch["label"]) * len(trainer.views)
        count += 1
        if count >= options["loader_batches"]:
            break
    seconds = time.perf_counter() - start
    settings = (f"data={data_cfg.name}, num_workers={data_cfg.num_workers}, augment={data_cfg.augment}, "
                f"gpu_augment={bool(data_cfg.get('gpu_augment'))}, {count} batches")
    return {"images_per_s": images / max(seconds, 1e-9), "settings": settings}


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_features(queries: int, gallery: int, dim: int, classes: int, noise: float, seed: int):
    """Seeded float32 features: a random centre per class plus Gaussian noise.

    Queries are spread evenly over the classes (as the split's sketches are); gallery
    labels are drawn at random, so class sizes vary a little.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen)
    query_labels = torch.arange(queries) % classes
    gallery_labels = torch.randint(0, classes, (gallery,), generator=gen)
    query_emb = centres[query_labels] + noise * torch.randn(queries, dim, generator=gen)
    gallery_emb = centres[gallery_labels] + noise * torch.randn(gallery, dim, generator=gen)
    return {"query_emb": query_emb, "query_labels": query_labels,
            "gallery_emb": gallery_emb, "gallery_labels": gallery_labels}


def _peak_mib(device: str) -> float:
    """CUDA peak allocated since the last reset, or the process's peak RSS on CPU (MiB)."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _max_rss_mib()


def _current_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _max_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _memory_before(device: str):
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return _current_rss_mib()


def _memory_after(device: str, baseline) -> str:
    peak = _peak_mib(device)
    if device == "cuda":
        return f"{peak:.0f} MiB CUDA peak allocated ({peak - baseline / 2**20:.0f} MiB above inputs)"
    return f"{peak:.0f} MiB process peak RSS ({peak - baseline:.0f} MiB above the {baseline:.0f} MiB before)"
