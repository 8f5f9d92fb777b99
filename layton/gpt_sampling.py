"""Sampling image tokens from the GPT: KV cache, classifier-free guidance, top-k / top-p / temperature.

CFG follows LlamaGen: the unconditional caption is the model's `uncond_embedding` under the same
caption mask, and ℓ = ℓ_u + s·(ℓ_c − ℓ_u) — but only when s > 1. For s <= 1 (0.5, 0, and 1 itself)
LlamaGen's `generate()` runs no unconditional rows and samples from ℓ_c alone, and so does this
sampler (`guides`); s in (0, 1) is not an interpolation towards ℓ_u here. `cfg_mode="batch"` runs
conditional and unconditional rows as one forward of 2B rows (one weight read per step, LlamaGen's
way); "two_pass" runs them as two B-row forwards with their own caches (for comparison); "off"
samples from ℓ_c alone whatever the scale.

Every row draws from its own generator seeded by its seed, so a prompt's tokens do not depend on
which other prompts share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

from layton.gpt import GPT

CfgMode = Literal["batch", "two_pass", "off"]


@dataclass(frozen=True)
class SamplingParams:
    cfg_scale: float = 7.5  # LlamaGen's t2i default
    temperature: float = 1.0
    top_k: int = 1000  # 0: no top-k
    top_p: float = 1.0  # 1: no nucleus filtering
    cfg_mode: CfgMode = "batch"

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits outside the top k, or beyond cumulative probability top_p (the first token kept), -> -inf."""
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
        drop[..., 0] = False
        logits[drop.scatter(-1, order, drop)] = float("-inf")
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
    """(B, vocab) logits -> (B,) token ids, row i drawn with generators[i]."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logits = filter_logits(logits / max(params.temperature, 1e-5), params.top_k, params.top_p)
    probs = F.softmax(logits, dim=-1).cpu()
    return torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)]).to(logits.device)


def guides(params: SamplingParams) -> bool:
    """Whether sampling uses classifier-free guidance: LlamaGen's `cfg_scale > 1.0` (and a mode that guides)."""
    return params.cfg_mode != "off" and params.cfg_scale > 1.0


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def _uncond_caption(model: GPT, caption: torch.Tensor) -> torch.Tensor:
    return model.cls_embedding.uncond_embedding.to(caption.dtype).expand_as(caption)


@torch.no_grad()
def generate_tokens(model: GPT, caption: torch.Tensor, caption_mask: torch.Tensor | None, seeds: list[int],
                    params: SamplingParams = SamplingParams(), *, use_cache: bool = True,
                    num_tokens: int | None = None) -> torch.Tensor:
    """caption (B, 120, caption_dim) left-padded, caption_mask (B, 120) -> (B, num_tokens) image token ids.

    `use_cache=False` recomputes the whole sequence every step (the reference the cache must match).
    Guidance applies only when `params.cfg_scale > 1` (LlamaGen's rule); otherwise the tokens are
    drawn from the conditional logits alone, exactly as with `cfg_mode="off"`.
    """
    cfg = model.config
    n = num_tokens or cfg.block_size
    b = caption.shape[0]
    if len(seeds) != b:
        raise ValueError(f"{len(seeds)} seeds for {b} captions")
    device = model.tok_embeddings.weight.device
    caption = caption.to(device=device, dtype=model.cls_embedding.uncond_embedding.dtype)
    caption_mask = caption_mask.to(device) if caption_mask is not None else None
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    was_training = model.training
    model.eval()
    try:
        if params.cfg_mode not in ("batch", "two_pass", "off"):
            raise ValueError(f"unknown cfg_mode {params.cfg_mode!r}")
        if not guides(params):
            params = replace(params, cfg_mode="off")
        return _sample(model, caption, caption_mask, b, n, generators, params, use_cache)
    finally:
        model.train(was_training)


def _sample(model: GPT, caption, caption_mask, b: int, n: int, generators, params: SamplingParams, use_cache: bool):

    # The forward passes of one step: (captions, masks) per pass; their logits combine by `combine`.
    if params.cfg_mode == "off":
        passes = [(caption, caption_mask)]
    elif params.cfg_mode == "batch":
        masks = None if caption_mask is None else torch.cat([caption_mask, caption_mask])
        passes = [(torch.cat([caption, _uncond_caption(model, caption)]), masks)]
    elif params.cfg_mode == "two_pass":
        passes = [(caption, caption_mask), (_uncond_caption(model, caption), caption_mask)]
    else:
        raise ValueError(f"unknown cfg_mode {params.cfg_mode!r}")

    def combine(outs: list[torch.Tensor]) -> torch.Tensor:
        if params.cfg_mode == "off":
            return outs[0]
        both = torch.cat(outs)
        return guide(both[:b], both[b:], params.cfg_scale)

    tokens = torch.empty(b, 0, dtype=torch.long, device=caption.device)
    if use_cache:
        caches = [model.new_cache(c.shape[0]) for c, _ in passes]
        logits = combine([model.prefill(c, m, cache) for (c, m), cache in zip(passes, caches)])
    else:
        logits = combine([model(tokens.repeat(c.shape[0] // b, 1), c, m)[:, -1] for c, m in passes])
    for step in range(n):
        nxt = sample_next(logits, params, generators)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if step == n - 1:
            break
        if use_cache:
            rep = [nxt.repeat(c.shape[0] // b) for c, _ in passes]
            logits = combine([model.decode_step(t, cache) for t, cache in zip(rep, caches)])
        else:
            logits = combine([model(tokens.repeat(c.shape[0] // b, 1), c, m)[:, -1] for c, m in passes])
    return tokens
