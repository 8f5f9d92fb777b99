"""MPS (Kwai-Kolors, "Multi-dimensional Preference Score") overall scorer, without unpickling code.

Release layout (what `from_release` takes):

    MPS_overall_checkpoint.pth       upstream's torch.save(model) of trainer.models.clip_model.CLIPModel,
      or MPS_overall_checkpoint.safetensors   written once by `layton convert mps` (same tensor names)
    processor/                       local copy of the hub repo the model was built on
                                     (laion/CLIP-ViT-H-14-laion2B-s32B-b79K), weights not needed:
                                     config.json (CLIPConfig), preprocessor_config.json,
                                     vocab.json + merges.txt (and/or tokenizer.json), tokenizer_config.json

Tensor names (as the pickled module tree gives them): `model.*` is a transformers CLIPModel
(`model.text_model.*`, `model.vision_model.*`, `model.{text,visual}_projection.weight`,
`model.logit_scale`); `cross_model.layers.N.0.fn.*` is a cross-attention block and
`cross_model.layers.N.1.fn.*` a parallel self-attention/feed-forward block.

Score for one (prompt, image), as upstream's `infer_one_sample` (eval scripts) computes it:
    text_f, text_eos = text tokens projected (B,77,P), EOS token projected (B,P)
    image_f          = visual_projection(vision last_hidden_state) (B,257,P), no post-layernorm
    cond_f           = text tokens of the fixed condition string
    sim  = max over condition tokens of <text_f, cond_f>  (B,1,77), divided by its maximum
    mask = 0 where sim > 0.3 else -inf, for every image token
    feat = cross_model(image_f, text_f, mask)[:, 0]
    score = logit_scale.exp() * <normalize(text_eos), normalize(feat)>
Upstream scores one prompt at a time, so "its maximum" is per sample here; a batch gives the
same numbers as one-by-one scoring.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from layton.checkpoint_io import load_exact
from layton.scorers import check_pairs
from layton.scorers.restricted_unpickle import read_module_tensors

CONDITION = (
    "light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
    "instance, texture, quantity, attributes, position, number, location, word, things."
)
MASK_THRESHOLD = 0.3


# ----------------------------------------------------------------- cross model (upstream key layout)


class _BiasFreeLayerNorm(nn.Module):
    """LayerNorm whose bias is a (zero) buffer, as upstream stores it."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x, *args):
        return self.fn(x, *args) + x


class _SwiGLU(nn.Module):
    def forward(self, x):
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class _Rotary(nn.Module):
    def __init__(self, dim_head: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim_head, 2).float() / dim_head)))

    def forward(self, n: int) -> torch.Tensor:  # -> (n, dim_head): angles for both halves
        freqs = torch.outer(torch.arange(n, device=self.inv_freq.device, dtype=self.inv_freq.dtype), self.inv_freq)
        return torch.cat([freqs, freqs], dim=-1)


def _rotate(t: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=-1)
    return t * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin()


def _attend(q, k, v, mask=None):
    """q (B,h,Nq,d) pre-scaled; k, v (B,Nk,d) shared by all heads (multi-query) -> (B,Nq,h*d)."""
    sim = torch.einsum("bhid,bjd->bhij", q, k)
    if mask is not None:
        sim = sim + mask[:, None]  # (B,1,Nq,Nk): 0 keeps a text token, -inf drops it
    attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
    out = torch.einsum("bhij,bjd->bhid", attn, v)
    return out.transpose(1, 2).flatten(2)


class _CrossBlock(nn.Module):
    """Image tokens attend to text tokens; feed-forward in parallel on the same normed input."""

    def __init__(self, dim: int, dim_head: int, heads: int, ff_inner: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm = _BiasFreeLayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * ff_inner, bias=False), _SwiGLU(), nn.Linear(ff_inner, dim, bias=False))

    def forward(self, x, context, mask):  # x (B,N,D), context (B,L,D), mask (B,N,L)
        x = self.norm(x)
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2) * self.scale
        k, v = self.to_kv(context).chunk(2, dim=-1)
        return self.to_out(_attend(q, k, v, mask)) + self.ff(x)


class _ParallelBlock(nn.Module):
    """Self-attention (multi-query, rotary) and SwiGLU feed-forward from one fused projection."""

    def __init__(self, dim: int, dim_head: int, heads: int, ff_inner: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.split = (heads * dim_head, dim_head, dim_head, 2 * ff_inner)
        self.norm = _BiasFreeLayerNorm(dim)
        self.rotary_emb = _Rotary(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.split), bias=False)
        self.attn_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff_out = nn.Sequential(_SwiGLU(), nn.Linear(ff_inner, dim, bias=False))

    def forward(self, x):  # (B,N,D)
        x = self.norm(x)
        b, n, _ = x.shape
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.split, dim=-1)
        angles = self.rotary_emb(n)
        q = _rotate(q.view(b, n, self.heads, -1).transpose(1, 2), angles) * self.scale
        k = _rotate(k, angles)
        return self.attn_out(_attend(q, k, v)) + self.ff_out(ff)


