"""LaytonGen's GPT: LlamaGen's text-to-image transformer (`autoregressive/models/gpt.py`) in one file.

What must not change is LlamaGen's module tree and arithmetic, because a released t2i checkpoint
(`{"model": state_dict}`) must load strictly and give LlamaGen's logits:

    cls_embedding.cap_proj.fc1 / fc2     caption MLP (caption_dim -> dim -> dim, tanh-GELU, no bias)
    cls_embedding.uncond_embedding       (120, caption_dim) buffer: the caption of caption dropout / CFG
    tok_embeddings                       (vocab, dim)
    layers.{i}.attention_norm, ffn_norm  RMSNorm (computed in float32)
    layers.{i}.attention.wqkv, wo        fused q/k/v projection; 2-D RoPE on q and k
    layers.{i}.feed_forward.w1, w2, w3   SwiGLU, hidden = multiple_of-rounded 8/3 dim
    norm, output                         final RMSNorm, logits head (zero-initialised)

The sequence is [120 caption embeddings, image tokens]. Image token j (row-major on the grid) takes
the 2-D rotary angles of its (row, column): the first half of each head's rotary pairs turn with the
row, the second half with the column. Caption positions take LlamaGen's all-zero rotary table, which
zeroes their queries and keys: captions reach the image tokens through values only. Captions are
left-padded (valid tokens last); padded caption columns are masked for every query except itself.
Logits are read from position cls_token_num-1 on: the last caption position predicts image token 0.

Checkpoints the project writes: `save_pretrained(dir)` -> `config.json` + `model.safetensors`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from layton.checkpoint_io import load_exact
from layton.model_files import check_file
from layton.model_files import load_torch_state_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# LlamaGen's GPT sizes: name -> (n_layer, n_head, dim).
PRESETS = {
    "GPT-B": (12, 12, 768),
    "GPT-L": (24, 16, 1024),
    "GPT-XL": (36, 20, 1280),
    "GPT-XXL": (48, 24, 1536),
}


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass
class GPTConfig:
    dim: int
    n_layer: int
    n_head: int
    vocab_size: int = 16384
    caption_dim: int = 2048  # flan-t5-xl d_model
    cls_token_num: int = 120  # caption tokens (T5 max length)
    block_size: int = 256  # image tokens: a square grid
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    caption_dropout_p: float = 0.1  # LlamaGen's class_dropout_prob
    extra: dict = field(default_factory=dict)  # free-form provenance, kept in config.json

    def __post_init__(self):
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if (self.dim // self.n_head) % 4:
            raise ValueError(f"head dim {self.dim // self.n_head} must be a multiple of 4 (2-D rotary pairs)")
        if int(self.block_size**0.5) ** 2 != self.block_size:
            raise ValueError(f"block_size {self.block_size} is not a square grid")

    @property
    def grid(self) -> int:
        return int(self.block_size**0.5)

    @classmethod
    def preset(cls, name: str, **kw) -> GPTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown GPT size {name!r}; known: {', '.join(PRESETS)}")
        n_layer, n_head, dim = PRESETS[name]
        return cls(dim=dim, n_layer=n_layer, n_head=n_head, **kw)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], n_head: int | None = None, **kw) -> GPTConfig:
        """Sizes from the tensors. Heads are not in the shapes: a LlamaGen size is recognised by
        (n_layer, dim), anything else takes head dim 64 (every LlamaGen size up to XXL) unless given."""
        vocab, dim = sd["tok_embeddings.weight"].shape
        n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
        cls_token_num, caption_dim = sd["cls_embedding.uncond_embedding"].shape
        if n_head is None:
            n_head = next((h for l_, h, d in PRESETS.values() if (l_, d) == (n_layer, dim)), dim // 64)
            if n_head == 0:
                raise ValueError(f"cannot infer the head count of width {dim} (< 64): give n_head")
        head_dim = dim // n_head
        kv = sd["layers.0.attention.wqkv.weight"].shape[0] // head_dim
        n_kv_head = (kv - n_head) // 2
        hidden = sd["layers.0.feed_forward.w1.weight"].shape[0]
        cfg = cls(dim=dim, n_layer=n_layer, n_head=n_head, vocab_size=vocab, caption_dim=caption_dim,
                  cls_token_num=cls_token_num, n_kv_head=None if n_kv_head == n_head else n_kv_head, **kw)
        if cfg.ffn_hidden != hidden:
            raise ValueError(f"feed-forward width {hidden} does not follow LlamaGen's rule for dim {dim} ({cfg.ffn_hidden})")
        return cfg

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPT config field(s): {unknown}")
        return cls(**d)


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """Where LlamaGen computes in float32 (norms, rotary, logits); a float64 model stays float64."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(_at_least_float32(x.dtype))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class MLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden, bias=False)
        self.fc2 = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cap_proj = MLP(cfg.caption_dim, cfg.dim, cfg.dim)
        self.register_buffer("uncond_embedding", torch.randn(cfg.cls_token_num, cfg.caption_dim) / cfg.caption_dim**0.5)

    def forward(self, caption: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """caption (B, T, caption_dim); rows with `drop` take the unconditional embedding."""
        if drop is not None:
            caption = torch.where(drop[:, None, None], self.uncond_embedding.to(caption.dtype), caption)
        return self.cap_proj(caption)


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def rope_2d(cfg: GPTConfig) -> torch.Tensor:
    """(cls_token_num + grid², head_dim/2, 2) cos/sin table; caption rows all zero (as LlamaGen)."""
    head_dim = cfg.dim // cfg.n_head
    quarter = head_dim // 4
    inv = 1.0 / (cfg.rope_base ** (torch.arange(0, quarter, dtype=torch.float32) * 2 / (head_dim // 2)))
    pos = torch.arange(cfg.grid, dtype=torch.float32)
    ang = torch.outer(pos, inv)  # (grid, quarter)
    rows = ang[:, None, :].expand(cfg.grid, cfg.grid, quarter)
    cols = ang[None, :, :].expand(cfg.grid, cfg.grid, quarter)
    grid = torch.cat([rows, cols], dim=-1).reshape(cfg.block_size, 2 * quarter)
    table = torch.stack([grid.cos(), grid.sin()], dim=-1)
    return torch.cat([torch.zeros(cfg.cls_token_num, 2 * quarter, 2), table])


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, head_dim), table (S, head_dim/2, 2): rotate consecutive pairs (computed in float32)."""
    xp = x.to(_at_least_float32(x.dtype)).reshape(*x.shape[:-1], -1, 2)
    t = table[None, :, None]
    out = torch.stack([xp[..., 0] * t[..., 0] - xp[..., 1] * t[..., 1],
                       xp[..., 1] * t[..., 0] + xp[..., 0] * t[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


class KVCache:
    """Keys and values of every layer for positions already seen; filled by `forward(..., cache=)`."""

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device, dtype):
        kv_heads = cfg.n_kv_head or cfg.n_head
        shape = (batch, kv_heads, max_len, cfg.dim // cfg.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0  # positions filled
        self.caption_mask: torch.Tensor | None = None  # set by prefill, used by every decode step

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def math_attention(q, k, v, mask: torch.Tensor | None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v written out: q (B, nh, S, hs), k/v (B, nh, K, hs), mask (B|1, 1, S, K)
    bool (True: attend). The reference `scaled_dot_product_attention` computes; softmax in float32."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, nh, S, K)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    att = F.dropout(scores.float().softmax(dim=-1).to(q.dtype), p=dropout_p)
    return att @ v  # (B, nh, S, hs)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.dim // cfg.n_head
        self.wqkv = nn.Linear(cfg.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)
        self.sdpa = True  # F.scaled_dot_product_attention; False: the explicit math path (`Acceleration.attention`)

    def forward(self, x, rope, mask, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        b, s, dim = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([dim, kv, kv], dim=-1)
        q = apply_rope(q.view(b, s, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(k.view(b, s, self.n_kv_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(b, s, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        dropout_p = self.attn_dropout_p if self.training else 0.0
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        else:
            out = math_attention(q, k, v, mask, dropout_p)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(b, s, dim)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, rope, mask, cache=None, layer=0, start=0):
        h = x + self.attention(self.attention_norm(x), rope, mask, cache, layer, start)
        return h + self.feed_forward(self.ffn_norm(h))


def attention_mask(caption_mask: torch.Tensor | None, q_start: int, q_len: int, k_len: int, device) -> torch.Tensor | None:
    """(B, 1, q_len, k_len) bool: causal, padded caption keys hidden, every position sees itself."""
    q = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    k = torch.arange(k_len, device=device)[None, :]
    mask = (k <= q)[None, None]
    if caption_mask is None:
        return mask
    cap = caption_mask.to(device=device, dtype=torch.bool)
    keys = torch.ones(cap.shape[0], k_len, dtype=torch.bool, device=device)
    keys[:, : cap.shape[1]] = cap
    return (mask & keys[:, None, None, :]) | (k == q)[None, None]


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.cls_embedding = CaptionEmbedder(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("rope", rope_2d(cfg), persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """LlamaGen's init: N(0, 0.02) linears and embeddings, a zero logits head."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.config.initializer_range)
        nn.init.zeros_(self.output.weight)

    def _run(self, h, start: int, caption_mask, cache: KVCache | None) -> torch.Tensor:
        s = h.shape[1]
        k_len = start + s
        mask = attention_mask(caption_mask, start, s, k_len, h.device)
        rope = self.rope[start : start + s].to(h.device)
        h = self.tok_dropout(h)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, cache, i, start)
        logits = self.output(self.norm(h))
        return logits.to(_at_least_float32(logits.dtype))

    def forward(self, idx: torch.Tensor, caption: torch.Tensor, caption_mask: torch.Tensor | None = None,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits: idx (B, t) image tokens, caption (B, T, caption_dim) left-padded.

        `drop` (B,) bool replaces captions by the unconditional one; in training mode without it,
        each caption is dropped with probability caption_dropout_p.

        Returns (B, t+1, vocab): position j predicts image token j. Training passes the first 255
        tokens of 256; full-recompute sampling passes the tokens so far and reads the last row.
        """
        cls = self.config.cls_token_num
        if drop is None and self.training and self.config.caption_dropout_p > 0:  # LlamaGen's random drop
            drop = torch.rand(caption.shape[0], device=caption.device) < self.config.caption_dropout_p
        cond = self.cls_embedding(caption, drop)[:, :cls]
        h = torch.cat([cond, self.tok_embeddings(idx).to(cond.dtype)], dim=1)
        return self._run(h, 0, caption_mask, None)[:, cls - 1 :]

    def prefill(self, caption: torch.Tensor, caption_mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Fill the cache with the caption; returns the logits (B, vocab) for image token 0."""
        cond = self.cls_embedding(caption)[:, : self.config.cls_token_num]
        cache.caption_mask = caption_mask
        logits = self._run(cond, 0, caption_mask, cache)[:, -1]
        cache.length = cond.shape[1]
        return logits

    def decode_step(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed one image token per row (B,) at the next position; returns logits (B, vocab) for the next."""
        h = self.tok_embeddings(token[:, None]).to(self.cls_embedding.uncond_embedding.dtype)
        logits = self._run(h, cache.length, cache.caption_mask, cache)[:, -1]
        cache.length += 1
        return logits

    def new_cache(self, batch: int, dtype: torch.dtype | None = None) -> KVCache:
        cfg = self.config
        dtype = dtype or self.tok_embeddings.weight.dtype
        return KVCache(cfg, batch, cfg.cls_token_num + cfg.block_size, self.tok_embeddings.weight.device, dtype)

    # --- files -----------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, d / WEIGHTS_NAME)
        (d / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=1))
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, device="cpu") -> GPT:
        from safetensors.torch import load_file


        d = Path(directory)
        cfg = GPTConfig.from_dict(json.loads(check_file(d / CONFIG_NAME, "LaytonGen GPT config").read_text()))
        sd = load_file(check_file(d / WEIGHTS_NAME, "LaytonGen GPT weights"), device=str(device))
        return _materialise(cfg, sd, d / WEIGHTS_NAME)


def _materialise(cfg: GPTConfig, sd: dict[str, torch.Tensor], source) -> GPT:
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model = GPT(cfg)
    load_exact(model, sd, source)
    model.rope = rope_2d(cfg).to(next(iter(sd.values())).device)  # non-persistent: rebuilt off meta
    return model.eval()


def load_llamagen_gpt(path: str | Path, n_head: int | None = None, **config_kw) -> GPT:
    """A LlamaGen t2i GPT release (`t2i_XL_stage2_512.pt`, ...), read with weights_only, loaded strictly.

    KV-cache buffers that a checkpoint saved after sampling may carry are dropped. `config_kw`
    sets what the tensors cannot tell (block_size for a 24x24 grid, dropout rates for fine-tuning).
    """
    sd = load_torch_state_dict(path, "LlamaGen GPT")
    sd = {k: v for k, v in sd.items() if ".kv_cache." not in k and k not in ("freqs_cis", "causal_mask")}
    try:
        cfg = GPTConfig.from_state_dict(sd, n_head=n_head, **config_kw)
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: not a LlamaGen t2i GPT checkpoint ({err})") from err
    return _materialise(cfg, sd, path)
