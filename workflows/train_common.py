"""What every Ray Train job of the project shares: optimizer, batches per epoch, metrics log,
checkpoint reporting and export, and the `TorchTrainer` driver.

A job directory under `run.storage_path` (a local path or a URI: every file below is written
through `layton.storage`, straight to the bucket, as it is produced) is a Ray Train run (rerunning
the same name resumes from its latest checkpoint, wherever it runs) plus what the job writes itself:

    <job>/checkpoint_*/   Ray Train checkpoints: the model directory + optimizer state
    <job>/tensorboard/    scalars and image grids
    <job>/history.jsonl   the logged metrics, one line a log step (with the step it resumed from)
    <job>/<export>/       the last checkpoint without the optimizer: what users load

`run_training` is the loop every worker runs; a job supplies the model-specific part as a
`TrainTask` (its model, batches, loss and image grids) and the cadence as `LoopSettings`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train.torch import TorchTrainer
from ray.util.metrics import Gauge
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from layton.acceleration import autocast as dtype_autocast
from layton.checkpoint_io import OPTIMIZER_NAME, STATE_NAME, load_training_state, save_training_state
from layton.seeds import derive_seed
from layton.storage import Root, basename, filesystem, parent
from layton.tokenizer import tensor_to_images
from workflows.train_resources import alive_nodes, check_cluster_cpus

log = logging.getLogger(__name__)


# --- seeds ------------------------------------------------------------------------------------------


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The CPU generator of one worker's step (noise, timesteps, caption dropout): a function of
    (seed, step, rank) alone, so a resumed run draws what an uninterrupted one would have."""
    return torch.Generator("cpu").manual_seed(derive_seed("train-step", seed, step, rank))


def epoch_seed(shuffle_seed: int, epoch: int, rank: int) -> int:
    """The row order of one worker's epoch: new every epoch, different on every worker."""
    return derive_seed("train-epoch", shuffle_seed, epoch, rank)


# --- the parts of a step ---------------------------------------------------------------------------


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
    """Training's `mixed_precision` ("no" / "bf16" / "fp16") as autocast on CUDA; CPU runs float32."""
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    return dtype_autocast(device, half if device.type == "cuda" else torch.float32)


class EpochBatches:
    """This worker's rows, an epoch at a time: from its Ray Data shard (locally shuffled), or, with
    `data.cache_in_memory`, from memory after the first epoch (in a new order each epoch)."""

    def __init__(self, data, batch_size: int, data_cfg, rank: int):
        self.data, self.batch_size, self.cfg, self.rank = data, batch_size, data_cfg, rank
        self.cache: list[dict] = []

    def replay(self, epochs: int) -> None:
        """Read, without training, the first `epochs` epochs, as a resumed run must: Ray Data's
        file order moves on with each pass over the data, and the cache fills."""
        for e in range(1, epochs + 1):
            for _ in self._epoch(e):
                pass

    def epoch(self, n: int, skip: int = 0):
        """Epoch `n`'s batches after the first `skip` (read, not yielded: where a resumed run starts)."""
        for i, rows in enumerate(self._epoch(n)):
            if i >= skip:
                yield rows

    def _epoch(self, n: int):
        seed = epoch_seed(self.cfg.shuffle_seed, n, self.rank)
        if self.cache:
            for i in np.random.default_rng(seed).permutation(len(self.cache)):
                yield self.cache[i]
            return
        for rows in self.data.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=False,
                                           local_shuffle_buffer_size=self.cfg.shuffle_buffer or None,
                                           local_shuffle_seed=seed):
            if self.cfg.cache_in_memory:
                self.cache.append(rows)
            yield rows


HISTORY = "history.jsonl"
TB_ROLL_BYTES = 16 << 20


def _history_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")  # a torn line: dropped


class TensorBoard:
    """A SummaryWriter whose event files end up in the job's `tensorboard/`: written there directly
    on a local disk; on an object store (no append) written to a local temp directory and uploaded
    whole at each flush, a new event file begun past TB_ROLL_BYTES so uploads stay small."""

    def __init__(self, job: Root):
        self.out = job.sub("tensorboard")
        self.dir = self.out.path if job.local else tempfile.mkdtemp(prefix="layton-tensorboard-")
        self.writer = SummaryWriter(self.dir)

    def _upload(self) -> list[Path]:
        files = sorted(Path(self.dir).iterdir())
        for f in files:
            self.out.write_file(f.name, f)
        return files

    def flush(self) -> None:
        self.writer.flush()
        if self.out.local:
            return
        if sum(f.stat().st_size for f in Path(self.dir).iterdir()) <= TB_ROLL_BYTES:
            self._upload()
            return
        self.writer.close()
        for f in self._upload():
            f.unlink()
        self.writer = SummaryWriter(self.dir)

    def close(self) -> None:
        self.writer.close()
        if not self.out.local:
            self._upload()
            shutil.rmtree(self.dir, ignore_errors=True)


