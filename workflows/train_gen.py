"""LaytonGen training on Ray Train: cross-entropy over the image tokens, text features precomputed.

`run_gen_training(config)` is what `layton train gen CONFIG` runs: the text precompute pass (flan-t5
over the captions of the tokenizer's precompute, once), then `train_loop` on N `TorchTrainer`
workers with DDP; each runs `train_common.run_training` with a `GenTask`. Layout under
`run.storage_path` (a local path or a URI):

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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from layton.acceleration import accelerate_gpt
from layton.devices import pick_dtype
from layton.gpt import GPT, GPTConfig, load_llamagen_gpt, rope_2d
from layton.gpt_sampling import SamplingParams
from layton.laytongen import LaytonGenPipeline, gpt_directory, load_gpt_state_dict, save_laytongen
from layton.model_files import check_model_dir, load_torch_state_dict
from layton.ray_cluster import ray_session
from layton.storage import Root, absolute
from layton.text_encoder import T5_MAX_LENGTH, T5TextEncoder, pad_valid_tokens
from layton.tokenizer import LaytonTokenizer, images_to_tensor, read_tokenizer_index
from pipelines.gen_data import check_token_pass, read_text_pass, text_precompute
from stages.laytongen.config import GenTrainConfig
from workflows.train_common import (LoopSettings, MetricsLog, TrainResult, Worker, exported_step, fit,
                                    run_training)
from workflows.train_resources import check_cluster_cpus


def build_gpt(config: GenTrainConfig, vocab_size: int, caption_dim: int) -> GPT:
    """Random init (seeded by run.seed), or `model.init_from`: a LaytonGen/GPT directory or a LlamaGen .pt."""
    arch, m = config.model.gpt, config.model
    kw = dict(token_dropout_p=arch.token_dropout_p, resid_dropout_p=arch.resid_dropout_p, ffn_dropout_p=arch.ffn_dropout_p,
              caption_dropout_p=arch.caption_dropout_p, block_size=(m.image_size // 16) ** 2)
    if m.init_from:
        src = m.init_from
        if gpt_directory(src) is not None:
            gpt = GPT.from_pretrained(gpt_directory(src))
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


class GenTask:
    """LaytonGen's part of `run_training`: the GPT, the text pass's rows as batches, teacher-forced
    CE with caption dropout, and rank 0's sample grids."""

    name, skipped_metric, state = "laytongen", "skipped_rows", {}

    def __init__(self, config: GenTrainConfig, vocab_size: int, caption_dim: int, worker: Worker):
        self.config, self.caption_dim, self.device = config, caption_dim, worker.device
        self.gpt = accelerate_gpt(build_gpt(config, vocab_size, caption_dim).to(worker.device), config.train.accel, training=True)
        self.module, self.params = self.gpt, list(self.gpt.parameters())
        self.uniform_ce = float(np.log(vocab_size))  # the loss of knowing nothing, logged next to it
        self.spec = dict(text_encoder=config.model.text_encoder, tokenizer=config.model.tokenizer,
                         image_size=config.model.image_size, sampling=config.sampling.model_dump(mode="json", exclude={"accel"}))
        self.pipe: LaytonGenPipeline | None = None  # for the sample grids; loaded once, on rank 0 only

    def load(self, d: Path) -> None:
        self.gpt.load_state_dict(load_gpt_state_dict(d, device=self.device))

    def save(self, d: Path) -> None:
        save_laytongen(d, self.gpt, **self.spec)

    def make_batch(self, rows: dict, step: int) -> Batch | None:
        return make_batch(rows, self.caption_dim, self.device)

    def batch_size(self, b: Batch) -> int:
        return b.idx.shape[0]

    def loss(self, model, b: Batch, generator: torch.Generator) -> torch.Tensor:
        drop = (torch.rand(b.idx.shape[0], generator=generator) < self.config.model.gpt.caption_dropout_p).to(self.device)
        return gen_loss(model, b, drop)

    def log_metrics(self, b: Batch) -> dict:
        return {"uniform_ce": self.uniform_ce}

    def save_images(self, step: int, mlog: MetricsLog) -> None:
        """A grid of `train.sample_prompts` sampled with the run's sampling settings and decoded."""
        config, gpt = self.config, self.gpt
        s = config.sampling
        if self.pipe is None:
            dtype = pick_dtype(s.dtype, self.device)  # the decoder's weights; the GPT being trained stays float32
            tok = LaytonTokenizer.from_pretrained(config.model.tokenizer, dtype=dtype, accel=s.accel).to(self.device)
            self.pipe = LaytonGenPipeline(gpt, T5TextEncoder(config.model.text_encoder, device=self.device), tok, {}, dtype)
        params = SamplingParams(cfg_scale=s.cfg_scale, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
        was_training = gpt.training
        try:
            out = self.pipe(config.train.sample_prompts, seed=config.run.seed, params=params, size=s.image_size,
                            steps=s.decode_steps)
        finally:
            gpt.train(was_training)
        mlog.save_grid(f"samples/step_{step:07d}.png", images_to_tensor([g.image for g in out], s.image_size), len(out),
                       "samples", step)


def train_loop(loop_config: dict) -> None:
    config = GenTrainConfig.model_validate(loop_config["config"])
    tr = config.train
    run_training(lambda worker: GenTask(config, loop_config["vocab_size"], loop_config["caption_dim"], worker),
                 LoopSettings.of(tr, image_every=tr.sample_every), seed=config.run.seed, data_cfg=config.data,
                 job_dir=config.job_dir())


# --- the driver ---------------------------------------------------------------------------------


def check_gen_models(config: GenTrainConfig) -> int:
    """The text encoder and `model.init_from` (what no other stage writes). Returns the caption dim."""
    m = config.model
    t5 = check_model_dir(m.text_encoder, "model.text_encoder")
    if m.init_from and not Root(m.init_from).exists():
        raise FileNotFoundError(f"model.init_from: {m.init_from} does not exist")
    return json.loads((t5 / "config.json").read_text())["d_model"]


def check_gen_inputs(config: GenTrainConfig) -> tuple[int, int]:
    """Every file the job reads, checked before Ray starts (errors name the field and path).
    Returns (vocab size = the tokenizer VQ's codebook, caption dim = the text encoder's width)."""
    m = config.model
    caption_dim = check_gen_models(config)
    vq = read_tokenizer_index(m.tokenizer, "model.tokenizer")["vq"]
    vocab = load_torch_state_dict(vq, "LlamaGen VQ", mmap=True)["quantize.embedding.weight"].shape[0]  # shape only
    marker = check_token_pass(config)
    check_cluster_cpus(config)
    if absolute(marker["settings"]["vq"]) != absolute(vq):
        raise ValueError(f"data.tokens: {config.data.tokens} was encoded with {marker['settings']['vq']}, "
                         f"but model.tokenizer decodes with {vq}")
    return vocab, caption_dim


def run_gen_training(config: GenTrainConfig) -> TrainResult:
    t0 = time.time()
    vocab, caption_dim = check_gen_inputs(config)
    export = config.export_dir()
    if exported_step(export) == config.train.max_steps:
        return TrainResult.of(export, t0, skipped=True)
    with ray_session(config.ray):
        marker = text_precompute(config)
        metrics = fit(train_loop, {"config": config.model_dump(mode="json"), "vocab_size": vocab, "caption_dim": caption_dim},
                      config, config.job_dir(), {"train": read_text_pass(config)}, export)
    return TrainResult.of(export, t0, metrics=metrics, precompute=marker)
