"""Merging a released few-step LoRA (Hyper-SD, TLCM) into the frozen SDXL UNet.

LADD stage 2 runs the SDXL UNet with a consistency LoRA merged in, so the result must be a plain
`UNet2DConditionModel` whose weights are W + scale * (alpha / r) * B @ A, with no peft wrappers
left to slow the forward pass or leak into checkpoints. Conversion and merging are diffusers' own
(`lora_state_dict` for kohya files, `load_lora_adapter` + `fuse_lora` + `unload_lora`); this module
adds what the releases need around it:

    release                          file                                      alpha lives in
    ByteDance/Hyper-SD (kohya)       lora_unet_<module_path>.lora_down/up      `.alpha` tensors
    TLCM (PEFT adapter directory)    base_model.model.<module>.lora_A/B        adapter_config.json
    diffusers / peft state dicts     unet.<module>.lora_A/B (or lora.down/up)  file metadata, or alpha = r

A PEFT adapter's alpha is in its adapter_config.json, not in the safetensors file; without it the
merge would be off by r / alpha (TLCM trains with r=64, peft's default alpha 8), so a PEFT-format
file without its config is an error. Only safetensors files are read: a pickled .bin can run code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from layton.model_files import ModelFileError

_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_PEFT_PREFIX = "base_model.model."
_ADAPTER_NAME = "layton_fused"


def fuse_lora_into_unet(unet, path: str | Path, scale: float = 1.0) -> list[str]:
    """Merge the LoRA at `path` into `unet` in place; return the names of the modules it changed.

    `path` is a .safetensors file (kohya, PEFT or diffusers keys) or a PEFT adapter directory.
    Raises ModelFileError (a FileNotFoundError) for a missing path and ValueError for a file that
    is not safetensors, or whose UNet keys name modules the UNet lacks (or no UNet module at all).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    file = _resolve_lora_file(Path(path))
    if any(isinstance(m, BaseTunerLayer) for m in unet.modules()):
        raise ValueError(f"LoRA {file}: the UNet already carries peft adapters; fuse into a plain UNet")

    state_dict, network_alphas, metadata = _read_unet_lora(file, unet.config)
    modules = sorted({k.removeprefix("unet.").split(".lora_")[0] for k in state_dict})
    if not modules:
        raise ValueError(f"LoRA {file}: no UNet LoRA weights found (keys: {_some(_keys(file))})")
    present = dict(unet.named_modules())
    missing = [m for m in modules if m not in present]
    if missing:
        raise ValueError(
            f"LoRA {file}: {len(missing)} of {len(modules)} target modules are not in the UNet "
            f"(e.g. {_some(missing)}); is it a LoRA for this architecture?"
        )

    try:
        unet.load_lora_adapter(
            state_dict, prefix="unet", network_alphas=network_alphas, metadata=metadata, adapter_name=_ADAPTER_NAME
        )
    except (RuntimeError, ValueError) as e:  # e.g. shape mismatches: a LoRA for another model size
        unet.unload_lora()  # drop whatever was injected; nothing is merged yet
        raise ValueError(f"LoRA {file} does not fit this UNet: {e}") from None
    unet.fuse_lora(lora_scale=scale, adapter_names=[_ADAPTER_NAME])
    unet.unload_lora()  # swaps every peft layer back for its (now merged) base layer
    for attr in ("lora_scale", "_safe_fusing"):  # fuse_lora's bookkeeping
        if attr in unet.__dict__:
            delattr(unet, attr)
    return modules


def _resolve_lora_file(path: Path) -> Path:
    if not path.exists():
        raise ModelFileError(f"LoRA: {path} does not exist")
    if path.is_dir():  # a PEFT adapter directory
        path = path / "adapter_model.safetensors"
        if not path.is_file():
            raise ModelFileError(f"LoRA: {path} does not exist (expected a PEFT adapter directory)")
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA {path}: only .safetensors LoRA files are read (a pickled .bin can run code)")
    return path


def _keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


