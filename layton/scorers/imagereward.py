"""ImageReward (THUDM) scorer, loaded from the upstream release files without the `image-reward` package.

Release layout (what `from_release` takes):

    ImageReward.pt      torch.save(state_dict): blip.visual_encoder.*, blip.text_encoder.*,
                        blip.vision_proj.*, blip.text_proj.*, mlp.layers.{0,2,4,6,7}.*
    med_config.json     BLIP's BertConfig JSON for the text encoder
    tokenizer/          a bert-base-uncased tokenizer directory (vocab.txt, tokenizer_config.json);
                        BLIP's extra tokens ([DEC] as bos, [ENC]) are added at load time, as upstream does

Score for one (prompt, image), as `ImageReward.score` computes it:
    ids   = tokenizer(prompt, padding="max_length", truncation=True, max_length=35)   ([CLS] first, not [ENC])
    image = Resize(224, bicubic) -> CenterCrop(224) -> RGB -> [0,1] -> CLIP mean/std
    cls   = text_encoder(ids, mask, cross-attending to visual_encoder(image))[:, 0]
    score = (mlp(cls) - 0.16717362830052426) / 1.0333394966054072
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode

from layton.scorers import check_pairs
from layton.scorers.blip import BlipBackbone, MedConfig, ViTConfig
from layton.scorers.restricted_unpickle import load_exact

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TEXT_LENGTH = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Upstream's med embeddings register position_ids as a persistent buffer, so the release may carry it;
# it is always arange(max_positions) and our module computes positions instead.
_OPTIONAL_KEYS = ("blip.text_encoder.embeddings.position_ids",)


class RewardHead(nn.Module):
    """ImageReward's MLP: Linear/Dropout x3, Linear, Linear (no activations), keys layers.{0,2,4,6,7}."""

    def __init__(self, dims: list[int]):  # e.g. [768, 1024, 128, 64, 16, 1]
        super().__init__()
        mods: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            mods.append(nn.Linear(d_in, d_out))
            if i < 3:  # upstream has dropout after the first three linears only
                mods.append(nn.Dropout(0.0))
        self.layers = nn.Sequential(*mods)

    @staticmethod
    def dims_from_state_dict(sd: dict[str, torch.Tensor], prefix: str = "mlp.layers.") -> list[int]:
        idx = sorted({int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)})
        if idx != [0, 2, 4, 6, 7]:
            raise ValueError(f"reward head layers {idx}, expected [0, 2, 4, 6, 7]")
        return [sd[f"{prefix}0.weight"].shape[1]] + [sd[f"{prefix}{i}.weight"].shape[0] for i in idx]

    def forward(self, x):  # (B, H) -> (B, 1)
        return self.layers(x)


class ImageRewardModel(nn.Module):
    def __init__(self, vit: ViTConfig, med: MedConfig, head_dims: list[int], embed_dim: int = 256):
        super().__init__()
        self.blip = BlipBackbone(vit, med, embed_dim)
        self.mlp = RewardHead(head_dims)

    def forward(self, pixels, input_ids, attention_mask):  # -> (B,) normalised rewards, float32
        cls = self.blip.text_cls(pixels, input_ids, attention_mask).float()
        return ((self.mlp(cls) - REWARD_MEAN) / REWARD_STD)[:, 0]


def load_blip_tokenizer(path: str | Path):
    """bert-base-uncased tokenizer plus BLIP's special tokens, as BLIP's `init_tokenizer` builds it."""
    from transformers import BertTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    tok = BertTokenizer.from_pretrained(str(path))
    # Adding a token that is already there is a no-op, so a directory saved with them loads the same.
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def preprocess_image(image: Image.Image, size: int) -> torch.Tensor:
    """PIL -> (3, size, size) float32, the torchvision pipeline ImageReward uses."""
    image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC)
    image = TF.center_crop(image, size)
    tensor = TF.to_tensor(image.convert("RGB"))
    return TF.normalize(tensor, CLIP_MEAN, CLIP_STD)


def read_imagereward_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"ImageReward checkpoint not found: {checkpoint}")
    sd = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{checkpoint}: expected a state_dict of tensors")
    return {k: v for k, v in sd.items() if k not in _OPTIONAL_KEYS}


class ImageRewardScorer:
    def __init__(self, model: ImageRewardModel, tokenizer, device="cpu", dtype=torch.float32):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.image_size = model.blip.visual_encoder.cfg.image_size

    @classmethod
    def from_release(
        cls,
        checkpoint: str | Path,
        med_config: str | Path,
        tokenizer: str | Path,
        device="cpu",
        dtype=torch.float32,
    ) -> "ImageRewardScorer":
        for p in (checkpoint, med_config, tokenizer):  # fail on any missing path before reading the big file
            if not Path(p).exists():
                raise FileNotFoundError(f"ImageReward release file not found: {p}")
        med = MedConfig.from_json(med_config)
        sd = read_imagereward_state_dict(checkpoint)
        try:
            vit = ViTConfig.from_state_dict(sd, "blip.visual_encoder.")
            head_dims = RewardHead.dims_from_state_dict(sd)
            embed_dim = sd["blip.vision_proj.weight"].shape[0]
        except (KeyError, ValueError) as err:
            raise ValueError(f"{checkpoint}: not an ImageReward state dict ({err})") from err
        with torch.device("meta"):  # shapes only; the checkpoint supplies every tensor
            model = ImageRewardModel(vit, med, head_dims, embed_dim)
        load_exact(model, sd, checkpoint)
        model.blip.to(device=device, dtype=dtype)
        model.mlp.to(device=device, dtype=torch.float32)  # upstream runs the head on .float() features
        return cls(model, load_blip_tokenizer(tokenizer), device, dtype)

    @torch.inference_mode()
    def score(self, prompts: list[str], images: list[Image.Image]) -> np.ndarray:
        """One reward per (prompt, image) pair, computed in a single batched forward. -> (N,) float64"""
        if not check_pairs(prompts, images):
            return np.zeros(0, dtype=np.float64)
        text = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt"
        )
        pixels = torch.stack([preprocess_image(im, self.image_size) for im in images])
        rewards = self.model(
            pixels.to(self.device, self.dtype),
            text.input_ids.to(self.device),
            text.attention_mask.to(self.device),
        )
        return rewards.double().cpu().numpy()
