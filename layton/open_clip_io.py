"""open_clip models from local files only: hub-style directories, or an architecture plus a state dict.

Two release shapes are read, both into open_clip's own classes:

1. A hub-style directory, as a Hugging Face snapshot of an open_clip model holds it (e.g.
   `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, or the tiny zoo's): `open_clip_config.json`
   (`{"model_cfg": ..., "preprocess_cfg": ...}`) and a weights file open_clip finds there
   (`open_clip_model.safetensors`, `open_clip_pytorch_model.bin`, ...). open_clip reads it
   (`create_model_from_pretrained('local-dir:DIR')`, `.bin` with `torch.load(weights_only=True)`).
   A hub id is accepted only when it is already in the local hub cache.

       load_open_clip("/models/CLIP-ViT-L-14")

2. An architecture and a separate state-dict file (HPSv2's `HPS_v2_compressed.pt`, which is
   `{"state_dict": sd}` for open_clip's ViT-H-14): the architecture is either an open_clip built-in
   name ("ViT-H-14") or a config file (`open_clip_config.json` as above, a bare open_clip model
   config `{"embed_dim", "vision_cfg", "text_cfg"}`, or a directory holding `open_clip_config.json`).
   The `.pt` is read with `torch.load(weights_only=True)`; `.safetensors` works too.

       load_open_clip("ViT-H-14", weights="/models/HPS_v2_compressed.pt")        # real
       load_open_clip("zoo/hpsv2/open_clip_config.json", weights="zoo/hpsv2/HPS_v2_compressed.pt")  # tiny

`pretrained` tags (which download) are never used. Missing or unreadable files raise
`layton.model_files.ModelFileError` naming the path, before any model is built.
Returned: (model in eval mode, open_clip's inference transform for it, open_clip's tokenizer).
"""

from __future__ import annotations

import copy
import json
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch

from layton.model_files import ModelFileError, check_file, check_model_dir, load_torch_file, load_torch_state_dict

CONFIG_NAME = "open_clip_config.json"
# What open_clip's `_find_checkpoint_in_dir` picks up in a local directory (it prefers these names).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pth")
PREFERRED_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _hub_dir(path_or_id: str | Path) -> Path:
    """A local open_clip hub-style directory (or cached hub snapshot), checked file by file."""
    what = "open_clip model directory"
    directory = check_model_dir(path_or_id, what, marker=CONFIG_NAME)  # absent dir / bad JSON / bad safetensors
    config = json.loads((directory / CONFIG_NAME).read_text())
    if not isinstance(config, dict) or "model_cfg" not in config:
        raise ModelFileError(f"{what}: {directory / CONFIG_NAME} has no 'model_cfg' (not an open_clip config)")
    weights = sorted(p for pattern in WEIGHT_PATTERNS for p in directory.glob(pattern))
    if not weights:
        raise ModelFileError(
            f"{what}: {directory} holds no weights (expected {' or '.join(PREFERRED_WEIGHTS)}); "
            "open_clip would silently build a randomly initialised model"
        )
    for p in weights:
        check_file(p, what)
    if not any(p.suffix == ".safetensors" for p in weights):
        # open_clip will torch.load a pickle: read it here first (tensors mapped, not read), so that a
        # file holding code is refused with the project's message rather than open_clip's.
        for p in weights:
            load_torch_file(p, what, mmap=zipfile.is_zipfile(p))
    return directory


def _architecture(arch: str | Path) -> tuple[dict, dict, Path | None]:
    """(model_cfg, preprocess_cfg overrides, config directory or None) for a name or config path."""
    import open_clip

    text = str(arch)
    path = Path(arch)
    if path.is_dir():
        path = path / CONFIG_NAME
    elif not path.exists() and text in open_clip.list_models():
        return open_clip.get_model_config(text), {}, None
    elif not path.exists() and not (path.suffix == ".json" or "/" in text or "\\" in text):
        raise ValueError(f"unknown open_clip architecture {text!r}: neither a built-in name nor a config file")
    check_file(path, "open_clip model config")  # ModelFileError when absent or not JSON
    config = json.loads(path.read_text())
    model_cfg = config.get("model_cfg", config) if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict) or not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ModelFileError(f"open_clip model config: {path} is not an open_clip model config")
    return copy.deepcopy(model_cfg), dict(config.get("preprocess_cfg", {})), path.parent


def _build(model_cfg: dict, preprocess_overrides: dict):
    """open_clip's model class for `model_cfg`, chosen and configured as `open_clip.create_model` does."""
    from open_clip.model import CLIP, CustomTextCLIP, set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    if "multimodal_cfg" in model_cfg:
        raise ValueError("CoCa configs are not supported here (contrastive CLIP models only)")
    text_cfg = model_cfg.setdefault("text_cfg", {})
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = False  # the state dict supplies the text tower: no download
    custom_text = model_cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
    model = (CustomTextCLIP if custom_text else CLIP)(**model_cfg)
    preprocess_cfg = merge_preprocess_dict(asdict(PreprocessCfg()), preprocess_overrides)
    preprocess_cfg["size"] = model.visual.image_size
    set_model_preprocess_cfg(model, preprocess_cfg)
    return model


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return load_torch_state_dict(path, "open_clip")  # weights_only; unwraps {"state_dict": sd}


def _tokenizer(model_cfg: dict, config_dir: Path | None):
    """open_clip's tokenizer for a config read from a file (SimpleTokenizer: BPE vocab ships with open_clip)."""
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer, SimpleTokenizer

    text_cfg = model_cfg.get("text_cfg", {})
    context_length = text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    if text_cfg.get("hf_tokenizer_name"):
        if config_dir is None:
            raise ValueError("an HF-tokenizer model needs its tokenizer files in the config directory")
        return HFTokenizer(str(config_dir), context_length=context_length, **kwargs)
    return SimpleTokenizer(context_length=context_length, **kwargs)


def load_open_clip(path_or_name: str | Path, *, weights: str | Path | None = None, device="cpu"):
    """-> (model, preprocess, tokenizer); see the module docstring for the two accepted forms."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    if weights is None:
        directory = _hub_dir(path_or_name)
        model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{directory}", device=device)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{directory}")
        return model.eval(), preprocess, tokenizer

    weights = check_file(weights, "open_clip weights")  # before building anything
    model_cfg, preprocess_overrides, config_dir = _architecture(path_or_name)
    if config_dir is not None:
        tokenizer = _tokenizer(model_cfg, config_dir)
    else:
        tokenizer = open_clip.get_tokenizer(str(path_or_name))
    model = _build(model_cfg, preprocess_overrides)
    state_dict = _read_weights(weights)
    try:
        model.load_state_dict(state_dict, strict=True)  # copies (and casts, e.g. fp16 -> fp32) into the model
    except RuntimeError as err:
        reason = " ".join(str(err).split())[:500]
        raise ValueError(f"{weights}: not a state dict of open_clip {path_or_name} ({reason})") from err
    model.to(device).eval()
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return model, preprocess, tokenizer
