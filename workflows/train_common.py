"""What every Ray Train job of the project shares: optimizer, batches per epoch, metrics log,
checkpoint reporting and export, and the `TorchTrainer` driver.

A job directory under `run.storage_path` is a Ray Train run (rerunning the same name resumes from
its latest checkpoint) plus what the job writes itself:

    <job>/checkpoint_*/   Ray Train checkpoints: the model directory + optimizer state
    <job>/tensorboard/    scalars and image grids
    <job>/history.jsonl   the logged metrics, one line a log step (with the step it resumed from)
    <job>/<export>/       the last checkpoint without the optimizer: what users load
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def exported_step(directory: Path) -> int | None:
    try:
        return json.loads((directory / "trainer_state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def build_optimizer(optim_cfg, params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Adam/AdamW with linear warm-up. With weight decay, only matrices decay (LlamaGen's rule:
    norms, biases and 1-D parameters do not)."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim_cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    cls = torch.optim.AdamW if optim_cfg.name == "adamw" else torch.optim.Adam
    opt = cls([g for g in groups if g["params"]], lr=optim_cfg.lr, betas=tuple(optim_cfg.betas))
    warmup = optim_cfg.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return opt, sched


def clip_and_step(opt, sched, params, grad_clip: float | None) -> float:
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf))
    opt.step()
    sched.step()
    return grad_norm


def autocast(device: torch.device, mixed_precision: str):
    """bf16/fp16 autocast on CUDA; CPU runs float32."""
    if device.type != "cuda" or mixed_precision == "no":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)


class EpochBatches:
    """This worker's rows, an epoch at a time: from its Ray Data shard (locally shuffled), or, with
    `data.cache_in_memory`, from memory after the first epoch (in a new order each epoch)."""

    def __init__(self, data, batch_size: int, data_cfg, rank: int):
        self.data, self.batch_size, self.cfg, self.rank = data, batch_size, data_cfg, rank
        self.cache: list[dict] = []

    def epoch(self, n: int):
        seed = self.cfg.shuffle_seed + 7919 * n + self.rank
        if self.cache:
            for i in np.random.default_rng(seed).permutation(len(self.cache)):
                yield self.cache[i]
            return
        for rows in self.data.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=False,
                                           local_shuffle_buffer_size=8 * self.batch_size, local_shuffle_seed=seed):
            if self.cfg.cache_in_memory:
                self.cache.append(rows)
            yield rows


class MetricsLog:
    """Loss window + TensorBoard + history.jsonl on rank 0; `flush` returns the window's metrics."""

    def __init__(self, job_dir: Path, rank: int, prefix: str, resumed_from: int):
        self.job_dir, self.prefix, self.resumed_from = job_dir, prefix, resumed_from
        self.writer = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(job_dir / "tensorboard"))
        self._reset()

    def _reset(self) -> None:
        self.losses, self.samples, self.t0 = [], 0, time.time()

    def add(self, loss: float, samples: int) -> None:
        self.losses.append(loss)
        self.samples += samples

    def flush(self, step: int, **extra) -> dict:
        dt = max(time.time() - self.t0, 1e-9)
        metrics = {"step": step, "loss": float(np.mean(self.losses)) if self.losses else float("nan"),
                   "samples_per_s": self.samples / dt, **extra}
        if self.writer is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{self.prefix}/{k}", v, step)
            self.writer.flush()
            with open(self.job_dir / "history.jsonl", "a") as f:
                f.write(json.dumps({**metrics, "resumed_from": self.resumed_from, "time": time.time()}) + "\n")
            self._export(metrics)
        self._reset()
        return metrics

    def _export(self, metrics: dict) -> None:
        """Training progress for the Ray dashboard's metrics view (`ray_layton_train_*` in Prometheus)."""
        import ray

        if not ray.is_initialized():
            return
        if not hasattr(self, "_gauges"):
            from ray.util.metrics import Gauge

            self._gauges = {k: Gauge(f"layton_train_{k}", description=f"training {k} at the last log step", tag_keys=("job",))
                            for k in ("step", "loss", "samples_per_s")}
        for k, g in self._gauges.items():
            if isinstance(metrics.get(k), (int, float)):
                g.set(float(metrics[k]), tags={"job": self.job_dir.name})

    def add_image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, grid, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def save_grid(images: torch.Tensor, nrow: int, path: Path, mlog: MetricsLog, tag: str, step: int) -> None:
    """(N, 3, H, W) in [-1, 1] -> a PNG grid at `path` and a TensorBoard image."""
    from torchvision.utils import make_grid

    from layton.tokenizer import tensor_to_images

    grid = make_grid(images.float().cpu().clamp(-1, 1), nrow=nrow, normalize=True, value_range=(-1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tensor_to_images(grid[None] * 2 - 1)[0].save(path)
    mlog.add_image(tag, grid, step)


def report_checkpoint(save: Callable[[Path], None], opt, sched, state: dict, rank: int, metrics: dict) -> None:
    """Rank 0 writes the model directory (`save(dir)`) + training state; Ray persists it before
    recording it, so a run killed while saving resumes from the previous checkpoint."""
    import ray.train

    from layton.checkpoint_io import save_training_state

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp))
        save_training_state(Path(tmp), opt, sched, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def report_step(metrics: dict | None, checkpoint: bool, save: Callable[[Path], None], opt, sched, state: dict, rank: int) -> None:
    """The end of a step: a checkpoint (with its metrics), or the metrics of a log step, or nothing."""
    import ray.train

    if checkpoint:
        report_checkpoint(save, opt, sched, state, rank, metrics)
    elif metrics is not None:
        ray.train.report(metrics)


def check_epoch(seen: int, progressed: bool, skipped: int) -> None:
    """An epoch with no batch, or with no usable one, would loop forever: fail instead."""
    if seen == 0:
        raise RuntimeError("the training dataset is empty for this worker (fewer samples than workers?)")
    if not progressed:
        raise RuntimeError(f"a whole epoch of {seen} batch(es) had no usable sample ({skipped} skipped)")


def export_checkpoint(checkpoint_dir: Path, dest: Path) -> None:
    """Copy a checkpoint to `dest` atomically (a temp name, then rename); the optimizer is left out."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint_dir, tmp, ignore=shutil.ignore_patterns("optimizer.safetensors"))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def fit(train_loop, loop_config: dict, run_cfg, job_dir: Path, datasets: dict, export: Path):
    """Run `train_loop` on `run_cfg.num_workers` Ray Train workers; export the last checkpoint.

    Returns Ray's result. The caller has connected to Ray (and shuts a local instance down).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=run_cfg.num_workers, use_gpu=run_cfg.use_gpu,
                                               resources_per_worker={"CPU": run_cfg.cpus_per_worker,
                                                                     **({"GPU": 1} if run_cfg.use_gpu else {})}),
        run_config=ray.train.RunConfig(name=job_dir.name, storage_path=str(job_dir.parent)),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{job_dir.name} finished without a checkpoint in {job_dir}")
    with result.checkpoint.as_directory() as d:
        export_checkpoint(Path(d), export)
    return result
