"""Tiny open_clip models (GenEval's colour classifier, HPSv2) in open_clip's own file formats.

`write_tiny_open_clip(dir, kind)` writes what a Hugging Face hub snapshot of an open_clip model holds
(the layout open_clip's `save_for_hf` writes and `create_model_from_pretrained('local-dir:DIR')` reads):

    open_clip_config.json          {"model_cfg": {...}, "preprocess_cfg": {mean, std, interpolation, resize_mode}}
    open_clip_model.safetensors    the model's state dict, open_clip key names

`write_tiny_hpsv2(dir)` writes what the HPSv2 release is plus the one file a tiny model needs:

    HPS_v2_compressed.pt           torch.save({"state_dict": sd}) of a ViT-H-14-style open_clip CLIP
    open_clip_config.json          the tiny architecture (the real HPSv2 is built from open_clip's
                                   built-in "ViT-H-14" config instead; `layton.open_clip_io` takes either)

The models are open_clip's own `CLIP` class with open_clip's initialisation, seeded. The text tower
keeps the real vocabulary (49408 rows) and context length (77), so open_clip's own tokenizer (which
ships CLIP's BPE merges) is the tokenizer of the tiny models too. What is kept from the real models:

    setting                      ViT-L-14 (openai)          ViT-H-14 (laion2B-s32B-b79K)
    activation                   QuickGELU                  GELU
    vision width / head width    1024 / 64  -> 64 / 32      1280 / 80  -> 80 / 40
    embed_dim = text width       768 -> 32                  1024 -> 40
    text heads                   12 -> 2                    16 -> 2
    layers (vision, text)        24, 12 -> 2, 2             32, 24 -> 2, 2
    patch / image size           14 / 224 -> 14 / 56        14 / 224 -> 14 / 56
    preprocessing                OpenAI mean/std, bicubic, resize shortest side + centre crop (both)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_NAME = "open_clip_config.json"  # open_clip.constants.HF_CONFIG_NAME
WEIGHTS_NAME = "open_clip_model.safetensors"  # open_clip.constants.HF_SAFE_WEIGHTS_NAME
HPSV2_CHECKPOINT = "HPS_v2_compressed.pt"  # the v2.0 release name (v2.1: HPS_v2.1_compressed.pt)

_TEXT = dict(context_length=77, vocab_size=49408, heads=2, layers=2)  # real vocab: open_clip's BPE tokenizer
_IMAGE = dict(image_size=56, patch_size=14, layers=2)  # 4x4 patch grid

TINY_MODEL_CFGS: dict[str, dict] = {
    # open_clip's ViT-L-14 as the openai weights need it (ViT-L-14-quickgelu / the timm hub config)
    "vit-l-14": {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {**_IMAGE, "width": 64, "head_width": 32},
        "text_cfg": {**_TEXT, "width": 32},
    },
    # open_clip's ViT-H-14 (laion2B-s32B-b79K, the HPSv2 base)
    "vit-h-14": {
        "embed_dim": 40,
        "vision_cfg": {**_IMAGE, "width": 80, "head_width": 40},
        "text_cfg": {**_TEXT, "width": 40},
    },
}
PREPROCESS_CFG = {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
                  "resize_mode": "shortest"}


def build_tiny_open_clip(kind: str, seed: int = 0):
    """open_clip's `CLIP` for the tiny `kind` config, initialised by open_clip under a fixed seed."""
    from open_clip import CLIP

    if kind not in TINY_MODEL_CFGS:
        raise ValueError(f"unknown tiny open_clip kind {kind!r}; expected one of {sorted(TINY_MODEL_CFGS)}")
    with torch.random.fork_rng(devices=[]):  # open_clip initialises from the global generator
        torch.manual_seed(seed)
        model = CLIP(**json.loads(json.dumps(TINY_MODEL_CFGS[kind])))
    return model.eval()


def _write_config(out: Path, kind: str) -> None:
    config = {"model_cfg": TINY_MODEL_CFGS[kind], "preprocess_cfg": PREPROCESS_CFG}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def write_tiny_open_clip(out_dir: str | Path, kind: str = "vit-l-14", seed: int = 0) -> Path:
    """An open_clip hub-style directory (config + safetensors weights); returns the directory."""
    from safetensors.torch import save_file

    model = build_tiny_open_clip(kind, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_config(out, kind)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_NAME))
    return out


def write_tiny_hpsv2(out_dir: str | Path, seed: int = 0) -> Path:
    """The tiny HPSv2 release: `HPS_v2_compressed.pt` ({"state_dict": sd}) + its `open_clip_config.json`.

    The weights are a tiny ViT-H-14 seeded apart from `write_tiny_open_clip(..., "vit-h-14", seed)`, as
    HPSv2 is a fine-tuned ViT-H-14. Returns the directory.
    """
    model = build_tiny_open_clip("vit-h-14", seed + 1000)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_config(out, "vit-h-14")
    torch.save({"state_dict": model.state_dict()}, out / HPSV2_CHECKPOINT)
    return out
