"""Tiny MPS release: a genuinely pickled whole module, laid out like Kwai-Kolors/MPS's.

    out_dir/MPS_overall_checkpoint.pth   torch.save(module) of `CLIPModel` below: `.model` is an HF
                                         CLIPModel subclass (tiny CLIPConfig), `.cross_model` a
                                         `Cross_model` with upstream's attribute layout
    out_dir/processor/                   what the scorer reads beside it, as in a local snapshot of
                                         laion/CLIP-ViT-H-14-laion2B-s32B-b79K without weights:
                                         config.json (CLIPConfig), preprocessor_config.json
                                         (CLIPImageProcessor, 224 px), vocab.json + merges.txt
                                         (CLIP BPE with '</w>' word ends, learned offline
                                         by `layton.zoo.text_tokenizers`),
                                         tokenizer.json, tokenizer_config.json

The classes are importable module-level classes so `torch.save(model)` pickles them by reference,
exactly as upstream's `trainer.models.clip_model.CLIPModel` is pickled; the scorer must read the file
with the restricted unpickler (it never imports these classes). They mirror upstream's parameter
and buffer layout (bias-free LayerNorm with a `bias` buffer, rotary `inv_freq` buffer, non-persistent
`pos_emb`); `XCLIPModel` also mirrors upstream's feature methods, which the tests use as the
reference. The cross-attention forward is deliberately not reimplemented here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPConfig
from transformers import CLIPModel as HFCLIPModel

from layton.zoo.text_tokenizers import save_clip_tokenizer_release, train_clip_tokenizer

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=224, patch_size=32)
PROJECTION_DIM = 64
CROSS = dict(layer_num=2, dim_head=32, heads=2, ff_mult=2)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# ----------------------------------------------------------------- upstream-shaped classes (pickled)


class XCLIPModel(HFCLIPModel):
    """MPS's CLIPModel subclass: feature methods return per-token projections."""

    def get_text_features(self, input_ids, **kwargs):  # -> (B, L, P) per token, (B, P) at EOS
        out = self.text_model(input_ids=input_ids, return_dict=True)
        return self.text_projection(out.last_hidden_state), self.text_projection(out.pooler_output)

    def get_image_features(self, pixel_values, **kwargs):  # -> (B, N, P), no post_layernorm
        return self.visual_projection(self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state)


class LayerNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn


class RotaryEmbedding(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))


class SwiGLU(nn.Module):
    pass


class ParallelTransformerBlock(nn.Module):
    def __init__(self, dim, dim_head=64, heads=8, ff_mult=4):
        super().__init__()
        self.norm = LayerNorm(dim)
        attn_inner, ff_inner = dim_head * heads, dim * ff_mult
        self.fused_dims = (attn_inner, dim_head, dim_head, ff_inner * 2)
        self.heads = heads
        self.scale = dim_head**-0.5
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(attn_inner, dim, bias=False)
        self.ff_out = nn.Sequential(SwiGLU(), nn.Linear(ff_inner, dim, bias=False))
        self.register_buffer("pos_emb", None, persistent=False)


class CrossAttention(nn.Module):
    def __init__(self, dim, *, dim_head=64, heads=12, ff_mult=4):
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        self.norm = LayerNorm(dim)
        self.context_norm = nn.Identity()
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * 2, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim * 2, bias=False), SwiGLU(), nn.Linear(ff_mult * dim, dim, bias=False))


class Cross_model(nn.Module):  # noqa: N801 - upstream's class name
    def __init__(self, dim=512, layer_num=4, dim_head=64, heads=8, ff_mult=4):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([
                Residual(CrossAttention(dim, dim_head=dim_head, heads=heads, ff_mult=ff_mult)),
                Residual(ParallelTransformerBlock(dim, dim_head=dim_head, heads=heads, ff_mult=ff_mult)),
            ])
            for _ in range(layer_num)
        )


class CLIPModel(nn.Module):
    """MPS's top-level module: `.model` (CLIP) and `.cross_model`; logit_scale lives on `.model`."""

    def __init__(self, config: CLIPConfig, cross: dict):
        super().__init__()
        self.config = config
        self.model = XCLIPModel(config)
        self.cross_model = Cross_model(dim=config.projection_dim, **cross)

    @property
    def logit_scale(self):
        return self.model.logit_scale


# ----------------------------------------------------------------- writer


def tiny_clip_config(vocab_size: int) -> CLIPConfig:
    specials = dict(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_act="gelu", **TEXT, **specials),
        vision_config=dict(hidden_act="gelu", **VISION),
        projection_dim=PROJECTION_DIM,
        logit_scale_init_value=math.log(100.0),  # what trained CLIPs saturate at
    )


def _write_processor(out: Path) -> int:
    """CLIP BPE tokenizer + image processor files; returns the vocab size (EOS is the last id)."""
    tok = train_clip_tokenizer()  # the same offline CLIP BPE as the tiny FLUX's
    save_clip_tokenizer_release(tok, out, with_tokenizer_json=True)
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
        "do_resize": True, "size": {"shortest_edge": VISION["image_size"]}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": VISION["image_size"], "width": VISION["image_size"]},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return len(tok)


def _init_(name: str, param: torch.Tensor, gen: torch.Generator) -> None:
    noise = torch.randn(param.shape, generator=gen)
    if name.endswith("logit_scale"):
        value = torch.tensor(math.log(100.0))
    elif "norm" in name and name.endswith("weight") and param.ndim == 1:
        value = 1.0 + 0.1 * noise
    elif name.endswith("bias"):
        value = 0.02 * noise
    elif param.ndim >= 2 and "embedding" not in name:
        value = noise / math.prod(param.shape[1:]) ** 0.5
    else:  # token/position embeddings, class embedding
        value = 0.5 * noise
    param.copy_(value)


def build_tiny_mps_module(vocab_size: int, seed: int = 0) -> CLIPModel:
    """The in-memory module `write_tiny_mps` pickles (same seed -> identical tensors)."""
    module = CLIPModel(tiny_clip_config(vocab_size), CROSS).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            _init_(name, param, gen)
        # Decaying output scales make text-token similarities uneven, as in a trained CLIP, so the
        # condition mask (sim > 0.3 of the max) drops some text tokens instead of keeping all 77.
        scales = torch.exp(-torch.arange(PROJECTION_DIM, dtype=torch.float32) / 2.0)
        module.model.text_projection.weight.mul_(scales[:, None])
    return module


def write_tiny_mps(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny MPS release; returns {'checkpoint', 'processor'}."""
    out_dir = Path(out_dir)
    processor = out_dir / "processor"
    vocab_size = _write_processor(processor)
    module = build_tiny_mps_module(vocab_size, seed)
    module.config.save_pretrained(str(processor))  # config.json: the CLIP the checkpoint was built on
    torch.save(module, out_dir / "MPS_overall_checkpoint.pth")
    return {"checkpoint": out_dir / "MPS_overall_checkpoint.pth", "processor": processor}
