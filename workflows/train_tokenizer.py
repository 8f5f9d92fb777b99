"""Tokenizer training on Ray Train: stage 1 (diffusion loss) and stage 2 (consistency + LPIPS).

`run_tokenizer_stage(config, stage)` is what `layton train tokenizer --stage N CONFIG` runs: the
precompute pass (when data.precompute), then `train_loop` on N `TorchTrainer` workers. Each runs
`train_common.run_training` with a `TokenizerTask` (DDP over the trainable ControlNet copy and
token embedder; everything else is frozen).

Layout under `run.storage_path` (a local path or a URI):

    <name>-stage<N>/checkpoint_*/   Ray Train checkpoints: a whole tokenizer directory + optimizer
    <name>-stage<N>/tensorboard/    loss, lr, grad norm, samples/s, skipped images, recon grids
    <name>-stage<N>/grids/          reconstruction grid PNGs
    <name>-stage<N>/history.jsonl   the logged metrics, a line per log step (with the step it resumed from)
    <name>-stage<N>/tokenizer/      the export of the last checkpoint (`LaytonTokenizer.from_pretrained`)
    <name>-precompute/              tokens and latents (when data.precompute)

Rerunning the same config resumes from the latest checkpoint (Ray Train restores the run by its
name); a stage whose export reached max_steps is not run again. Stage 2 starts from stage 1's
export (or `stage2.init_from`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from layton.acceleration import accelerate_tokenizer
from layton.ladd_sampling import consistency_latents
from layton.perceptual import build_lpips
from layton.ray_cluster import ray_session
from layton.tokenizer import LaytonTokenizer, check_tokenizer_models, images_to_tensor, is_tokenizer_dir
from pipelines.precompute import read_marker, training_read
from pipelines.tokenizer_data import (decode_image, precompute, precompute_settings, read_precomputed,
                                      read_shard_images, shard_tars)
from stages.tokenizer.config import TokenizerTrainConfig
from workflows.train_common import (LoopSettings, MetricsLog, TrainResult, Worker, autocast, exported_step, fit,
                                    run_training)
from workflows.train_resources import check_cluster_cpus


def init_from(config: TokenizerTrainConfig) -> str:
    return config.stage2.init_from or config.export_dir(1)


# --- the loop that runs on every worker ------------------------------------------------------------


def _build_model(config: TokenizerTrainConfig, stage: int) -> LaytonTokenizer:
    if stage == 1:
        return LaytonTokenizer.build(config.model)
    tok = LaytonTokenizer.from_pretrained(init_from(config))
    if tok.spec.get("consistency"):
        raise ValueError(f"stage2.init_from: {init_from(config)} already has a consistency LoRA fused (a stage-2 export)")
    tok.fuse_consistency(config.stage2.consistency)
    return tok


@dataclass
class Batch:
    features: torch.Tensor  # (B, 8, h, w) codebook vectors of the tokens
    latents: torch.Tensor | None  # (B, 4, R/8, R/8) scaled VAE latents (stage 1)
    pixels: torch.Tensor | None  # (B, 3, R, R) in [-1, 1] (stage 2)
    skipped: int
    resolution: int  # R: the target size of this step
    encoder_size: int  # the VQ's input size of this step


def make_batch(batch: dict, tok: LaytonTokenizer, px: int, enc_size: int, *, latents: bool, pixels: bool) -> Batch | None:
    """Rows of shard images or of the precompute pass -> model inputs; unusable images are skipped."""
    device = tok.device
    n = len(batch["key"])
    errors = batch.get("error", [None] * n)
    keep, images = [], []
    for i in range(n):
        if errors[i]:
            continue
        img, _ = decode_image(batch["image"][i]) if (pixels or f"tokens_{enc_size}" not in batch) else (True, None)
        if img is not None:
            keep.append(i)
            images.append(img)
    skipped = n - len(keep)
    if not keep:
        return None
    precomputed = f"tokens_{enc_size}" in batch
    if precomputed:
        ids = torch.from_numpy(np.stack([batch[f"tokens_{enc_size}"][i] for i in keep]).astype(np.int64))
        side = enc_size // 16
        features = tok.token_features(ids.view(len(keep), side, side))
    else:
        features = tok.token_features(tok.encode(images, encoder_size=enc_size))
    z = None
    if latents:
        if f"latent_{px}" in batch:
            shape = (tok.vae.config.latent_channels, px // tok.vae_scale, px // tok.vae_scale)
            z = torch.from_numpy(np.stack([np.frombuffer(batch[f"latent_{px}"][i], dtype=np.float16).reshape(shape) for i in keep]))
            z = z.float().to(device)
        else:
            with torch.no_grad():
                z = tok.vae_encode(images_to_tensor(images, px).to(device)).float()
    x = images_to_tensor(images, px).to(device) if pixels else None
    return Batch(features, z, x, skipped, px, enc_size)


def stage1_loss(model, noise_scheduler, b: Batch, generator: torch.Generator) -> torch.Tensor:
    """ε-prediction MSE at t ~ U[0, 1000) on SDXL's noise schedule."""
    z0 = b.latents
    noise = torch.randn(z0.shape, generator=generator).to(z0.device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (z0.shape[0],), generator=generator).to(z0.device)
    z_t = noise_scheduler.add_noise(z0, noise, t)
    return F.mse_loss(model(z_t, t, b.features).float(), noise)


