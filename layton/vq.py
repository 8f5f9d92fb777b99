"""LlamaGen's VQ-16 image tokenizer (encoder, L2-normalised vector quantizer, decoder) in one file.

Why a copy of our own rather than LlamaGen's module: LlamaGen is not a package, its `VQModel` pulls
in huggingface_hub and training-only state, and the pipeline needs a small inference API (codes,
code features, decode) on images of 224/256/288 px. What must not change is the module tree, because
the released `vq_ds16_c2i.pt` / `vq_ds16_t2i.pt` (`{"model": state_dict}`) must load with
strict=True and give LlamaGen's codes. The tree, as in `tokenizer/tokenizer_image/vq_model.py`:

    encoder.conv_in                          in_channels -> ch, 3x3
    encoder.conv_blocks.{i}.res.{j}          ResnetBlock: norm1, conv1, norm2, conv2 [, nin_shortcut]
    encoder.conv_blocks.{i}.attn.{j}         AttnBlock: norm, q, k, v, proj_out (last level only)
    encoder.conv_blocks.{i}.downsample.conv  every level but the last
    encoder.mid.{0,1,2}                      ResnetBlock, AttnBlock, ResnetBlock
    encoder.norm_out, encoder.conv_out       -> z_channels
    quant_conv                               z_channels -> codebook_embed_dim, 1x1
    quantize.embedding                       the codebook, codebook_size x codebook_embed_dim
    quantize.codebook_used                   training-time usage history (65536 floats), unused here
    post_quant_conv                          codebook_embed_dim -> z_channels, 1x1
    decoder.conv_in, decoder.mid.{0,1,2}
    decoder.conv_blocks.{k}                  levels lowest-resolution first: res.{0..num_res_blocks},
                                             attn.{j} at k = 0 only, upsample.conv for all but the last
    decoder.norm_out, decoder.conv_out       -> 3

VQ-16: ch 128, ch_mult (1, 1, 2, 2, 4) -> 16x downsampling, 2 res blocks per level (3 in the
decoder), z_channels 256, codebook 16384 x 8. GroupNorm(32, eps 1e-6) and swish throughout.
Quantization (VectorQuantizer, l2_norm=True): z and the codebook rows are L2-normalised, the code is
argmin_j ||z||^2 + ||e_j||^2 - 2 z.e_j, and its feature is the normalised row (get_codebook_entry).
Forward passes follow upstream's arithmetic (x * sigmoid(x), explicit bmm attention) so that codes,
an argmin over near-equal distances, match upstream's rather than merely approximate them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn

from layton.checkpoint_io import load_exact
from layton.model_files import load_torch_state_dict

# Length of upstream's `codebook_used` buffer (hard-coded there, independent of the codebook size).
USAGE_HISTORY = 65536
# Rows of the (tokens x codebook) distance matrix computed at once: 4096 x 16384 floats = 256 MiB.
_DIST_CHUNK = 4096


@dataclass
class VQConfig:
    """LlamaGen `ModelArgs` fields that shape the weights; defaults are VQ-16 (`vq_ds16_*.pt`)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0
    in_channels: int = 3

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> VQConfig:
        """Read the config off tensor shapes, so a bare LlamaGen checkpoint needs no sidecar file.

        Dropout is not in the weights and comes back as 0.0 (it is inactive at inference anyway).
        """
        need = ["encoder.conv_in.weight", "encoder.conv_out.weight", "encoder.conv_blocks.0.res.0.conv1.weight",
                "quantize.embedding.weight"]
        missing = [k for k in need if k not in sd]
        if missing:
            raise ValueError(f"not a LlamaGen VQ state dict: no {missing}")
        ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
        levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.conv_blocks.")})
        if levels != list(range(len(levels))):
            raise ValueError(f"not a LlamaGen VQ state dict: encoder levels {levels}")
        ch_mult = []
        for i in levels:
            key = f"encoder.conv_blocks.{i}.res.0.conv1.weight"
            if key not in sd or sd[key].shape[0] % ch:
                raise ValueError(f"not a LlamaGen VQ state dict: {key} missing or not a multiple of ch={ch}")
            ch_mult.append(sd[key].shape[0] // ch)
        num_res = len({k.split(".")[4] for k in sd if k.startswith("encoder.conv_blocks.0.res.")})
        codebook_size, embed_dim = sd["quantize.embedding.weight"].shape
        return cls(codebook_size=int(codebook_size), codebook_embed_dim=int(embed_dim),
                   z_channels=int(sd["encoder.conv_out.weight"].shape[0]), ch=int(ch), ch_mult=tuple(ch_mult),
                   num_res_blocks=num_res, in_channels=int(in_channels))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)  # upstream's spelling; F.silu can differ in the last bit


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # upstream's default (conv_shortcut=False): a 1x1 projection when the width changes
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, with 1x1 convs as projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(b, c, h * w).permute(0, 2, 1)  # b, hw, c
        k = self.k(y).reshape(b, c, h * w)  # b, c, hw
        v = self.v(y).reshape(b, c, h * w)
        attn = torch.softmax(torch.bmm(q, k) * (c**-0.5), dim=2)  # [b, query, key]
        out = torch.bmm(v, attn.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric zero padding: right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `res.{j}`, `attn.{j}` (possibly empty) and an optional resampler."""

    def __init__(self, res: list[nn.Module], attn: list[nn.Module]):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[j](h)
        return h


def _mid(c: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(c, c, dropout), AttnBlock(c), ResnetBlock(c, c, dropout)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        c_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            c_out = cfg.ch * mult
            res = [ResnetBlock(c_in if j == 0 else c_out, c_out, cfg.dropout) for j in range(cfg.num_res_blocks)]
            attn = [AttnBlock(c_out) for _ in range(cfg.num_res_blocks)] if i == n - 1 else []
            level = _Level(res, attn)
            if i != n - 1:
                level.downsample = Downsample(c_out)
            self.conv_blocks.append(level)
            c_in = c_out
        self.mid = _mid(c_in, cfg.dropout)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig, out_channels: int = 3):
        super().__init__()
        n = len(cfg.ch_mult)
        c_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _mid(c_in, cfg.dropout)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(n)):  # lowest resolution first
            c_out = cfg.ch * cfg.ch_mult[i]
            res = [ResnetBlock(c_in if j == 0 else c_out, c_out, cfg.dropout) for j in range(cfg.num_res_blocks + 1)]
            attn = [AttnBlock(c_out) for _ in range(cfg.num_res_blocks + 1)] if i == n - 1 else []
            level = _Level(res, attn)
            if i != 0:
                level.upsample = Upsample(c_out)
            self.conv_blocks.append(level)
            c_in = c_out
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest code by L2 distance between L2-normalised vectors (upstream's l2_norm=True path)."""

    def __init__(self, codebook_size: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        # Upstream keeps a rolling history of used codes for its training logs and saves it with the
        # weights; it is registered here only so that the state dict matches upstream's.
        self.register_buffer("codebook_used", torch.zeros(USAGE_HISTORY))

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    def codes(self, z: torch.Tensor) -> torch.Tensor:  # (B, D, h, w) -> (B, h, w) int64
        b, d, h, w = z.shape
        # float32 whatever the model's dtype: distances of unit vectors in bf16 tie far too often
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d).float(), p=2, dim=-1)
        e = self.codebook().float()
        e_sq = torch.sum(e**2, dim=1)
        idx = [(torch.sum(c**2, dim=1, keepdim=True) + e_sq - 2 * (c @ e.T)).argmin(dim=1)
               for c in flat.split(_DIST_CHUNK)]
        return torch.cat(idx).reshape(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:  # (B, h, w) -> (B, D, h, w)
        return self.codebook()[codes].permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    """LlamaGen's VQModel with an inference API. Images are (B, 3, H, W) in [-1, 1], H and W
    multiples of `downsample` (16 for VQ-16: 224/256/288 px -> 14/16/18 token grids)."""

    def __init__(self, config: VQConfig | None = None):
        super().__init__()
        self.config = config = config or VQConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.codebook_size, config.codebook_embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    def _check_images(self, images: torch.Tensor) -> None:
        f, c = self.downsample, self.config.in_channels
        if images.ndim != 4 or images.shape[1] != c or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"expected images (B, {c}, H, W) with H, W multiples of {f}, "
                             f"got {tuple(images.shape)}")

    @torch.no_grad()
    def encode_codes(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> codes (B, H/16, W/16), int64."""
        self._check_images(images)
        return self.quantize.codes(self.quant_conv(self.encoder(images)))

    def code_features(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> normalised codebook vectors (B, embed_dim, h, w)."""
        return self.quantize.lookup(codes)

    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """Quantized features of images, (B, embed_dim, h, w): the LADD condition.

        Exactly the codebook rows (upstream's straight-through `z + (z_q - z).detach()` has the
        same value up to rounding, and no gradient reaches a frozen encoder anyway)."""
        return self.code_features(self.encode_codes(images))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> images (B, 3, 16h, 16w), clamped to [-1, 1]."""
        z = self.code_features(codes).to(self.post_quant_conv.weight.dtype)
        return self.decoder(self.post_quant_conv(z)).clamp(-1, 1)


def load_llamagen_vq(path: str | Path, map_location: str | torch.device = "cpu") -> VQModel:
    """Load a LlamaGen VQ release (`vq_ds16_c2i.pt`, `vq_ds16_t2i.pt`) strictly; frozen, eval, float32."""
    path = Path(path)
    sd = load_torch_state_dict(path, "LlamaGen VQ", map_location)
    try:
        config = VQConfig.from_state_dict(sd)
    except (ValueError, IndexError) as err:
        raise ValueError(f"{path}: {err}") from err
    # A checkpoint saved with codebook_show_usage=False lacks the (unused) usage history.
    sd.setdefault("quantize.codebook_used", torch.zeros(USAGE_HISTORY, device=map_location))
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model = VQModel(config)
    load_exact(model, sd, path)
    return model.float().eval().requires_grad_(False)


def _to_rgb(image: Image.Image | np.ndarray | torch.Tensor) -> Image.Image:
    """An RGB PIL image. Arrays are uint8 HW/HWC as PIL reads them; tensors (C, H, W), C in 1/3/4,
    uint8 or float in [0, 1] (rounded to 8 bits: LlamaGen's transform is defined on PIL images)."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise ValueError(f"expected an image tensor (C, H, W) with C in 1/3/4, got {tuple(image.shape)}")
        x = image[:3].expand(3, -1, -1)  # grey -> RGB, RGBA -> RGB
        if x.dtype != torch.uint8:
            x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return Image.fromarray(x.permute(1, 2, 0).cpu().numpy())
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode == "P":
        image = image.convert("RGBA")  # palette transparency goes through RGBA, else PIL warns
    # Like LlamaGen's loaders: plain convert("RGB"), i.e. alpha is dropped, not composited.
    return image.convert("RGB")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """LlamaGen's (ADM's) crop: BOX-halve while the short side is >= 2x the target, bicubic-resize the
    short side to `image_size` (rounded sizes), then centre-crop with floor offsets."""
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top : top + image_size, left : left + image_size])


def preprocess(images: Image.Image | list[Image.Image | np.ndarray] | torch.Tensor, size: int = 256) -> torch.Tensor:
    """Images -> (B, 3, size, size) float32 in [-1, 1], by LlamaGen's transform (`center_crop_arr`,
    ToTensor, Normalize(0.5, 0.5)), so that codes are those LlamaGen's scripts extract. PIL images of
    any mode (or uint8 HW/HWC arrays) are converted to RGB; tensors are (B, C, H, W) or (C, H, W)."""
    if isinstance(images, torch.Tensor):
        batch = [images] if images.ndim == 3 else list(images)
    else:
        batch = [images] if isinstance(images, Image.Image) else list(images)
    out = [TF.normalize(TF.to_tensor(center_crop_arr(_to_rgb(im), size)), [0.5] * 3, [0.5] * 3) for im in batch]
    return torch.stack(out)