def _some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _read_unet_lora(file: Path, unet_config) -> tuple[dict, dict | None, dict | None]:
    """The UNet part of a LoRA file as peft keys `unet.<module>.lora_{A,B}.weight`, with the
    per-module alphas `unet.<module>.alpha` (or None: alpha = r) or the adapter metadata."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        raw = load_file(str(file))
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"LoRA {file}: not a readable safetensors file ({e})") from None
    if any(".dora_scale" in k or "lora_magnitude_vector" in k for k in raw):
        raise ValueError(f"LoRA {file}: DoRA weights are not supported")

    alphas = metadata = None
    if raw and all(k.startswith(_KOHYA_PREFIXES) for k in raw):
        # kohya: diffusers converts names (and SGM block numbering) and collects the `.alpha`s.
        sd, kohya_alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(dict(raw), unet_config=unet_config)
        sd = {k: v for k, v in sd.items() if k.startswith("unet.")}
        alphas = {_alpha_module(k): float(v) for k, v in (kohya_alphas or {}).items() if k.startswith("unet.")}
    elif raw and all(k.startswith(_PEFT_PREFIX) for k in raw):
        sd = {"unet." + k.removeprefix(_PEFT_PREFIX): v for k, v in raw.items()}
        alphas = _peft_alphas(file, _to_peft(sd))
    else:
        sd = {k: v for k, v in raw.items() if k.startswith("unet.")}
        if not sd and not any(k.startswith(("text_encoder", "te_", "te1_", "te2_")) for k in raw):
            sd = {"unet." + k: v for k, v in raw.items() if ".lora" in k}  # bare diffusers/peft keys
        if "lora_adapter_metadata" in header:  # diffusers >= 0.34 stores the LoraConfig (keys "unet.r", ...)
            packed = json.loads(header["lora_adapter_metadata"])
            metadata = {k: v for k, v in packed.items() if k.startswith("unet.")} or None
    return _to_peft(sd), alphas or None, metadata


def _to_peft(sd: dict) -> dict:
    """`unet.`-prefixed diffusers LoRA keys (old attention-processor or lora.down/up names) in peft form."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    bare = {k.removeprefix("unet."): v for k, v in sd.items()}
    if any(".lora_A." not in k and ".lora_B." not in k for k in bare):
        bare = convert_unet_state_dict_to_peft(bare)
    return {"unet." + k: v for k, v in bare.items()}


def _alpha_module(key: str) -> str:
    """diffusers' kohya alpha key (`unet.<m>.alpha` or `unet.<m>.processor.to_k_lora.down.weight.alpha`)
    as `unet.<module>.alpha`, the form its alpha_pattern needs when alphas differ between modules."""
    stem = key.removeprefix("unet.").removesuffix(".alpha")
    if stem.endswith("down.weight"):
        stem = next(iter(_to_peft({"unet." + stem: None}))).removeprefix("unet.").split(".lora_A")[0]
    return f"unet.{stem}.alpha"


def _peft_alphas(file: Path, unet_sd: dict) -> dict[str, float]:
    """Per-module alphas of a PEFT adapter, from the adapter_config.json beside its weights."""
    configs = sorted(file.parent.glob("*adapter_config.json"))  # TLCM's hub copy: lora_model_adapter_config.json
    if not configs:
        raise ModelFileError(
            f"LoRA {file}: PEFT-format weights need their adapter_config.json (r, lora_alpha) in {file.parent}"
        )
    preferred = [c for c in configs if c.name == "adapter_config.json"]
    config = json.loads((preferred or configs)[0].read_text())
    if config.get("use_dora"):
        raise ValueError(f"LoRA {file}: DoRA adapters are not supported")
    ranks = {
        k.removeprefix("unet.").split(".lora_B")[0]: v.shape[1] for k, v in unet_sd.items() if ".lora_B." in k
    }
    alphas = {}
    for module, r in ranks.items():
        alpha = float(config.get("lora_alpha", 8))
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if module == pattern or module.endswith("." + pattern):
                alpha = float(value)
        if config.get("use_rslora"):
            alpha *= math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r); diffusers applies alpha / r
        alphas[f"unet.{module}.alpha"] = alpha
    return alphas


__all__ = ["fuse_lora_into_unet"]