def stage2_loss(model, tok: LaytonTokenizer, lpips, timesteps: list[int], b: Batch, px: int, generator) -> torch.Tensor:
    """LPIPS(VAE-decode(ẑ0), x0), ẑ0 from pure noise in 1-2 consistency steps (the last with gradients)."""
    shape = (b.pixels.shape[0], tok.vae.config.latent_channels, px // tok.vae_scale, px // tok.vae_scale)
    noise = torch.randn(shape, generator=generator).to(b.pixels.device)
    z0 = consistency_latents(model, b.features, noise, tok.scheduler_config, timesteps, generator, grad_last_only=True)
    x = tok.vae_decode(z0).float()
    return lpips(x, b.pixels).mean()


class TokenizerTask:
    """A tokenizer stage's part of `run_training`: the trainable ControlNet copy and token embedder
    (everything else frozen), the stage's loss, and rank 0's reconstruction grids."""

    skipped_metric = "skipped_images"

    def __init__(self, config: TokenizerTrainConfig, stage: int, worker: Worker):
        st = config.stage(stage)
        self.config, self.stage, self.st, self.rank = config, stage, st, worker.rank
        self.name, self.state = f"stage{stage}", {"stage": stage}
        tok = _build_model(config, stage).to(worker.device)
        if st.gradient_checkpointing:
            tok.ladd.enable_gradient_checkpointing()
        if worker.device.type == "cuda" and st.mixed_precision != "no":
            half = torch.bfloat16 if st.mixed_precision == "bf16" else torch.float16
            for frozen in (tok.ladd.unet, tok.vae, tok.vq):  # frozen weights in half precision; trainable stay float32
                frozen.to(half)
        accelerate_tokenizer(tok, st.accel)  # after the dtypes, before the optimizer and DDP
        self.tok, self.module, self.params = tok, tok.ladd, tok.ladd.trainable_parameters()
        self.noise_scheduler = DDPMScheduler.from_config(tok.scheduler_config)
        self.lpips, self.timesteps = None, None
        if stage == 2:
            self.lpips = build_lpips(config.stage2.lpips.net, config.stage2.lpips.backbone).to(worker.device)
            self.timesteps = config.stage2.consistency.resolved_timesteps()
        self.grid: tuple[torch.Tensor, torch.Tensor, int] | None = None  # rank 0: (features, targets, px) for the grids

    def load(self, d: Path) -> None:
        self.tok.load_trained(d)

    def save(self, d: Path) -> None:
        self.tok.save_pretrained(d, stage=self.stage)

    def make_batch(self, rows: dict, step: int) -> Batch | None:
        px = self.st.resolution_at(step)
        # The encoder scale is drawn per step, identically on every worker (a seeded draw).
        enc_size = int(np.random.default_rng([self.config.run.seed, step]).choice(self.config.model.encoder_sizes))
        want_grid = self.rank == 0 and self.grid is None  # the first usable batch's images become the grids' targets
        b = make_batch(rows, self.tok, px, enc_size, latents=self.stage == 1, pixels=self.stage == 2 or want_grid)
        if b is not None and want_grid and b.pixels is not None:
            k = min(4, b.pixels.shape[0])
            self.grid = (b.features[:k], b.pixels[:k], px)
        return b

    def batch_size(self, b: Batch) -> int:
        return b.features.shape[0]

    def loss(self, model, b: Batch, generator: torch.Generator) -> torch.Tensor:
        if self.stage == 1:
            return stage1_loss(model, self.noise_scheduler, b, generator)
        return stage2_loss(model, self.tok, self.lpips, self.timesteps, b, b.resolution, generator)

    def log_metrics(self, b: Batch) -> dict:
        return {"resolution": b.resolution, "encoder_size": b.encoder_size}

    def save_images(self, step: int, mlog: MetricsLog) -> None:
        """Top row: targets; bottom row: reconstructions (stage 1 by 8 DDIM steps, stage 2 by its consistency steps)."""
        if self.grid is None:
            return
        tok, (features, targets, px) = self.tok, self.grid
        was_training = tok.ladd.training
        tok.ladd.eval()
        # Under the training step's autocast: with mixed_precision the frozen UNet and VAE hold half weights.
        with torch.no_grad(), autocast(tok.device, self.st.mixed_precision):
            z = tok.latents(features, px, steps=8 if self.stage == 1 else None, generator=torch.Generator("cpu").manual_seed(0))
            recon = tok.vae_decode(z).float().clamp(-1, 1)
        tok.ladd.train(was_training)
        mlog.save_grid(f"grids/step_{step:07d}.png", torch.cat([targets.cpu(), recon.cpu()]), targets.shape[0],
                       "reconstruction", step)


def train_loop(loop_config: dict) -> None:
    config = TokenizerTrainConfig.model_validate(loop_config["config"])
    stage = loop_config["stage"]
    st = config.stage(stage)
    run_training(lambda worker: TokenizerTask(config, stage, worker), LoopSettings.of(st, image_every=st.image_every),
                 seed=config.run.seed, data_cfg=config.data, job_dir=config.stage_dir(stage))


# --- the driver ---------------------------------------------------------------------------------


def check_stage_inputs(config: TokenizerTrainConfig, stage: int) -> None:
    """Everything a stage will read, checked before Ray starts; errors name the path."""
    check_tokenizer_models(config.model, config.stage2.consistency if stage == 2 else None,
                           config.stage2.lpips if stage == 2 else None)
    shard_tars(config.data.shards)
    check_cluster_cpus(config)
    if stage == 2 and not is_tokenizer_dir(init_from(config)):
        raise FileNotFoundError(
            f"stage2.init_from: {init_from(config)} is not a tokenizer directory (run stage 1 first, or set stage2.init_from)"
        )


def run_tokenizer_stage(config: TokenizerTrainConfig, stage: int) -> TrainResult:
    t0 = time.time()
    st = config.stage(stage)
    check_stage_inputs(config, stage)
    out, export = config.stage_dir(stage), config.export_dir(stage)
    marker = None
    if exported_step(export) == st.max_steps:
        # LaytonGen reads the precompute pass: keep it current even when training has nothing to do.
        if config.data.precompute and (read_marker(config.precompute_path()) or {}).get("settings") != precompute_settings(config):
            with ray_session(config.ray):
                marker = precompute(config)
        return TrainResult.of(export, t0, skipped=True, precompute=marker, stage=stage)

    with ray_session(config.ray):
        if config.data.precompute:
            marker = precompute(config)
            dataset = read_precomputed(config)
        else:
            dataset = read_shard_images(config.data.shards, **training_read(config.data))
        metrics = fit(train_loop, {"config": config.model_dump(mode="json"), "stage": stage}, config, out,
                      {"train": dataset}, export)
    return TrainResult.of(export, t0, metrics=metrics, precompute=marker, stage=stage)
