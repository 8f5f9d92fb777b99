"""Tiny LlamaGen t2i GPT: the release format of `t2i_XL_stage1_256.pt`, small shapes, seeded weights.

`write_tiny_llamagen_gpt(dir, caption_dim, vocab_size)` writes `dir/t2i_tiny_stage1_256.pt` as
LlamaGen releases its GPTs, `torch.save({"model": state_dict})` with LlamaGen's key names, and the
same weights in the project's own format under `dir/gpt/` (`GPT.save_pretrained`). Sizes:

    component             real GPT-XL t2i                 tiny
    layers x heads x dim  36 x 20 x 1280 (head dim 64)    2 x 2 x 128 (head dim 64)
    SwiGLU hidden         3584                            512 (LlamaGen's rounding rule)
    caption_dim           2048 (flan-t5-xl)               64 (the tiny flan-t5)
    vocab                 16384 (VQ-16 codebook)          1024 (the tiny VQ's codebook)
    caption tokens        120                             120
    image tokens          256 (16 x 16)                   256 (16 x 16)

The key list is spelled out from LlamaGen's module layout (`autoregressive/models/gpt.py`) rather
than taken from `layton.gpt.GPT`, so the loader is checked against an independent description.
Weights follow LlamaGen's init (N(0, 0.02)) except the logits head, which LlamaGen zero-initialises
and which is random here so that an untrained tiny model samples varied tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from layton.gpt import load_llamagen_gpt

TINY = dict(n_layer=2, n_head=2, dim=128)
RELEASE_NAME = "t2i_tiny_stage1_256.pt"
CLS_TOKEN_NUM = 120


def llamagen_gpt_shapes(n_layer: int, dim: int, caption_dim: int, vocab_size: int, ffn_hidden: int,
                        cls_token_num: int = CLS_TOKEN_NUM) -> dict[str, tuple[int, ...]]:
    """LlamaGen t2i Transformer state-dict key -> shape (no grouped KV heads)."""
    s: dict[str, tuple[int, ...]] = {
        "cls_embedding.cap_proj.fc1.weight": (dim, caption_dim),
        "cls_embedding.cap_proj.fc2.weight": (dim, dim),
        "cls_embedding.uncond_embedding": (cls_token_num, caption_dim),
        "tok_embeddings.weight": (vocab_size, dim),
    }
    for i in range(n_layer):
        p = f"layers.{i}."
        s[p + "attention.wqkv.weight"] = (3 * dim, dim)
        s[p + "attention.wo.weight"] = (dim, dim)
        s[p + "feed_forward.w1.weight"] = (ffn_hidden, dim)
        s[p + "feed_forward.w3.weight"] = (ffn_hidden, dim)
        s[p + "feed_forward.w2.weight"] = (dim, ffn_hidden)
        s[p + "attention_norm.weight"] = (dim,)
        s[p + "ffn_norm.weight"] = (dim,)
    s["norm.weight"] = (dim,)
    s["output.weight"] = (vocab_size, dim)
    return s


def tiny_llamagen_gpt_state_dict(caption_dim: int, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    dim = TINY["dim"]
    ffn_hidden = 512  # find_multiple(int(2 * 4 * 128 / 3), 256)
    shapes = llamagen_gpt_shapes(TINY["n_layer"], dim, caption_dim, vocab_size, ffn_hidden)
    sd = {}
    with torch.random.fork_rng(devices=[]):  # seeding must not disturb the caller's RNG stream
        torch.manual_seed(seed)
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                # RMSNorm gains near 1 (not exactly 1, so a loader that drops them is caught)
                sd[name] = 1.0 + 0.1 * torch.randn(shape)
            elif name == "cls_embedding.uncond_embedding":
                sd[name] = torch.randn(shape) / caption_dim**0.5
            else:
                sd[name] = 0.02 * torch.randn(shape) if name != "output.weight" else 0.5 * torch.randn(shape) / dim**0.5
    return sd


def write_tiny_llamagen_gpt(out_dir: str | Path, caption_dim: int, vocab_size: int, seed: int = 0) -> dict[str, Path]:
    """The release `.pt` and the same weights as a project GPT directory. Returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    release = out / RELEASE_NAME
    torch.save({"model": tiny_llamagen_gpt_state_dict(caption_dim, vocab_size, seed)}, release)
    gpt_dir = load_llamagen_gpt(release).save_pretrained(out / "gpt")
    return {"release": release, "gpt": gpt_dir}
