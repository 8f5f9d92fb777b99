"""GPU speed options (`layton.config.Acceleration`) applied to the networks the stages build.

One function per model family, called where the stage builds its model (after `.to(device)` and
the weights' dtype, before the optimizer and DDP):

    accelerate_flux(pipe, accel)       synthesis: FLUX transformer (+ its VAE)
    accelerate_tokenizer(tok, accel)   LADD's SDXL UNet and ControlNet copy, the SDXL VAE
    accelerate_gpt(gpt, accel)         LaytonGen's GPT (training and sampling)
    accelerate_vae(vae, accel)         an AutoencoderKL (the three above, and eval_recon's VAE baseline)

None of them changes what is computed beyond float rounding (VAE tiling: blending at the tile
seams), so the options are `Runtime` settings. Every path runs on CPU as well (the tests run each).

- `compile`: `nn.Module.compile()` in place, never `torch.compile(module)`'s wrapper, so the module
  keeps its class, its config and its state-dict keys (no `_orig_mod.` in checkpoints).
- `attention`: "sdpa" is `F.scaled_dot_product_attention` (flash / memory-efficient kernels on
  CUDA); "eager" is the explicit math path (diffusers' `AttnProcessor`, the `_native_math` backend
  of the dispatching processors FLUX uses, the GPT's own `q @ k.T` softmax).
- `channels_last`: convolutional networks (UNet, ControlNet, VAE) in NHWC memory format.
- `vae_slicing` / `vae_tiling`: diffusers' `enable_slicing()` / `enable_tiling()`, the tile size
  set to `vae_tile_size` px (diffusers' default tile is the VAE's `sample_size`, 1024 for SDXL: a
  1024² image would not be tiled at all).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from layton.config import Acceleration

# torch.compile's backend. The tests set "eager" (dynamo traces and guards the same code; inductor's
# C++ codegen would take minutes on 2 CPU cores).
COMPILE_BACKEND = "inductor"


# --- the options, one at a time ----------------------------------------------------------------


def compile_in_place(modules: Iterable[nn.Module], mode: str = "default") -> list[nn.Module]:
    """`module.compile()` on each (skipping one already compiled): its `__call__` runs compiled,
    its parameters, buffers and state-dict keys are its own."""
    kwargs: dict = {"backend": COMPILE_BACKEND}
    if COMPILE_BACKEND == "inductor" and mode != "default":
        kwargs["mode"] = mode
    done = []
    for m in modules:
        if getattr(m, "_compiled_call_impl", None) is None:
            m.compile(**kwargs)
        done.append(m)
    return done


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def set_attention(module: nn.Module, kind: str) -> int:
    """"sdpa" or "eager" attention in every attention layer of `module`; returns how many were set.

    diffusers' classic `Attention` layers (UNet, ControlNet, VAE) get `AttnProcessor2_0` or
    `AttnProcessor` (other processors, e.g. IP-adapter ones, are left alone); layers whose processor
    dispatches by backend (FLUX's) get the `native` or `_native_math` backend on that processor
    (not diffusers' process-wide active backend); the GPT's `Attention` its `sdpa` flag."""
    if kind not in ("sdpa", "eager"):
        raise ValueError(f"attention must be 'sdpa' or 'eager', got {kind!r}")
    from diffusers.models.attention_dispatch import AttentionBackendName
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    from layton.gpt import Attention as GPTAttention

    sdpa, n = kind == "sdpa", 0
    for m in module.modules():
        if isinstance(m, GPTAttention):
            m.sdpa, n = sdpa, n + 1
            continue
        proc = getattr(m, "processor", None)
        if proc is None:
            continue
        if hasattr(proc, "_attention_backend"):
            proc._attention_backend = AttentionBackendName.NATIVE if sdpa else AttentionBackendName._NATIVE_MATH
            n += 1
        elif isinstance(m, Attention) and type(proc) in (AttnProcessor, AttnProcessor2_0):
            m.set_processor(AttnProcessor2_0() if sdpa else AttnProcessor())
            n += 1
    return n


def apply_attention(modules: Iterable[nn.Module], kind: str) -> None:
    """The configured attention; "sdpa" leaves the models as built (diffusers' and the GPT's own
    default is `scaled_dot_product_attention`: nothing to set, no dispatch changed)."""
    if kind != "sdpa":
        for m in modules:
            set_attention(m, kind)


def to_channels_last(modules: Iterable[nn.Module]) -> None:
    """4-D weights in NHWC (in place: a module's Parameters stay the same objects)."""
    for m in modules:
        m.to(memory_format=torch.channels_last)


def accelerate_vae(vae, accel: Acceleration):
    """An AutoencoderKL: attention, channels_last, slicing and tiling. Returns the VAE."""
    apply_attention([vae], accel.attention)
    if accel.channels_last:
        to_channels_last([vae])
    configure_vae(vae, accel)
    return vae


def configure_vae(vae, accel: Acceleration) -> None:
    """Slicing (a batch one image at a time) and tiling (overlapping `vae_tile_size` px tiles)."""
    vae.enable_slicing() if accel.vae_slicing else vae.disable_slicing()
    if not accel.vae_tiling:
        vae.disable_tiling()
        return
    vae.enable_tiling()
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.tile_sample_min_size = accel.vae_tile_size
    vae.tile_latent_min_size = accel.vae_tile_size // scale


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to a half dtype (weights cast to it meet float32 inputs: noise, schedulers' latents);
    a no-op context for float32."""
    half = dtype in (torch.bfloat16, torch.float16)
    return torch.autocast(torch.device(device).type, dtype=dtype if half else torch.bfloat16, enabled=half)


# --- per model family --------------------------------------------------------------------------


def accelerate_flux(pipe, accel: Acceleration):
    """A diffusers FluxPipeline: attention and compile of the transformer; channels_last, slicing and
    tiling of its VAE. Returns the pipeline."""
    apply_attention([pipe.transformer], accel.attention)
    accelerate_vae(pipe.vae, accel)
    if accel.compile:
        compile_in_place([pipe.transformer], accel.compile_mode)
    return pipe


def accelerate_tokenizer(tok, accel: Acceleration):
    """A LaytonTokenizer (training or decoding): attention and channels_last in LADD (UNet,
    ControlNet copy, token embedder) and the VAE, the VAE's slicing/tiling, and compile of the two
    big networks (the frozen UNet and the ControlNet copy). Returns the tokenizer."""
    ladd = tok.ladd
    apply_attention([ladd], accel.attention)
    if accel.channels_last:
        to_channels_last([ladd])
    accelerate_vae(tok.vae, accel)
    if accel.compile:
        compile_in_place([ladd.unet, ladd.controlnet], accel.compile_mode)
    return tok


def accelerate_gpt(gpt, accel: Acceleration, *, training: bool = False):
    """LaytonGen's GPT. Training compiles the whole forward (teacher forcing: one graph). Sampling
    runs `prefill` / `decode_step`, whose KV-cache writes at a moving position would recompile the
    attention every step: there each block's SwiGLU feed-forward (most of a block's FLOPs) is
    compiled, one graph shared by all blocks. Returns the GPT."""
    apply_attention([gpt], accel.attention)
    if accel.compile:
        compile_in_place([gpt] if training else [layer.feed_forward for layer in gpt.layers], accel.compile_mode)
    return gpt
