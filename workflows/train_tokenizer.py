"""Tokenizer training on Ray Train: stage 1 (diffusion loss) and stage 2 (consistency + LPIPS).

`run_tokenizer_stage(config, stage)` is what `layton train tokenizer --stage N CONFIG` runs. The
training loop is a plain function of its config (`train_loop`), run by a `TorchTrainer` on N
workers (DDP over the trainable ControlNet copy and token embedder; everything else is frozen).

Layout under `run.storage_path`:

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

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from layton.config import TokenizerTrainConfig
from layton.tokenizer import CONFIG_NAME, LaytonTokenizer, check_tokenizer_models, images_to_tensor
from workflows.train_common import (EpochBatches, MetricsLog, autocast, build_optimizer, clip_and_step, exported_step,
                                    check_epoch, fit, report_step, save_grid)

log = logging.getLogger(__name__)


def stage_dir(config: TokenizerTrainConfig, stage: int) -> Path:
    return Path(config.run.storage_path).resolve() / f"{config.run.name}-stage{stage}"


def init_from(config: TokenizerTrainConfig) -> Path:
    return Path(config.stage2.init_from) if config.stage2.init_from else stage_dir(config, 1) / "tokenizer"


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


def make_batch(batch: dict, tok: LaytonTokenizer, px: int, enc_size: int, *, latents: bool, pixels: bool) -> Batch | None:
    """Rows of shard images or of the precompute pass -> model inputs; unusable images are skipped."""
    from pipelines.tokenizer_data import decode_image

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
    return Batch(features, z, x, skipped)


def stage1_loss(model, noise_scheduler, b: Batch, generator: torch.Generator) -> torch.Tensor:
    """ε-prediction MSE at t ~ U[0, 1000) on SDXL's noise schedule."""
    z0 = b.latents
    noise = torch.randn(z0.shape, generator=generator).to(z0.device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (z0.shape[0],), generator=generator).to(z0.device)
    z_t = noise_scheduler.add_noise(z0, noise, t)
    return F.mse_loss(model(z_t, t, b.features).float(), noise)