class MetricsLog:
    """Loss window + TensorBoard + history.jsonl on rank 0; `flush` returns the window's metrics.

    The history is kept in memory (with the lines of the runs before, read at start) and rewritten
    whole at each log step: an object store cannot append."""

    def __init__(self, job_dir: str, rank: int, prefix: str, resumed_from: int):
        self.job_dir, self.prefix, self.resumed_from = job_dir, prefix, resumed_from
        self.root = Root(job_dir) if rank == 0 else None
        self.tb = TensorBoard(self.root) if rank == 0 else None
        # Lines past the checkpoint resumed from were logged by a run killed before its next
        # checkpoint: this run logs those steps again, so each step keeps one line.
        old = (self.root.read(HISTORY) or b"").decode().splitlines() if rank == 0 else []
        self.history = "".join(line + "\n" for line in old if _history_step(line) <= resumed_from)
        self._gauges: dict[str, Gauge] | None = None
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
        if self.root is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.writer.add_scalar(f"{self.prefix}/{k}", v, step)
            self.tb.flush()
            self.history += json.dumps({**metrics, "resumed_from": self.resumed_from, "time": time.time()}) + "\n"
            self.root.write(HISTORY, self.history.encode())
            self._export(metrics)
        self._reset()
        return metrics

    def _export(self, metrics: dict) -> None:
        """Training progress for the Ray dashboard's metrics view (`ray_layton_train_*` in Prometheus)."""
        if not ray.is_initialized():
            return
        if self._gauges is None:
            self._gauges = {k: Gauge(f"layton_train_{k}", description=f"training {k} at the last log step", tag_keys=("job",))
                            for k in ("step", "loss", "samples_per_s")}
        for k, g in self._gauges.items():
            if isinstance(metrics.get(k), (int, float)):
                g.set(float(metrics[k]), tags={"job": basename(self.job_dir)})

    def save_grid(self, name: str, images: torch.Tensor, nrow: int, tag: str, step: int) -> None:
        """(N, 3, H, W) in [-1, 1] -> a PNG grid at `name` under the job dir and a TensorBoard image."""
        if self.root is None:
            return
        grid = make_grid(images.float().cpu().clamp(-1, 1), nrow=nrow, normalize=True, value_range=(-1, 1))
        buf = io.BytesIO()
        tensor_to_images(grid[None] * 2 - 1)[0].save(buf, format="PNG")
        self.root.write(name, buf.getvalue())
        self.tb.writer.add_image(tag, grid, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def report_checkpoint(save: Callable[[Path], None], opt, sched, state: dict, rank: int, metrics: dict) -> None:
    """Rank 0 writes the model directory (`save(dir)`) + training state; Ray persists it before
    recording it, so a run killed while saving resumes from the previous checkpoint."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp))
        save_training_state(Path(tmp), opt, sched, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def report_step(metrics: dict | None, checkpoint: bool, save: Callable[[Path], None], opt, sched, state: dict, rank: int) -> None:
    """The end of a step: a checkpoint (with its metrics) goes to Ray Train; nothing else does.

    A log step's metrics are already in the history, TensorBoard and the dashboard's gauges
    (`MetricsLog.flush`), and Ray Train keeps only the metrics that come with a checkpoint
    (`Result.metrics`, `metrics_dataframe`). A metrics-only `ray.train.report` would cost a round
    trip to the rank-sync actor, and, since the worker's result queue holds one report that the
    controller drains once per health check (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s), a second
    report within that interval would stall the step until the next poll."""
    if checkpoint:
        report_checkpoint(save, opt, sched, state, rank, metrics)


def check_epoch(seen: int, progressed: bool, skipped: int) -> None:
    """An epoch with no batch, or with no usable one, would loop forever: fail instead."""
    if seen == 0:
        raise RuntimeError("the training dataset is empty for this worker (fewer samples than workers?)")
    if not progressed:
        raise RuntimeError(f"a whole epoch of {seen} batch(es) had no usable sample ({skipped} skipped)")


# --- the loop --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    rank: int
    world: int
    device: torch.device


@dataclass(frozen=True)
class LoopSettings:
    """A job's step budget and cadence. Steps are optimizer updates, counted across resumes; the
    last step always logs, checkpoints and draws images."""

    max_steps: int
    batch_size: int  # rows per worker and step
    log_every: int
    checkpoint_every: int
    image_every: int  # rank 0's grids (`TrainTask.save_images`)
    mixed_precision: str  # "no" | "bf16" | "fp16"
    optim: Any  # layton.config.OptimConfig

    @classmethod
    def of(cls, section, image_every: int) -> LoopSettings:
        """From a config section that names the fields as this class does."""
        return cls(section.max_steps, section.batch_size, section.log_every, section.checkpoint_every, image_every,
                   section.mixed_precision, section.optim)

    def due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.max_steps


class TrainTask(Protocol):
    """The model-specific half of a training job; `run_training` does the rest. Built on the worker
    (after the seed is set), so that every worker builds the same initial weights."""

    name: str  # the TensorBoard tag prefix (and the job's name in logs)
    skipped_metric: str  # the logged count of unusable rows ("skipped_images", "skipped_rows")
    state: dict  # extra fields for the checkpoint's trainer_state.json
    params: list[torch.nn.Parameter]  # what the optimizer trains and the gradient clip measures
    module: torch.nn.Module  # what DDP wraps: the `model` that `loss` is given

    def load(self, directory: Path) -> None:
        """The trained weights from a checkpoint directory (`run_training` restores the optimizer)."""

    def save(self, directory: Path) -> None:
        """The model directory of a checkpoint (and of the export)."""

    def make_batch(self, rows: dict, step: int) -> Any | None:
        """Rows -> model inputs on the device, with `.skipped` (rows left out); None: none usable."""

    def batch_size(self, batch) -> int:
        """The samples in `batch` (for samples/s)."""

    def loss(self, model: torch.nn.Module, batch, generator: torch.Generator) -> torch.Tensor:
        """The step's loss; `generator` is `step_generator`'s, for every random draw of the step."""

    def log_metrics(self, batch) -> dict:
        """Metrics of a log step beyond loss, lr, grad norm and skips (from the step's batch)."""

    def save_images(self, step: int, mlog: MetricsLog) -> None:
        """Rank 0, every `image_every` steps: grids to files and TensorBoard."""


def run_training(build_task: Callable[[Worker], TrainTask], settings: LoopSettings, *, seed: int, data_cfg,
                 job_dir: str) -> None:
    """The training loop of a Ray Train worker: build, resume, then step until `max_steps`, logging
    metrics every `log_every` steps and reporting a checkpoint (with its metrics) to Ray Train every
    `checkpoint_every` (see `report_step`)."""
    ctx = ray.train.get_context()
    worker = Worker(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    rank, world = worker.rank, worker.world
    torch.manual_seed(seed + rank)
    task = build_task(worker)
    opt, sched = build_optimizer(settings.optim, task.params)

    step = resumed_from = 0
    position = {"epoch": 1, "batches": 0, "skipped": 0}  # where in the data the next step starts
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            task.load(Path(d))
            saved = load_training_state(Path(d), opt, sched)
        step = resumed_from = saved["step"]
        position.update({k: saved[k] for k in position if k in saved})
        log.warning("%s resumes at step %d (epoch %d, batch %d)", task.name, step, position["epoch"], position["batches"])
    if step >= settings.max_steps:
        # Nothing to train (max_steps lowered, or killed before the export): Ray's result still holds
        # the restored checkpoint, which the driver exports.
        log.warning("%s: the checkpoint's step %d reaches max_steps %d: no step to run", task.name, step, settings.max_steps)
        return

    model = task.module
    if world > 1:
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    model.train()
    mlog = MetricsLog(job_dir, rank, task.name, resumed_from)
    batches = EpochBatches(ray.train.get_dataset_shard("train"), settings.batch_size, data_cfg, rank)
    epoch, skipped = position["epoch"] - 1, position["skipped"]
    batches.replay(position["epoch"] - 1)
    seen = resumed_at = position["batches"]
    try:
        while step < settings.max_steps:
            epoch, steps_at_epoch_start = epoch + 1, step
            for rows in batches.epoch(epoch, skip=resumed_at):
                seen += 1
                b = task.make_batch(rows, step)
                if b is None:
                    skipped += len(rows["key"])
                    continue
                skipped += b.skipped
                torch.manual_seed(derive_seed("train-torch", seed, step, rank))  # dropout & co: as the generator
                with autocast(worker.device, settings.mixed_precision):
                    loss = task.loss(model, b, step_generator(seed, step, rank))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = clip_and_step(opt, sched, task.params, settings.optim.grad_clip)
                step += 1
                mlog.add(loss.item(), task.batch_size(b) * world)

                if rank == 0 and settings.due(step, settings.image_every):
                    task.save_images(step, mlog)
                checkpoint_due = settings.due(step, settings.checkpoint_every)
                metrics = None
                if checkpoint_due or settings.due(step, settings.log_every):
                    metrics = mlog.flush(step, lr=sched.get_last_lr()[0], grad_norm=grad_norm,
                                         **{task.skipped_metric: skipped}, **task.log_metrics(b))
                state = {"step": step, "epoch": epoch, "batches": seen, "skipped": skipped, **task.state}
                report_step(metrics, checkpoint_due, task.save, opt, sched, state, rank)
                if step >= settings.max_steps:
                    break
            else:  # the epoch ran out: the next one starts at its first batch
                if not (resumed_at and seen == resumed_at):  # (resumed after the epoch's last batch: nothing left)
                    check_epoch(seen, step > steps_at_epoch_start, skipped)
                seen = resumed_at = 0
    finally:
        mlog.close()


# --- the driver ------------------------------------------------------------------------------------


def exported_step(directory: str | Path) -> int | None:
    blob = Root(directory).read(STATE_NAME)
    try:
        return json.loads(blob)["step"] if blob else None
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def export_checkpoint(checkpoint_dir: Path, dest: str) -> None:
    """The checkpoint without its optimizer state at `dest` (a local path or a URI). Its training
    state comes last (a store may show the files one by one): an export where `exported_step` reads
    a step is whole; the old completion record is gone before anything is replaced."""
    Root(parent(dest)).put_dir(checkpoint_dir, basename(dest), skip=(OPTIMIZER_NAME,), last=(STATE_NAME,))


@dataclass
class TrainResult:
    """What a training job's driver returns."""

    export: str  # the exported model directory
    step: int | None  # the export's step
    skipped: bool  # the export was already complete: nothing ran
    metrics: dict  # the last reported metrics (empty when skipped)
    precompute: dict | None  # the marker of the precompute pass this call ran or checked
    seconds: float
    stage: int | None = None  # the tokenizer stage

    @classmethod
    def of(cls, export: str, started: float, *, skipped: bool = False, metrics: dict | None = None,
           precompute: dict | None = None, stage: int | None = None) -> TrainResult:
        return cls(str(export), exported_step(export), skipped, metrics or {}, precompute, time.time() - started, stage)


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it persisted


def remove_unrecorded_checkpoints(job_dir: str) -> list[str]:
    """Delete the job's `checkpoint_*` directories that Ray Train's snapshot does not list: the one a
    killed run was writing (never recorded, never resumed from). Returns their names."""
    root = Root(job_dir)
    try:
        snapshot = json.loads(root.read(SNAPSHOT) or b"{}")
    except json.JSONDecodeError:
        return []  # a torn snapshot: Ray Train says what it makes of it; nothing is deleted on a guess
    recorded = {r.get("checkpoint_dir_name") for r in snapshot.get("checkpoint_results", [])}
    found = {name.split("/", 1)[0] for name in root.list(recursive=True) if name.startswith("checkpoint_")}
    stale = sorted(found - recorded - {SNAPSHOT})
    for name in stale:
        root.delete_dir(name)
        log.warning("%s: removed %s, a checkpoint Ray Train never recorded (its run was killed writing it)",
                    job_dir, name)
    return stale


def fit(train_loop, loop_config: dict, config, job_dir: str, datasets: dict, export: str) -> dict:
    """Run `train_loop` on `config.run.num_workers` Ray Train workers; export the last checkpoint.

    Ray Train's storage is the job dir's parent on its own filesystem (a bucket: checkpoints are
    persisted there as they are reported, and a rerun of the name restores from there). Returns the
    last reported metrics. The caller has connected to Ray (and shuts a local instance down). A
    resumed run with no step left reports nothing: Ray's result is then the restored checkpoint
    (and its metrics), which is exported as it is.
    """
    run_cfg = config.run
    check_cluster_cpus(config, alive_nodes())
    remove_unrecorded_checkpoints(job_dir)
    fs, storage = filesystem(parent(job_dir))
    # Blocks in the order read (not as tasks finish), so a resumed run reads its rows in the order
    # the uninterrupted one did (`EpochBatches.replay`).
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=run_cfg.num_workers, use_gpu=run_cfg.use_gpu,
                                               resources_per_worker={"CPU": run_cfg.cpus_per_worker,
                                                                     **({"GPU": 1} if run_cfg.use_gpu else {})},
                                               placement_strategy=run_cfg.placement_strategy),
        run_config=ray.train.RunConfig(name=basename(job_dir), storage_path=storage, storage_filesystem=fs),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{basename(job_dir)} finished without a checkpoint in {job_dir}")
    with result.checkpoint.as_directory() as d:
        export_checkpoint(Path(d), export)
    return dict(result.metrics or {})