class CrossModel(nn.Module):
    def __init__(self, dim: int, layer_num: int, dim_head: int, heads: int, ff_inner: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([_Residual(_CrossBlock(dim, dim_head, heads, ff_inner)),
                           _Residual(_ParallelBlock(dim, dim_head, heads, ff_inner))])
            for _ in range(layer_num)
        )

    @staticmethod
    def dims_from_state_dict(sd: dict[str, torch.Tensor], prefix: str = "cross_model.") -> dict:
        to_q = sd[f"{prefix}layers.0.0.fn.to_q.weight"]  # (heads*dim_head, dim)
        dim_head = sd[f"{prefix}layers.0.0.fn.to_kv.weight"].shape[0] // 2
        layer_num = 1 + max(int(k[len(prefix):].split(".")[1]) for k in sd if k.startswith(f"{prefix}layers."))
        return dict(dim=to_q.shape[1], layer_num=layer_num, dim_head=dim_head, heads=to_q.shape[0] // dim_head,
                    ff_inner=sd[f"{prefix}layers.0.0.fn.ff.2.weight"].shape[1])

    def forward(self, image_tokens, text_tokens, mask):  # -> (B, N, D)
        x = image_tokens
        for cross, parallel in self.layers:
            x = parallel(cross(x, text_tokens, mask))
        return x


# ----------------------------------------------------------------- whole model


class MPSModel(nn.Module):
    def __init__(self, clip_config, cross_dims: dict):
        super().__init__()
        from transformers import CLIPModel

        self.model = CLIPModel(clip_config)
        self.cross_model = CrossModel(**cross_dims)

    def text_features(self, input_ids):  # (B,L) -> per token (B,L,P), EOS (B,P)
        out = self.model.text_model(input_ids=input_ids, return_dict=True)
        return self.model.text_projection(out.last_hidden_state), self.model.text_projection(out.pooler_output)

    def image_features(self, pixels):  # (B,3,S,S) -> (B,N,P), from tokens before post_layernorm
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixels, return_dict=True).last_hidden_state)

    def forward(self, input_ids, condition_ids, pixels):  # -> (B,) scores
        text_f, text_eos = self.text_features(input_ids)
        cond_f, _ = self.text_features(condition_ids)
        image_f = self.image_features(pixels)
        sim = torch.einsum("bid,bjd->bji", text_f, cond_f).amax(dim=1, keepdim=True)  # (B,1,L)
        sim = sim / sim.amax(dim=-1, keepdim=True)  # per sample; upstream's batch is one sample
        mask = torch.zeros_like(sim).masked_fill(~(sim > MASK_THRESHOLD), float("-inf"))
        mask = mask.expand(-1, image_f.shape[1], -1)  # (B,N,L)
        feat = self.cross_model(image_f, text_f, mask)[:, 0, :]
        return self.model.logit_scale.exp() * (F.normalize(text_eos, dim=-1) * F.normalize(feat, dim=-1)).sum(-1)


def read_mps_tensors(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of the release `.pth` (restricted unpickler) or of its converted `.safetensors`."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"MPS checkpoint not found: {checkpoint}")
    if checkpoint.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(checkpoint))
    else:
        tensors = read_module_tensors(checkpoint)
    # position_ids were persistent buffers in the transformers versions MPS was saved with; they are
    # always arange() and current CLIP recomputes them. pos_emb is a rotary cache, not a weight.
    return {k: v for k, v in tensors.items() if not k.endswith((".position_ids", ".pos_emb"))}


def _fill_position_ids(model: nn.Module) -> None:
    # Built on the meta device, the non-persistent position_ids buffers still need their values.
    for module in model.modules():
        ids = module._buffers.get("position_ids")
        if ids is not None and ids.is_meta:
            module._buffers["position_ids"] = torch.arange(ids.shape[-1]).expand(ids.shape).clone()


class MPSScorer:
    def __init__(self, model: MPSModel, tokenizer, image_processor, device="cpu", dtype=torch.float32):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = torch.device(device)
        self.dtype = dtype
        self._condition_ids = self._tokenize([CONDITION])

    @classmethod
    def from_release(cls, checkpoint: str | Path, clip_config_dir_or_processor_dir: str | Path,
                     device="cpu", dtype=torch.float32) -> "MPSScorer":
        from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPTokenizer

        processor_dir = Path(clip_config_dir_or_processor_dir)
        for path in (Path(checkpoint), processor_dir / "config.json", processor_dir / "preprocessor_config.json"):
            if not path.exists():
                raise FileNotFoundError(f"MPS release file not found: {path}")
        tensors = read_mps_tensors(checkpoint)
        try:
            cross_dims = CrossModel.dims_from_state_dict(tensors)
        except (KeyError, ValueError) as err:
            raise ValueError(f"{checkpoint}: not an MPS checkpoint (no cross_model: {err})") from err
        config = CLIPConfig.from_pretrained(str(processor_dir))
        with torch.device("meta"):
            model = MPSModel(config, cross_dims)
        load_exact(model, tensors, checkpoint)
        _fill_position_ids(model)
        model.to(device=device, dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(str(processor_dir))
        # The PIL processor is what transformers 4.x's CLIPImageProcessor (used upstream) did.
        image_processor = CLIPImageProcessorPil.from_pretrained(str(processor_dir))
        return cls(model, tokenizer, image_processor, device, dtype)

    def _tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, max_length=self.tokenizer.model_max_length, padding="max_length",
                              truncation=True, return_tensors="pt").input_ids

    @torch.inference_mode()
    def score(self, prompts: list[str], images: list[Image.Image]) -> np.ndarray:
        """One MPS score per (prompt, image) pair, computed in a single batched forward. -> (N,) float64"""
        if not check_pairs(prompts, images):
            return np.zeros(0, dtype=np.float64)
        ids = self._tokenize(list(prompts)).to(self.device)
        cond = self._condition_ids.expand(len(prompts), -1).to(self.device)
        pixels = self.image_processor([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        scores = self.model(ids, cond, pixels.to(self.device, self.dtype))
        return scores.double().cpu().numpy()


__all__ = ["CONDITION", "CrossModel", "MPSModel", "MPSScorer", "read_mps_tensors"]