def stage2_loss(model, tok: LaytonTokenizer, lpips, timesteps: list[int], b: Batch, px: int, generator) -> torch.Tensor:
    """LPIPS(VAE-decode(ẑ0), x0), ẑ0 from pure noise in 1-2 consistency steps (the last with gradients)."""
    from layton.ladd_sampling import consistency_latents

    shape = (b.pixels.shape[0], tok.vae.config.latent_channels, px // tok.vae_scale, px // tok.vae_scale)
    noise = torch.randn(shape, generator=generator).to(b.pixels.device)
    z0 = consistency_latents(model, b.features, noise, tok.scheduler_config, timesteps, generator, grad_last_only=True)
    x = tok.vae_decode(z0).float()
    return lpips(x, b.pixels).mean()


def _save_grid(tok: LaytonTokenizer, features: torch.Tensor, targets: torch.Tensor, px: int, stage: int, path: Path,
               mlog: MetricsLog, step: int):
    """Top row: targets; bottom row: reconstructions (stage 1 by 8 DDIM steps, stage 2 by its consistency steps)."""
    was_training = tok.ladd.training
    tok.ladd.eval()
    with torch.no_grad():
        z = tok.latents(features, px, steps=8 if stage == 1 else None, generator=torch.Generator("cpu").manual_seed(0))
        recon = tok.vae_decode(z).float().clamp(-1, 1)
    tok.ladd.train(was_training)
    save_grid(torch.cat([targets.cpu(), recon.cpu()]), targets.shape[0], path, mlog, "reconstruction", step)


def train_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    from diffusers import DDPMScheduler
    from safetensors.torch import load_file

    from layton.checkpoint_io import load_training_state
    from layton.tokenizer import WEIGHTS_NAME

    config = TokenizerTrainConfig.model_validate(loop_config["config"])
    stage = loop_config["stage"]
    st = config.stage(stage)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.run.seed + rank)

    tok = _build_model(config, stage).to(device)
    if st.gradient_checkpointing:
        tok.ladd.enable_gradient_checkpointing()
    if st.vae_slicing:
        tok.vae.enable_slicing()
    if device.type == "cuda" and st.mixed_precision != "no":
        half = torch.bfloat16 if st.mixed_precision == "bf16" else torch.float16
        for frozen in (tok.ladd.unet, tok.vae, tok.vq):  # frozen weights in half precision; trainable stay float32
            frozen.to(half)
    opt, lr_sched = build_optimizer(st.optim, tok.ladd.trainable_parameters())

    step = resumed_from = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            tok.ladd.load_trainable_state_dict(load_file(Path(d) / WEIGHTS_NAME, device=str(device)))
            step = resumed_from = load_training_state(Path(d), opt, lr_sched)["step"]
        log.warning("stage %d resumes at step %d", stage, step)

    model = ray.train.torch.prepare_model(tok.ladd, parallel_strategy_kwargs={"find_unused_parameters": False}) if world > 1 else tok.ladd
    model.train()
    noise_scheduler = DDPMScheduler.from_config(tok.scheduler_config)
    lpips = None
    if stage == 2:
        from layton.perceptual import build_lpips

        lpips = build_lpips(config.stage2.lpips.net, config.stage2.lpips.backbone).to(device)
        timesteps = config.stage2.consistency.resolved_timesteps()

    out = stage_dir(config, stage)
    mlog = MetricsLog(out, rank, f"stage{stage}", resumed_from)
    batches = EpochBatches(ray.train.get_dataset_shard("train"), st.batch_size, config.data, rank)
    skipped_total = 0
    grid_batch = None
    epoch = 0
    while step < st.max_steps:
        seen, epoch, steps_at_epoch_start = 0, epoch + 1, step
        for rows in batches.epoch(epoch):
            seen += 1
            px = st.resolution_at(step)
            # The encoder scale is drawn per step, identically on every worker (a seeded draw).
            enc_size = int(np.random.default_rng([config.run.seed, step]).choice(config.model.encoder_sizes))
            b = make_batch(rows, tok, px, enc_size, latents=stage == 1, pixels=stage == 2 or (rank == 0 and grid_batch is None))
            gen = torch.Generator("cpu").manual_seed(config.run.seed * 1_000_003 + step * 1009 + rank)
            if b is None:
                skipped_total += len(rows["key"])
                continue
            skipped_total += b.skipped
            if grid_batch is None and rank == 0 and b.pixels is not None:
                k = min(4, b.pixels.shape[0])
                grid_batch = (b.features[:k], b.pixels[:k], px)
            with autocast(device, st.mixed_precision):
                if stage == 1:
                    loss = stage1_loss(model, noise_scheduler, b, gen)
                else:
                    loss = stage2_loss(model, tok, lpips, timesteps, b, px, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_and_step(opt, lr_sched, tok.ladd.trainable_parameters(), st.optim.grad_clip)
            step += 1
            mlog.add(loss.item(), b.features.shape[0] * world)

            if rank == 0 and (step % st.image_every == 0 or step == st.max_steps) and grid_batch is not None:
                feats, targets, gpx = grid_batch
                _save_grid(tok, feats, targets, gpx, stage, out / "grids" / f"step_{step:07d}.png", mlog, step)
            metrics = None
            if step % st.log_every == 0 or step % st.checkpoint_every == 0 or step == st.max_steps:
                metrics = mlog.flush(step, lr=lr_sched.get_last_lr()[0], grad_norm=grad_norm, skipped_images=skipped_total,
                                     resolution=px, encoder_size=enc_size)
            report_step(metrics, step % st.checkpoint_every == 0 or step == st.max_steps,
                        lambda d: tok.save_pretrained(d, stage=stage), opt, lr_sched, {"step": step, "stage": stage}, rank)
            if step >= st.max_steps:
                break
        check_epoch(seen, step > steps_at_epoch_start, skipped_total)
    mlog.close()


# --- the driver ---------------------------------------------------------------------------------


@dataclass
class StageResult:
    stage: int
    tokenizer_dir: str
    step: int
    skipped: bool  # the export was already complete: nothing ran
    metrics: dict
    precompute: dict | None
    seconds: float


def check_stage_inputs(config: TokenizerTrainConfig, stage: int) -> None:
    """Everything a stage will read, checked before Ray starts; errors name the path."""
    from pipelines.tokenizer_data import shard_tars

    check_tokenizer_models(config.model, config.stage2.consistency if stage == 2 else None,
                           config.stage2.lpips if stage == 2 else None)
    shard_tars(config.data.shards)
    if stage == 2 and not (init_from(config) / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"stage2.init_from: {init_from(config)} is not a tokenizer directory (run stage 1 first, or set stage2.init_from)"
        )


def run_tokenizer_stage(config: TokenizerTrainConfig, stage: int) -> StageResult:
    import ray

    from layton.ray_cluster import init_ray
    from pipelines.precompute import read_marker
    from pipelines.tokenizer_data import precompute, precompute_dir, precompute_settings, read_precomputed, read_shard_images

    t0 = time.time()
    st = config.stage(stage)
    check_stage_inputs(config, stage)
    config = config.with_absolute_paths()
    out = stage_dir(config, stage)
    export = out / "tokenizer"
    if exported_step(export) == st.max_steps:
        marker = None
        # LaytonGen reads the precompute pass: keep it current even when training has nothing to do.
        if config.data.precompute and (read_marker(precompute_dir(config)) or {}).get("settings") != precompute_settings(config):
            started_here = init_ray(config.ray)
            try:
                marker = precompute(config)
            finally:
                if started_here:
                    ray.shutdown()
        return StageResult(stage, str(export), st.max_steps, True, {}, marker, time.time() - t0)

    started_here = init_ray(config.ray)
    marker = None
    if config.data.precompute:
        marker = precompute(config)
        dataset = read_precomputed(config)
    else:
        dataset = read_shard_images(config.data.shards)

    try:
        result = fit(train_loop, {"config": config.model_dump(mode="json"), "stage": stage}, config.run, out,
                     {"train": dataset}, export)
    finally:
        if started_here:
            ray.shutdown()
    step = exported_step(export)
    return StageResult(stage, str(export), step, False, dict(result.metrics or {}), marker, time.time() - t0)
