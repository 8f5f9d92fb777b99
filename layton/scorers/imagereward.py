"""ImageReward (THUDM) scorer, loaded from the upstream release files without the `image-reward` package.

The model is BLIP's image-grounded text encoder plus ImageReward's MLP head, built from library code:
timm's `VisionTransformer` is BLIP's ViT (same parameter names) and transformers' `BlipTextModel` is
BLIP's "med" BERT with cross-attention, so the release's `blip.visual_encoder.*` and
`blip.text_encoder.*` keys load into them unchanged and strictly.

Release layout (what `from_release` takes):

    ImageReward.pt      torch.save(state_dict): blip.visual_encoder.*, blip.text_encoder.*,
                        blip.vision_proj.*, blip.text_proj.*, mlp.layers.{0,2,4,6,7}.*
    med_config.json     BLIP's BertConfig JSON for the text encoder
    tokenizer/          a bert-base-uncased tokenizer directory (vocab.txt, tokenizer_config.json);
                        BLIP's extra tokens ([DEC] as bos, [ENC]) are added at load time, as upstream does

Score for one (prompt, image), as `ImageReward.score` computes it:
    ids   = tokenizer(prompt, padding="max_length", truncation=True, max_length=35)   ([CLS] first, not [ENC])
    image = Resize(224, bicubic) -> CenterCrop(224) -> RGB -> [0,1] -> CLIP mean/std
    cls   = text_encoder(ids, mask, cross-attending to every visual_encoder(image) token)[:, 0]
    score = (mlp(cls) - 0.16717362830052426) / 1.0333394966054072
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.transforms import InterpolationMode
from transformers import BlipTextConfig
from transformers.models.blip.modeling_blip_text import BlipTextModel

from layton.checkpoint_io import load_exact
from layton.model_files import load_torch_file
from layton.scorers import check_pairs

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TEXT_LENGTH = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Upstream's med embeddings save position_ids (always arange) as a persistent buffer; transformers'
# BLIP text embeddings keep it non-persistent, so the loader checks it and leaves it out.
POSITION_IDS = "blip.text_encoder.embeddings.position_ids"
_MED_SHAPE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings")
_MED_OPTIONAL = ("hidden_act", "layer_norm_eps", "pad_token_id")


def blip_vit(sd: dict[str, torch.Tensor], prefix: str = "blip.visual_encoder.") -> VisionTransformer:
    """BLIP's ViT as a timm VisionTransformer, shaped from a checkpoint's tensors.

    Width, patch, grid, depth and MLP width are in the tensors. The head count is not, so it follows
    BLIP's ViT-B/ViT-L convention of 64-wide heads (768/12, 1024/16).
    """
    width, _, _, patch = sd[f"{prefix}patch_embed.proj.weight"].shape
    grid = math.isqrt(sd[f"{prefix}pos_embed"].shape[1] - 1)  # 1 class token + grid² patches
    depth = 1 + max(int(k[len(prefix) :].split(".")[1]) for k in sd if k.startswith(f"{prefix}blocks."))
    return VisionTransformer(
        img_size=grid * patch, patch_size=patch, embed_dim=width, depth=depth, num_heads=max(1, width // 64),
        mlp_ratio=sd[f"{prefix}blocks.0.mlp.fc1.weight"].shape[0] / width, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU,  # BLIP's eps; nn.GELU is the exact erf
        num_classes=0, global_pool="",  # no head, no pooling: BLIP cross-attends to every token
        weight_init="skip",  # the checkpoint supplies every tensor
    )


def blip_text_config(med_config: str | Path, encoder_width: int) -> BlipTextConfig:
    """transformers' BLIP text config from BLIP's `med_config.json` (a BertConfig JSON)."""
    med_config = Path(med_config)
    if not med_config.is_file():
        raise FileNotFoundError(f"med config not found: {med_config}")
    raw = json.loads(med_config.read_text())
    if not raw.get("add_cross_attention", False):
        raise ValueError(f"{med_config}: ImageReward's text encoder needs add_cross_attention=true")
    try:
        shape = {k: raw[k] for k in _MED_SHAPE}
    except KeyError as err:
        raise ValueError(f"{med_config}: missing {err}") from err
    return BlipTextConfig(
        **shape, **{k: raw[k] for k in _MED_OPTIONAL if k in raw},
        encoder_hidden_size=encoder_width,  # BLIP overrides med's encoder_width with the ViT width
        is_decoder=True,  # builds the cross-attention layers; forward(is_decoder=False) keeps attention bidirectional
        bos_token_id=None, eos_token_id=None, sep_token_id=None,  # generation ids, unused by the encoder
    )


class Blip(nn.Module):
    """The `blip.*` part of ImageReward/FaceScore: ViT, text encoder and the two ITC projections.

    The projections are unused when scoring but are part of the release's state dict.
    """

    def __init__(self, visual_encoder: VisionTransformer, text: BlipTextConfig, embed_dim: int = 256):
        super().__init__()
        self.visual_encoder = visual_encoder
        self.text_encoder = BlipTextModel(text, add_pooling_layer=False)  # upstream's med BERT has no pooler
        self.vision_proj = nn.Linear(visual_encoder.embed_dim, embed_dim)
        self.text_proj = nn.Linear(text.hidden_size, embed_dim)

    def text_cls(self, pixels, input_ids, attention_mask):
        """(B,3,S,S), (B,L), (B,L) -> (B, H): the [CLS] state of the image-grounded text encoder."""
        out = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask,
            encoder_hidden_states=self.visual_encoder(pixels), is_decoder=False,  # image mask: all ones
        )
        return out.last_hidden_state[:, 0, :]


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
    def __init__(self, blip: Blip, head_dims: list[int]):
        super().__init__()
        self.blip = blip
        self.mlp = RewardHead(head_dims)

    def forward(self, pixels, input_ids, attention_mask, normalise: bool = True):  # -> (B,) float32
        """ImageReward's normalised reward, or the head's raw output (FaceScore's score) with `normalise=False`."""
        reward = self.mlp(self.blip.text_cls(pixels, input_ids, attention_mask).float())[:, 0]
        return (reward - REWARD_MEAN) / REWARD_STD if normalise else reward


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


def read_imagereward_state_dict(checkpoint: str | Path, what: str = "ImageReward checkpoint") -> dict[str, torch.Tensor]:
    """The release's tensors (no pickled code runs), less the position_ids buffer once checked."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{what} not found: {checkpoint}")
    sd = load_torch_file(checkpoint, what)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{checkpoint}: expected a state_dict of tensors")
    position_ids = sd.pop(POSITION_IDS, None)
    if position_ids is not None and not torch.equal(position_ids.flatten(), torch.arange(position_ids.numel())):
        raise ValueError(f"{checkpoint}: {POSITION_IDS} is not 0, 1, 2, ...; the text encoder assumes it is")
    return sd


class ImageRewardScorer:
    def __init__(self, model: ImageRewardModel, tokenizer, device="cpu", dtype=torch.float32):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.image_size = model.blip.visual_encoder.patch_embed.img_size[0]

    @classmethod
    def from_release(
        cls,
        checkpoint: str | Path,
        med_config: str | Path,
        tokenizer: str | Path,
        device="cpu",
        dtype=torch.float32,
        what: str = "ImageReward checkpoint",  # how errors name the checkpoint (FaceScore's is another)
    ) -> "ImageRewardScorer":
        for p in (checkpoint, med_config, tokenizer):  # fail on any missing path before reading the big file
            if not Path(p).exists():
                raise FileNotFoundError(f"ImageReward release file not found: {p}")
        sd = read_imagereward_state_dict(checkpoint, what)
        with torch.device("meta"):  # shapes only; the checkpoint supplies every tensor
            try:
                vit = blip_vit(sd)
                head_dims = RewardHead.dims_from_state_dict(sd)
                embed_dim = sd["blip.vision_proj.weight"].shape[0]
            except (KeyError, ValueError) as err:
                raise ValueError(f"{checkpoint}: not an ImageReward state dict ({err})") from err
            text = blip_text_config(med_config, vit.embed_dim)
            model = ImageRewardModel(Blip(vit, text, embed_dim), head_dims)
        load_exact(model, sd, checkpoint)
        # The non-persistent position_ids buffer is not in any state dict: rebuild it off the meta device.
        model.blip.text_encoder.embeddings.position_ids = torch.arange(text.max_position_embeddings)[None]
        model.blip.to(device=device, dtype=dtype)
        model.mlp.to(device=device, dtype=torch.float32)  # upstream runs the head on .float() features
        return cls(model, load_blip_tokenizer(tokenizer), device, dtype)

    @torch.inference_mode()
    def rewards(self, prompts: list[str], images: list[Image.Image], normalise: bool = True) -> torch.Tensor:
        """One batched forward over (prompt, image) pairs -> (N,) float32 on the scorer's device."""
        text = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt"
        )
        pixels = torch.stack([preprocess_image(im, self.image_size) for im in images])
        return self.model(
            pixels.to(self.device, self.dtype),
            text.input_ids.to(self.device),
            text.attention_mask.to(self.device),
            normalise=normalise,
        )

    def score(self, prompts: list[str], images: list[Image.Image]) -> np.ndarray:
        """One reward per (prompt, image) pair, computed in a single batched forward. -> (N,) float64"""
        if not check_pairs(prompts, images):
            return np.zeros(0, dtype=np.float64)
        return self.rewards(prompts, images).double().cpu().numpy()
