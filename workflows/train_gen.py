"""LaytonGen training on Ray Train: cross-entropy over the image tokens, text features precomputed.

`run_gen_training(config)` is what `layton train gen CONFIG` runs: the text precompute pass (flan-t5
over the captions of the tokenizer's precompute, once), then `train_loop` on N `TorchTrainer`
workers with DDP. Layout under `run.storage_path`:

    <name>/checkpoint_*/   Ray Train checkpoints: a LaytonGen directory + optimizer state
    <name>/tensorboard/    loss, lr, grad norm, samples/s, skipped rows, sample grids
    <name>/samples/        sample grid PNGs (`train.sample_prompts`), every `train.sample_every` steps
    <name>/history.jsonl   the logged metrics
    <name>/laytongen/      the export of the last checkpoint (`LaytonGenPipeline.from_pretrained`)
    <name>-text/           the text precompute pass

Rerunning the same config resumes from the latest checkpoint; a run whose export reached max_steps
is not run again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from layton.config import GenTrainConfig
from layton.gpt import CONFIG_NAME as GPT_CONFIG_NAME
from layton.gpt import GPT, GPTConfig, load_llamagen_gpt, rope_2d
from layton.laytongen import write_spec
from layton.text_encoder import T5_MAX_LENGTH, pad_valid_tokens
from workflows.train_common import (EpochBatches, MetricsLog, autocast, build_optimizer, clip_and_step, exported_step,
                                    check_epoch, fit, report_step, save_grid)

log = logging.getLogger(__name__)


def job_dir(config: GenTrainConfig) -> Path:
    return Path(config.run.storage_path).resolve() / config.run.name


def build_gpt(config: GenTrainConfig, vocab_size: int, caption_dim: int) -> GPT:
    """Random init (seeded by run.seed), or `model.init_from`: a LaytonGen/GPT directory or a LlamaGen .pt."""
    arch, m = config.model.gpt, config.model
    kw = dict(token_dropout_p=arch.token_dropout_p, resid_dropout_p=arch.resid_dropout_p, ffn_dropout_p=arch.ffn_dropout_p,
              caption_dropout_p=arch.caption_dropout_p, block_size=(m.image_size // 16) ** 2)
    if m.init_from:
        src = Path(m.init_from)
        if (src / GPT_CONFIG_NAME).is_file():
            gpt = GPT.from_pretrained(src)
            gpt = _with_config(gpt, {**gpt.config.to_dict(), **kw})
        else:
            gpt = load_llamagen_gpt(src, n_head=arch.n_head, **kw)
        c = gpt.config
        if (c.vocab_size, c.caption_dim) != (vocab_size, caption_dim):
            raise ValueError(f"model.init_from: {src} has vocab {c.vocab_size} / caption dim {c.caption_dim}; the tokenizer's "
                             f"codebook has {vocab_size} codes and the text encoder gives {caption_dim}-d features")
        return gpt.train()
    dims = dict(n_layer=arch.n_layer, n_head=arch.n_head, dim=arch.dim)
    base = GPTConfig(**dims, vocab_size=vocab_size, caption_dim=caption_dim, cls_token_num=T5_MAX_LENGTH, **kw) \
        if arch.dim else GPTConfig.preset(arch.size, vocab_size=vocab_size, caption_dim=caption_dim, cls_token_num=T5_MAX_LENGTH, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)  # every worker builds the same initial weights
        return GPT(base).train()


def _with_config(gpt: GPT, cfg: dict) -> GPT:
    """The same weights under a config that differs in non-weight settings (dropout rates)."""
    new = GPTConfig.from_dict(cfg)
    with torch.device("meta"):
        out = GPT(new)
    out.load_state_dict(gpt.state_dict(), assign=True)
    out.rope = rope_2d(new)  # the grid may differ from the source's
    return out


@dataclass
class Batch:
    idx: torch.Tensor  # (B, N) image token ids
    caption: torch.Tensor  # (B, 120, D) left-padded T5 features
    mask: torch.Tensor  # (B, 120)
    skipped: int


def make_batch(rows: dict, caption_dim: int, device) -> Batch | None:
    """Rows of the text pass -> model inputs; rows with an `error` are skipped (and counted)."""
    n = len(rows["key"])
    keep = [i for i in range(n) if not rows["error"][i]]
    if not keep:
        return None
    idx = torch.from_numpy(np.stack([np.asarray(rows["tokens"][i]) for i in keep]).astype(np.int64))
    feats = [np.frombuffer(rows["text"][i], dtype=np.float16).reshape(int(rows["text_len"][i]), caption_dim) for i in keep]
    caption, mask = pad_valid_tokens(feats)
    return Batch(idx.to(device), caption.to(device), mask.to(device), n - len(keep))


def gen_loss(model, b: Batch, drop: torch.Tensor) -> torch.Tensor:
    """Teacher-forced CE over every image token (the last caption position predicts token 0)."""
    logits = model(b.idx[:, :-1], b.caption, b.mask, drop)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b.idx.reshape(-1))


def _save_samples(gpt: GPT, config: GenTrainConfig, pipe_cache: dict, path: Path, mlog: MetricsLog, step: int) -> None:
    """A grid of `train.sample_prompts` sampled with the run's sampling settings and decoded."""
    from layton.gpt_sampling import SamplingParams
    from layton.laytongen import LaytonGenPipeline
    from layton.text_encoder import T5TextEncoder
    from layton.tokenizer import LaytonTokenizer, images_to_tensor

    device = gpt.tok_embeddings.weight.device
    if "pipe" not in pipe_cache:  # loaded once, on rank 0 only
        pipe_cache["pipe"] = LaytonGenPipeline(gpt, T5TextEncoder(config.model.text_encoder, device=device),
                                               LaytonTokenizer.from_pretrained(config.model.tokenizer).to(device), {})
    pipe = pipe_cache["pipe"]
    s = config.sampling
    params = SamplingParams(cfg_scale=s.cfg_scale, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    was_training = gpt.training
    try:
        out = pipe(config.train.sample_prompts, seed=config.run.seed, params=params, size=s.image_size, steps=s.decode_steps)
    finally:
        gpt.train(was_training)
    save_grid(images_to_tensor([g.image for g in out], s.image_size), len(out), path, mlog, "samples", step)


def train_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    from safetensors.torch import load_file

    from layton.checkpoint_io import load_training_state
    from layton.gpt import WEIGHTS_NAME

    config = GenTrainConfig.model_validate(loop_config["config"])
    vocab_size, caption_dim = loop_config["vocab_size"], loop_config["caption_dim"]
    tr = config.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.run.seed + rank)

    gpt = build_gpt(config, vocab_size, caption_dim).to(device)
    opt, lr_sched = build_optimizer(tr.optim, gpt.parameters())
    step = resumed_from = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            gpt.load_state_dict(load_file(Path(d) / WEIGHTS_NAME, device=str(device)))
            step = resumed_from = load_training_state(Path(d), opt, lr_sched)["step"]
        log.warning("LaytonGen resumes at step %d", step)
    model = ray.train.torch.prepare_model(gpt, parallel_strategy_kwargs={"find_unused_parameters": False}) if world > 1 else gpt
    model.train()

    out = job_dir(config)
    mlog = MetricsLog(out, rank, "laytongen", resumed_from)
    batches = EpochBatches(ray.train.get_dataset_shard("train"), tr.batch_size, config.data, rank)
    spec = dict(text_encoder=config.model.text_encoder, tokenizer=config.model.tokenizer, image_size=config.model.image_size,
                sampling=config.sampling.model_dump(mode="json"))

    def save(d: Path) -> None:
        gpt.save_pretrained(d)
        write_spec(d, **spec)

    skipped_total, epoch, pipe_cache = 0, 0, {}
    while step < tr.max_steps:
        seen, epoch, steps_at_epoch_start = 0, epoch + 1, step
        for rows in batches.epoch(epoch):
            seen += 1
            b = make_batch(rows, caption_dim, device)
            if b is None:
                skipped_total += len(rows["key"])
                continue
            skipped_total += b.skipped
            gen = torch.Generator("cpu").manual_seed(config.run.seed * 1_000_003 + step * 1009 + rank)
            drop = (torch.rand(b.idx.shape[0], generator=gen) < config.model.gpt.caption_dropout_p).to(device)
            with autocast(device, tr.mixed_precision):
                loss = gen_loss(model, b, drop)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_and_step(opt, lr_sched, gpt.parameters(), tr.optim.grad_clip)
            step += 1
            mlog.add(loss.item(), b.idx.shape[0] * world)
            if rank == 0 and (step % tr.sample_every == 0 or step == tr.max_steps):
                _save_samples(gpt, config, pipe_cache, out / "samples" / f"step_{step:07d}.png", mlog, step)
            metrics = None
            if step % tr.log_every == 0 or step % tr.checkpoint_every == 0 or step == tr.max_steps:
                metrics = mlog.flush(step, lr=lr_sched.get_last_lr()[0], grad_norm=grad_norm, skipped_rows=skipped_total,
                                     uniform_ce=float(np.log(vocab_size)))
            report_step(metrics, step % tr.checkpoint_every == 0 or step == tr.max_steps, save, opt, lr_sched,
                        {"step": step}, rank)
            if step >= tr.max_steps:
                break
        check_epoch(seen, step > steps_at_epoch_start, skipped_total)
    mlog.close()


