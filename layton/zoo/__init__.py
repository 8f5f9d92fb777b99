"""Tiny models with the upstream architectures, written in the upstream release formats.

`write_tiny_zoo(DIR)` is what `layton models tiny DIR` runs; the demo and the tests load the
result with the same loaders that load real weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from layton.completion import fingerprint, is_complete, mark_complete
from layton.zoo.facescore import write_tiny_facescore
from layton.zoo.flan_t5 import write_tiny_flan_t5
from layton.zoo.flux import write_tiny_flux
from layton.zoo.imagereward import write_tiny_imagereward
from layton.zoo.inception import write_tiny_inception
from layton.zoo.llamagen_gpt import write_tiny_llamagen_gpt
from layton.zoo.llamagen_vq import TINY as TINY_VQ
from layton.zoo.llamagen_vq import write_tiny_llamagen_vq
from layton.zoo.lpips_backbone import write_tiny_lpips_backbone
from layton.zoo.mask2former import write_tiny_mask2former
from layton.zoo.mps import write_tiny_mps
from layton.zoo.open_clip_models import write_tiny_hpsv2, write_tiny_open_clip
from layton.zoo.qwen2vl import write_tiny_qwen2vl
from layton.zoo.sdxl import build_tiny_sdxl, write_tiny_consistency_loras, write_tiny_sdxl

ZOO_VERSION = 4  # raised whenever a model is added or changed


def write_tiny_zoo(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Every tiny model, each in its own sub-directory. Returns the paths a config names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"flux": write_tiny_flux(out / "flux", seed=seed)}
    paths |= {f"imagereward_{k}": v for k, v in write_tiny_imagereward(out / "imagereward", seed=seed).items()}
    paths |= {f"mps_{k}": v for k, v in write_tiny_mps(out / "mps", seed=seed).items()}
    paths["qwen2vl"] = write_tiny_qwen2vl(out / "qwen2vl", seed=seed)
    # Tokenizer (Layton): LlamaGen VQ-16, SDXL, its consistency LoRAs, the LPIPS backbone.
    paths["llamagen_vq"] = write_tiny_llamagen_vq(out / "llamagen_vq", seed=seed)
    paths["sdxl"] = write_tiny_sdxl(out / "sdxl", seed=seed)
    loras = write_tiny_consistency_loras(out / "consistency", build_tiny_sdxl(seed).unet, seed=seed)
    paths |= {f"lora_{k}": v for k, v in loras.items()}
    paths["lpips_backbone"] = write_tiny_lpips_backbone(out / "lpips", net="alex", seed=seed)
    # LaytonGen: flan-t5-xl text encoder, LlamaGen t2i GPT over the VQ's codebook.
    paths["flan_t5"] = write_tiny_flan_t5(out / "flan-t5-xl", seed=seed)
    t5_dim = json.loads((paths["flan_t5"] / "config.json").read_text())["d_model"]
    gpt = write_tiny_llamagen_gpt(out / "llamagen_gpt", t5_dim, TINY_VQ["codebook_size"], seed=seed)
    paths |= {"llamagen_gpt": gpt["release"], "gpt": gpt["gpt"]}
    # Evaluation: GenEval's detector and colour CLIP, HPSv2, FaceScore, FID Inception.
    paths["mask2former"] = write_tiny_mask2former(out / "mask2former", seed=seed)
    paths["clip_vit_l_14"] = write_tiny_open_clip(out / "clip-vit-l-14", "vit-l-14", seed=seed)
    paths["hpsv2"] = write_tiny_hpsv2(out / "hpsv2", seed=seed)
    paths |= {f"facescore_{k}": v for k, v in write_tiny_facescore(out / "facescore", seed=seed).items()}
    paths["inception"] = write_tiny_inception(out / "inception", seed=seed)
    mark_complete(out, fingerprint({"version": ZOO_VERSION}), version=ZOO_VERSION)
    return paths


def zoo_complete(out_dir: str | Path) -> bool:
    """A whole zoo of this version (an older zoo lacks the models added since)."""
    return Path(out_dir).is_dir() and is_complete(out_dir, fingerprint({"version": ZOO_VERSION})) is not None
