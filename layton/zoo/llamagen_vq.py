"""Tiny LlamaGen VQ-16 tokenizer: the release format of `vq_ds16_t2i.pt`, small shapes, seeded weights.

`write_tiny_llamagen_vq(dir)` writes `dir/vq_ds16_t2i.pt` as LlamaGen releases it,
`torch.save({"model": state_dict})` with LlamaGen's key names (including the quantizer's
`codebook_used` usage buffer), so `layton.vq.load_llamagen_vq` loads it exactly as it loads the real
file. Only sizes differ from the real tokenizer:

    component          real VQ-16 (vq_ds16_*.pt)        tiny
    encoder/decoder    ch 128 -> widths 128..512,       ch 32 -> widths 32..128,
                       2 res blocks per level (3 dec.)  1 res block per level (2 dec.)
    z_channels         256                              32
    codebook           16384 x 8                        1024 x 8

Kept because the tokenizer's arithmetic depends on them: five levels, ch_mult (1, 1, 2, 2, 4), i.e.
16x downsampling (224/256/288 px -> 14/16/18 token grids); 8-dim L2-normalised codes; GroupNorm(32)
(every width a multiple of 32); attention at the lowest level and in the mid blocks.

The key list is spelled out here from LlamaGen's module layout rather than taken from
`layton.vq.VQModel`, so the loader is checked against an independent description of the format.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

TINY = dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, z_channels=32, codebook_size=1024, codebook_embed_dim=8)
USAGE_HISTORY = 65536  # length of LlamaGen's quantize.codebook_used buffer
RELEASE_NAME = "vq_ds16_t2i.pt"


def llamagen_vq_shapes(ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int,
                       codebook_size: int, codebook_embed_dim: int, in_channels: int = 3) -> dict[str, tuple[int, ...]]:
    """LlamaGen VQModel state-dict key -> shape (tokenizer/tokenizer_image/vq_model.py)."""
    s: dict[str, tuple[int, ...]] = {}

    def conv(name: str, c_out: int, c_in: int, k: int) -> None:
        s[name + ".weight"], s[name + ".bias"] = (c_out, c_in, k, k), (c_out,)

    def norm(name: str, c: int) -> None:
        s[name + ".weight"] = s[name + ".bias"] = (c,)

    def res(p: str, c_in: int, c_out: int) -> None:
        norm(p + "norm1", c_in)
        conv(p + "conv1", c_out, c_in, 3)
        norm(p + "norm2", c_out)
        conv(p + "conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(p + "nin_shortcut", c_out, c_in, 1)

    def attn(p: str, c: int) -> None:
        norm(p + "norm", c)
        for name in ("q", "k", "v", "proj_out"):
            conv(p + name, c, c, 1)

    def mid(p: str, c: int) -> None:
        res(p + "0.", c, c)
        attn(p + "1.", c)
        res(p + "2.", c, c)

    n, top = len(ch_mult), ch * ch_mult[-1]
    conv("encoder.conv_in", ch, in_channels, 3)
    c_in = ch
    for i, mult in enumerate(ch_mult):
        p, c_out = f"encoder.conv_blocks.{i}.", ch * mult
        for j in range(num_res_blocks):
            res(f"{p}res.{j}.", c_in, c_out)
            c_in = c_out
            if i == n - 1:
                attn(f"{p}attn.{j}.", c_out)
        if i != n - 1:
            conv(p + "downsample.conv", c_out, c_out, 3)
    mid("encoder.mid.", top)
    norm("encoder.norm_out", top)
    conv("encoder.conv_out", z_channels, top, 3)

    conv("decoder.conv_in", top, z_channels, 3)
    mid("decoder.mid.", top)
    c_in = top
    for k, i in enumerate(reversed(range(n))):  # decoder levels run lowest resolution first
        p, c_out = f"decoder.conv_blocks.{k}.", ch * ch_mult[i]
        for j in range(num_res_blocks + 1):
            res(f"{p}res.{j}.", c_in, c_out)
            c_in = c_out
            if i == n - 1:
                attn(f"{p}attn.{j}.", c_out)
        if i != 0:
            conv(p + "upsample.conv", c_out, c_out, 3)
    norm("decoder.norm_out", ch * ch_mult[0])
    conv("decoder.conv_out", 3, ch * ch_mult[0], 3)

    s["quantize.embedding.weight"] = (codebook_size, codebook_embed_dim)
    s["quantize.codebook_used"] = (USAGE_HISTORY,)
    conv("quant_conv", codebook_embed_dim, z_channels, 1)
    conv("post_quant_conv", z_channels, codebook_embed_dim, 1)
    return s


def build_tiny_llamagen_vq(seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny state dict (float32). Same seed -> identical tensors."""
    shapes = llamagen_vq_shapes(**TINY)
    sd: dict[str, torch.Tensor] = {}
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, shape in shapes.items():
            if name == "quantize.codebook_used":
                sd[name] = torch.zeros(shape)  # no training history yet
            elif name == "quantize.embedding.weight":
                # Gaussian rows point in uniformly random directions once normalised, so the codes
                # spread over the codebook (upstream's uniform(+-1/n) init would too, but barely).
                sd[name] = torch.randn(shape)
            elif ".norm" in name:  # GroupNorm: identity affine
                sd[name] = torch.ones(shape) if name.endswith(".weight") else torch.zeros(shape)
            else:
                # torch's default Conv2d init, uniform(+-1/sqrt(fan_in)) for weight and bias
                fan_in = shapes[name.rsplit(".", 1)[0] + ".weight"]
                bound = 1 / math.sqrt(math.prod(fan_in[1:]))
                sd[name] = torch.empty(shape).uniform_(-bound, bound)
    return sd


def write_tiny_llamagen_vq(out_dir: Path, seed: int = 0) -> Path:
    """Write `out_dir/vq_ds16_t2i.pt` in LlamaGen's release format and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RELEASE_NAME
    torch.save({"model": build_tiny_llamagen_vq(seed)}, path)
    return path