# --- the driver ---------------------------------------------------------------------------------


@dataclass
class GenResult:
    directory: str  # the LaytonGen export
    step: int
    skipped: bool  # the export was already complete: nothing ran
    metrics: dict
    precompute: dict | None
    seconds: float


def check_gen_inputs(config: GenTrainConfig) -> tuple[int, int]:
    """Every file the job reads, checked before Ray starts (errors name the field and path).
    Returns (vocab size = the tokenizer VQ's codebook, caption dim = the text encoder's width)."""
    from layton.model_files import check_model_dir, load_torch_state_dict
    from layton.tokenizer import CONFIG_NAME as TOKENIZER_CONFIG
    from pipelines.gen_data import check_token_pass

    m = config.model
    t5 = check_model_dir(m.text_encoder, "model.text_encoder")
    caption_dim = json.loads((t5 / "config.json").read_text())["d_model"]
    tok_cfg = Path(m.tokenizer) / TOKENIZER_CONFIG
    if not tok_cfg.is_file():
        raise FileNotFoundError(f"model.tokenizer: {m.tokenizer} is not a Layton tokenizer directory (no {TOKENIZER_CONFIG})")
    vq = json.loads(tok_cfg.read_text())["vq"]
    vocab = load_torch_state_dict(vq, "LlamaGen VQ", mmap=True)["quantize.embedding.weight"].shape[0]  # shape only
    if m.init_from and not Path(m.init_from).exists():
        raise FileNotFoundError(f"model.init_from: {m.init_from} does not exist")
    marker = check_token_pass(config)
    if Path(marker["settings"]["vq"]).resolve() != Path(vq).resolve():
        raise ValueError(f"data.tokens: {config.data.tokens} was encoded with {marker['settings']['vq']}, "
                         f"but model.tokenizer decodes with {vq}")
    return vocab, caption_dim


def run_gen_training(config: GenTrainConfig) -> GenResult:
    import ray

    from layton.ray_cluster import init_ray
    from pipelines.gen_data import read_text_pass, text_precompute

    t0 = time.time()
    vocab, caption_dim = check_gen_inputs(config)
    config = config.with_absolute_paths()
    out = job_dir(config)
    export = out / "laytongen"
    if exported_step(export) == config.train.max_steps:
        return GenResult(str(export), config.train.max_steps, True, {}, None, time.time() - t0)
    started_here = init_ray(config.ray)
    try:
        marker = text_precompute(config)
        result = fit(train_loop, {"config": config.model_dump(mode="json"), "vocab_size": vocab, "caption_dim": caption_dim},
                     config.run, out, {"train": read_text_pass(config)}, export)
    finally:
        if started_here:
            ray.shutdown()
    return GenResult(str(export), exported_step(export), False, dict(result.metrics or {}), marker, time.time() - t0)
