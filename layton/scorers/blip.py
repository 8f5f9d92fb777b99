"""BLIP's image encoder (timm-style ViT) and text encoder (BLIP "med" BERT with cross-attention).

Written for this project; parameter names follow BLIP's own modules (`models/vit.py`, `models/med.py`
of salesforce/BLIP, vendored by ImageReward) so that ImageReward- and FaceScore-style checkpoints
load with `strict=True`:

    visual_encoder.{patch_embed.proj, cls_token, pos_embed, blocks.N.{norm1, attn.qkv, attn.proj,
                    norm2, mlp.fc1, mlp.fc2}, norm}
    text_encoder.{embeddings.{word_embeddings, position_embeddings, LayerNorm},
                  encoder.layer.N.{attention, crossattention}.{self.{query,key,value}, output.{dense,LayerNorm}},
                  encoder.layer.N.{intermediate.dense, output.{dense, LayerNorm}}}
    vision_proj, text_proj

Behaviour that matters for parity: ViT LayerNorm eps 1e-6, exact-erf GELU, qkv with bias; med
embeddings have no token-type table; masks are additive `(1 - mask) * -10000`; every layer runs
cross-attention over the image tokens (med's default `mode="multimodal"`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- vision


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "visual_encoder.") -> "ViTConfig":
        """Read the ViT shape from a checkpoint.

        Width, patch, grid and depth are in the tensors. The head count is not, so it follows
        BLIP's ViT-B/ViT-L convention of 64-wide heads (768/12, 1024/16).
        """
        proj = sd[f"{prefix}patch_embed.proj.weight"]  # (width, 3, patch, patch)
        width, patch = proj.shape[0], proj.shape[-1]
        n_tokens = sd[f"{prefix}pos_embed"].shape[1]  # 1 + grid²
        grid = math.isqrt(n_tokens - 1)
        depth = 1 + max(int(k[len(prefix) :].split(".")[1]) for k in sd if k.startswith(f"{prefix}blocks."))
        hidden = sd[f"{prefix}blocks.0.mlp.fc1.weight"].shape[0]
        return cls(image_size=grid * patch, patch_size=patch, width=width, depth=depth,
                   heads=max(1, width // 64), mlp_ratio=hidden / width)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x):  # (B, 3, H, W) -> (B, H/p * W/p, width)
        return self.proj(x).flatten(2).transpose(1, 2)


class ViTAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):  # (B, N, C)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, C/h)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class ViTMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = ViTAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = ViTMlp(width, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Pre-norm ViT with a class token; returns all tokens after the final norm."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, cfg.width))
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(ViTBlock(cfg.width, cfg.heads, hidden) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)

    def forward(self, pixels):  # (B, 3, S, S) -> (B, 1 + (S/p)², width)
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# --------------------------------------------------------------------------- text


@dataclass
class MedConfig:
    """The fields of BLIP's `med_config.json` (a BertConfig JSON) that shape the model."""

    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    pad_token_id: int = 0
    encoder_width: int = 768
    add_cross_attention: bool = True

    @classmethod
    def from_json(cls, path: str | Path) -> "MedConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"med config not found: {path}")
        raw = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in raw.items() if k in known})
        if cfg.hidden_act != "gelu":
            raise ValueError(f"{path}: hidden_act {cfg.hidden_act!r} is not supported (BLIP uses 'gelu')")
        return cfg


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # (B, L) of 1/0 -> (B, 1, 1, L) of 0/-10000, as BERT/med do (not -inf: a fully padded row stays finite).
    return (1.0 - mask[:, None, None, :].to(dtype)) * -10000.0


class MedSelfAttention(nn.Module):
    def __init__(self, cfg: MedConfig, kv_width: int):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def _split(self, x):  # (B, L, H) -> (B, heads, L, H/heads)
        b, n, h = x.shape
        return x.view(b, n, self.heads, h // self.heads).transpose(1, 2)

    def forward(self, x, context, additive_mask):
        q, k, v = self._split(self.query(x)), self._split(self.key(context)), self._split(self.value(context))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask)
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, -1)


class MedSelfOutput(nn.Module):
    def __init__(self, cfg: MedConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class MedAttention(nn.Module):
    def __init__(self, cfg: MedConfig, kv_width: int):
        super().__init__()
        self.self = MedSelfAttention(cfg, kv_width)
        self.output = MedSelfOutput(cfg)

    def forward(self, x, context, additive_mask):
        return self.output(self.self(x, context, additive_mask), x)


class MedIntermediate(nn.Module):
    def __init__(self, cfg: MedConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))


class MedOutput(nn.Module):
    def __init__(self, cfg: MedConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class MedLayer(nn.Module):
    def __init__(self, cfg: MedConfig):
        super().__init__()
        self.attention = MedAttention(cfg, cfg.hidden_size)
        self.crossattention = MedAttention(cfg, cfg.encoder_width)
        self.intermediate = MedIntermediate(cfg)
        self.output = MedOutput(cfg)

    def forward(self, x, self_mask, image_tokens, image_mask):
        x = self.attention(x, x, self_mask)
        x = self.crossattention(x, image_tokens, image_mask)
        return self.output(self.intermediate(x), x)


class MedEncoder(nn.Module):
    def __init__(self, cfg: MedConfig):
        super().__init__()
        self.layer = nn.ModuleList(MedLayer(cfg) for _ in range(cfg.num_hidden_layers))


class MedEmbeddings(nn.Module):
    def __init__(self, cfg: MedConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids):  # (B, L) -> (B, L, H)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions)[None])


class MedBertModel(nn.Module):
    """BLIP's text encoder in multimodal mode: self-attention, then cross-attention to image tokens."""

    def __init__(self, cfg: MedConfig):
        super().__init__()
        if not cfg.add_cross_attention:
            raise ValueError("med text encoder needs add_cross_attention=true")
        self.cfg = cfg
        self.embeddings = MedEmbeddings(cfg)
        self.encoder = MedEncoder(cfg)

    def forward(self, input_ids, attention_mask, image_tokens, image_mask=None):
        """(B, L) ids and mask, (B, N, encoder_width) image tokens -> (B, L, H) hidden states."""
        x = self.embeddings(input_ids)
        self_mask = _additive_mask(attention_mask, x.dtype)
        if image_mask is None:
            image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device)
        cross_mask = _additive_mask(image_mask, x.dtype)
        for layer in self.encoder.layer:
            x = layer(x, self_mask, image_tokens, cross_mask)
        return x


# --------------------------------------------------------------------------- BLIP


class BlipBackbone(nn.Module):
    """The `blip.*` part of ImageReward/FaceScore: ViT, med BERT and the two ITC projections.

    The projections are unused when scoring but are part of the release's state dict.
    """

    def __init__(self, vit: ViTConfig, med: MedConfig, embed_dim: int = 256):
        super().__init__()
        med.encoder_width = vit.width  # BLIP overrides med_config's encoder_width with the ViT width
        self.visual_encoder = VisionTransformer(vit)
        self.text_encoder = MedBertModel(med)
        self.vision_proj = nn.Linear(vit.width, embed_dim)
        self.text_proj = nn.Linear(med.hidden_size, embed_dim)

    def text_cls(self, pixels, input_ids, attention_mask):
        """(B,3,S,S), (B,L), (B,L) -> (B, H): the [CLS] state of the image-grounded text encoder."""
        image_tokens = self.visual_encoder(pixels)
        return self.text_encoder(input_ids, attention_mask, image_tokens)[:, 0, :]
