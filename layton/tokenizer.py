"""LaytonTokenizer: image -> 256 token ids (LlamaGen VQ-16) -> image (LADD + SDXL VAE).

A tokenizer directory holds only what training produced; the frozen upstream weights are named by
path, so a checkpoint is the size of the ControlNet copy, not the 7 GB of SDXL. Its one index file is
`model_index.json` (diffusers' name); each part it holds is a diffusers model in a subfolder named
by its index key, relative to the directory, so the directory can be moved or copied whole:

    model_index.json
        _class_name      "LaytonTokenizer"
        format           "layton-tokenizer/2"
        stage            0 (untrained), 1 or 2
        encoder_size     the VQ input size `encode` uses by default (256 px -> 16x16 tokens)
        controlnet       ["layton.ladd", "LaddControlNet"]           -> controlnet/
        embedder         ["layton.ladd", "TokenConditionEmbedder"]   -> embedder/
        empty_prompt     ["layton.ladd", "EmptyPromptConditions"]    -> empty_prompt/
        vq, sdxl, vae    the upstream releases (absolute paths, or hub ids): the LlamaGen VQ .pt,
                         the SDXL release (UNet, scheduler, and VAE unless `vae` names one)
        consistency      stage 2: {kind, lora, lora_scale, timesteps}; its LoRA is fused into the
                         UNet at load time. null before stage 2.
    controlnet/      config.json + diffusion_pytorch_model.safetensors   the trained ControlNet copy
    embedder/        config.json + diffusion_pytorch_model.safetensors   the trained token embedder
    empty_prompt/    config.json + diffusion_pytorch_model.safetensors   SDXL's fixed empty-prompt conditions

The index is written last (a directory with an index is a whole checkpoint).
`from_pretrained(DIR, sdxl=..., vq=..., vae=..., lora=...)` overrides an upstream path when the
weights moved. A directory in the first layout (`tokenizer_config.json` + `ladd.safetensors`) is
refused with a `ModelFileError` that says how to convert it (`convert_legacy_tokenizer`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from layton.devices import keep_freed_cpu_memory
from layton.ladd import LADD, PARTS, EmptyPromptConditions, LaddControlNet, TokenConditionEmbedder, empty_prompt_conditions
from layton.ladd_sampling import consistency_latents, ddim_latents
from layton.lora import fuse_lora_into_unet
from layton.model_files import ModelFileError, check_file, check_model_dir, read_model_index
from layton.storage import Root, is_uri, local_copy
from layton.vq import load_llamagen_vq
from layton.vq import preprocess

INDEX_NAME = "model_index.json"
CLASS_NAME = "LaytonTokenizer"
FORMAT = "layton-tokenizer/2"
SPEC_KEYS = ("format", "stage", "encoder_size", "vq", "sdxl", "vae", "consistency")
# The first layout, still recognised so that it can be refused clearly and converted.
LEGACY_CONFIG_NAME = "tokenizer_config.json"
LEGACY_WEIGHTS_NAME = "ladd.safetensors"
LEGACY_EMPTY_PROMPT_NAME = "empty_prompt.safetensors"
LEGACY_FORMAT = "layton-tokenizer/1"


def _path_or_id(p: str | None) -> str | None:
    """Upstream paths are stored absolute so a checkpoint loads from any working directory (and after
    the checkpoint itself moved); what is not a local path (a hub id) is kept as given."""
    if p is None:
        return None
    return str(Path(p).resolve()) if Path(p).exists() else p


def _read_legacy_spec(directory: Path) -> dict | None:
    """The spec of a first-layout tokenizer directory, or None (HF text tokenizers use the same file name)."""
    try:
        spec = json.loads((directory / LEGACY_CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) and spec.get("format") == LEGACY_FORMAT else None


def _legacy_error(directory: Path, what: str) -> ModelFileError:
    return ModelFileError(
        f"{what}: {directory} is a Layton tokenizer in the old layout ({LEGACY_CONFIG_NAME} + {LEGACY_WEIGHTS_NAME}, "
        f"format {LEGACY_FORMAT}); convert it once into the {INDEX_NAME} layout with "
        f"`layton convert tokenizer {directory} NEW_DIR` (layton.tokenizer.convert_legacy_tokenizer) and load NEW_DIR"
    )


def read_tokenizer_index(directory: str | Path, what: str = "tokenizer") -> dict:
    """The parsed `model_index.json` of a tokenizer directory, checked: its class, format and the parts
    it names (config + readable safetensors headers, no weights loaded). Errors name `what` and the path.
    A URI (a tokenizer exported to a bucket) is read from its local copy (`layton.storage.local_copy`)."""
    d = local_copy(directory, what)
    legacy = _legacy_error(d, what) if not (d / INDEX_NAME).is_file() and _read_legacy_spec(d) is not None else None
    index = read_model_index(d, CLASS_NAME, FORMAT, what, "a Layton tokenizer", legacy)
    index_path = d / INDEX_NAME
    for sub in PARTS:
        if not isinstance(index.get(sub), list):
            raise ModelFileError(f"{what}: {index_path} does not name its {sub!r} part")
        check_model_dir(d / sub, f"{what} ({sub}/ of {d})")
    return index


def is_tokenizer_dir(directory: str | Path) -> bool:
    """Whether `directory` holds a tokenizer index. A directory in the old layout is neither yes nor no:
    it raises the `ModelFileError` that says how to convert it."""
    if is_uri(directory):
        return Root(directory).exists(INDEX_NAME)
    d = Path(directory)
    if not (d / INDEX_NAME).is_file() and _read_legacy_spec(d) is not None:
        raise _legacy_error(d, "tokenizer")
    return (d / INDEX_NAME).is_file()


def _write_index(directory: Path, spec: dict) -> None:
    import diffusers

    index = {"_class_name": CLASS_NAME, "_diffusers_version": diffusers.__version__, "format": FORMAT,
             **{k: spec[k] for k in SPEC_KEYS if k != "format"},
             **{sub: [klass.__module__, klass.__name__] for sub, (_, klass) in PARTS.items()}}
    tmp = directory / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1, default=str))
    os.replace(tmp, directory / INDEX_NAME)


def check_tokenizer_models(model_cfg, consistency=None, lpips=None) -> None:
    """Every upstream file training or decoding will load; fails before any Ray work, naming the path."""
    check_file(model_cfg.vq, "model.vq")
    sdxl = check_model_dir(model_cfg.sdxl, "model.sdxl", marker="model_index.json")
    check_model_dir(sdxl / "unet", "model.sdxl (unet/)")
    check_model_dir(sdxl / "scheduler", "model.sdxl (scheduler/)", marker="scheduler_config.json")
    check_model_dir(model_cfg.vae or sdxl / "vae", "model.vae" if model_cfg.vae else "model.sdxl (vae/)")
    if consistency is not None:
        check_file(consistency.lora, "stage2.consistency.lora")
    if lpips is not None:
        check_file(lpips.backbone, "stage2.lpips.backbone")


def images_to_tensor(images, size: int) -> torch.Tensor:
    """PIL images / HWC uint8 arrays -> (B, 3, size, size) in [-1, 1]: RGB, short side resized, centre crop."""
    return preprocess(list(images), size)


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def vae_encode(vae, x: torch.Tensor) -> torch.Tensor:
    """[-1,1] pixels -> scaled latents: the posterior's mean, deterministic so that it can be precomputed."""
    cfg = vae.config
    z = vae.encode(x.to(vae.dtype)).latent_dist.mode()
    return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def vae_decode(vae, z: torch.Tensor) -> torch.Tensor:
    cfg = vae.config
    if z.device.type == "cpu":
        keep_freed_cpu_memory()
    return vae.decode((z / cfg.scaling_factor + (cfg.shift_factor or 0.0)).to(vae.dtype)).sample


class LaytonTokenizer:
    def __init__(self, vq, ladd: LADD, vae, scheduler_config: dict, spec: dict):
        self.vq, self.ladd, self.vae = vq, ladd, vae
        self.scheduler_config = dict(scheduler_config)
        self.spec = spec
        for frozen in (vq, vae):
            frozen.requires_grad_(False).eval()

    # --- construction --------------------------------------------------------------------------

    @staticmethod
    def _load_upstream(vq_path: str, sdxl: str, vae_path: str | None, dtype: torch.dtype):
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel


        vq = load_llamagen_vq(vq_path)
        unet = UNet2DConditionModel.from_pretrained(sdxl, subfolder="unet", torch_dtype=dtype)
        vae = (AutoencoderKL.from_pretrained(vae_path, torch_dtype=dtype) if vae_path
               else AutoencoderKL.from_pretrained(sdxl, subfolder="vae", torch_dtype=dtype))
        scheduler_config = dict(EulerDiscreteScheduler.load_config(sdxl, subfolder="scheduler"))
        return vq, unet, vae, scheduler_config

    @classmethod
    def build(cls, model_cfg, dtype: torch.dtype = torch.float32) -> LaytonTokenizer:
        """An untrained tokenizer (stage 1's start): LADD's trainable copy initialised from the UNet."""
        vq, unet, vae, sched = cls._load_upstream(model_cfg.vq, model_cfg.sdxl, model_cfg.vae, dtype)
        prompt_embeds, pooled = empty_prompt_conditions(model_cfg.sdxl)
        ladd = LADD.from_unet(unet, vq.config.codebook_embed_dim, model_cfg.embedder_channels, prompt_embeds, pooled)
        spec = {
            "format": FORMAT,
            "stage": 0,
            "encoder_size": model_cfg.inference_encoder_size,
            "vq": _path_or_id(model_cfg.vq),
            "sdxl": _path_or_id(model_cfg.sdxl),
            "vae": _path_or_id(model_cfg.vae),
            "consistency": None,
        }
        return cls(vq, ladd, vae, sched, spec)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        vq: str | None = None,
        sdxl: str | None = None,
        vae: str | None = None,
        lora: str | None = None,
        dtype: torch.dtype = torch.float32,
        accel=None,
    ) -> LaytonTokenizer:
        """Load a tokenizer directory (a local path or a URI); `vq` / `sdxl` / `vae` / `lora` override
        upstream paths that moved. `dtype` is LADD's and the VAE's (decode under autocast to it when it
        is half: the noise and the VQ's features are float32); `accel` a `layton.config.Acceleration`
        (`layton.acceleration.accelerate_tokenizer`)."""
        directory = local_copy(directory, "tokenizer")
        index = read_tokenizer_index(directory)
        where = directory / INDEX_NAME
        spec = {k: index.get(k) for k in SPEC_KEYS}
        spec["vq"], spec["sdxl"], spec["vae"] = vq or spec["vq"], sdxl or spec["sdxl"], vae or spec["vae"]
        if lora and spec.get("consistency"):
            spec["consistency"] = {**spec["consistency"], "lora": lora}
        check_file(spec["vq"], f"tokenizer vq (from {where})")
        check_model_dir(spec["sdxl"], f"tokenizer sdxl (from {where})", marker="model_index.json")

        vq_model, unet, vae_model, sched = cls._load_upstream(spec["vq"], spec["sdxl"], spec["vae"], dtype)
        if spec.get("consistency"):
            c = spec["consistency"]
            check_file(c["lora"], f"tokenizer consistency LoRA (from {where})")
            fuse_lora_into_unet(unet, c["lora"], scale=c["lora_scale"])
        ladd = LADD.from_pretrained(directory, unet)
        if dtype != torch.float32:  # the parts are stored in float32
            ladd.to(dtype)
        ladd.eval()
        tok = cls(vq_model, ladd, vae_model, sched, spec)
        if accel is not None:
            from layton.acceleration import accelerate_tokenizer

            accelerate_tokenizer(tok, accel)
        return tok

    def fuse_consistency(self, consistency_cfg) -> None:
        """Stage 2: merge the consistency LoRA (Hyper-SD / TLCM) into the frozen UNet."""
        fuse_lora_into_unet(self.ladd.unet, consistency_cfg.lora, scale=consistency_cfg.lora_scale)
        self.spec["consistency"] = {
            "kind": consistency_cfg.kind,
            "lora": _path_or_id(consistency_cfg.lora),
            "lora_scale": consistency_cfg.lora_scale,
            "timesteps": consistency_cfg.resolved_timesteps(),
        }

    def save_pretrained(self, directory: str | Path, stage: int | None = None) -> Path:
        """Write the tokenizer directory: LADD's parts (`LADD.save_pretrained`), then the index."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if stage is not None:
            self.spec["stage"] = stage
        (directory / INDEX_NAME).unlink(missing_ok=True)  # overwritten parts must not sit under a stale index
        self.ladd.save_pretrained(directory)
        _write_index(directory, self.spec)
        return directory

    def load_trained(self, directory: str | Path) -> None:
        """Resume from a checkpoint: the trained parts' weights of a tokenizer directory, loaded into
        this tokenizer's modules in place (the optimizer keeps its references to them)."""
        directory = local_copy(directory, "tokenizer checkpoint")
        read_tokenizer_index(directory, "tokenizer checkpoint")
        self.ladd.load_trained(directory)

    def to(self, device: torch.device | str) -> LaytonTokenizer:
        for m in (self.vq, self.ladd, self.vae):
            m.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.ladd.cond_embedder.parameters()).device

    # --- tokens, latents, pixels ------------------------------------------------------------

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images, encoder_size: int | None = None) -> torch.Tensor:
        """Images (PIL / uint8 arrays / a [-1,1] tensor) -> token ids (B, h, w); 256 px -> 16x16."""
        size = encoder_size or self.spec["encoder_size"]
        x = images if torch.is_tensor(images) else images_to_tensor(images, size)
        return self.vq.encode_codes(x.to(self.device, next(self.vq.parameters()).dtype))

    def token_features(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, device=self.device).long()
        if ids.dim() == 2:  # (B, N) with a square grid
            side = int(round(ids.shape[1] ** 0.5))
            if side * side != ids.shape[1]:
                raise ValueError(f"token ids of length {ids.shape[1]} are not a square grid")
            ids = ids.view(ids.shape[0], side, side)
        with torch.no_grad():
            return self.vq.code_features(ids).float()

    def vae_encode(self, x: torch.Tensor) -> torch.Tensor:
        return vae_encode(self.vae, x)

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        return vae_decode(self.vae, z)

    def latents(self, features: torch.Tensor, size: int, *, steps: int | None = None, sampler: str | None = None,
                generator: torch.Generator | None = None, grad_last_only: bool = True) -> torch.Tensor:
        """Token features -> z0 on the latent grid of a `size` px image."""
        b = features.shape[0]
        shape = (b, self.vae.config.latent_channels, size // self.vae_scale, size // self.vae_scale)
        noise = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu").to(self.device)
        consistency = self.spec.get("consistency")
        sampler = sampler or ("consistency" if consistency else "ddim")
        if sampler == "consistency":
            if not consistency:
                raise ValueError("this tokenizer has no consistency LoRA (a stage-1 checkpoint): use sampler='ddim'")
            timesteps = consistency["timesteps"]
            if steps is not None and steps != len(timesteps):
                timesteps = [int(t) for t in np.linspace(999, 0, steps, endpoint=False)]
            return consistency_latents(self.ladd, features, noise, self.scheduler_config, timesteps, generator, grad_last_only)
        return ddim_latents(self.ladd, features, noise, self.scheduler_config, steps or 25)

    @torch.inference_mode()  # no autograd bookkeeping at all (no_grad still tracks versions and views)
    def decode_tensor(self, ids, size: int = 1024, steps: int | None = None, sampler: str | None = None, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator("cpu").manual_seed(seed)
        z = self.latents(self.token_features(ids), size, steps=steps, sampler=sampler, generator=gen)
        return self.vae_decode(z).clamp(-1, 1)

    def decode(self, ids, size: int = 1024, steps: int | None = None, sampler: str | None = None, seed: int = 0) -> list[Image.Image]:
        """Token ids -> PIL images of `size` px. A stage-2 tokenizer takes 1 or 2 consistency steps."""
        return tensor_to_images(self.decode_tensor(ids, size, steps, sampler, seed))

    def reconstruct(self, images: Sequence, size: int, **kw) -> list[Image.Image]:
        return self.decode(self.encode(images), size=size, **kw)


# --- copying and converting directories ----------------------------------------------------------


def copy_tokenizer(src: str | Path, dst: str | Path) -> Path:
    """Copy what a tokenizer directory's index names (index + parts; nothing else, e.g. no training
    state of an export) to `dst`, index last."""
    src, dst = local_copy(src, "tokenizer"), Path(dst)
    read_tokenizer_index(src)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / INDEX_NAME).unlink(missing_ok=True)
    for sub in PARTS:
        if (dst / sub).exists():
            shutil.rmtree(dst / sub)
        shutil.copytree(src / sub, dst / sub)
    tmp = dst / (INDEX_NAME + ".tmp")
    shutil.copyfile(src / INDEX_NAME, tmp)
    os.replace(tmp, dst / INDEX_NAME)
    return dst


def convert_legacy_tokenizer(src: str | Path, dst: str | Path) -> Path:
    """Re-save a first-layout tokenizer directory (`tokenizer_config.json`, `ladd.safetensors`,
    `empty_prompt.safetensors`) in the `model_index.json` layout at `dst`. Only tensors and JSON are
    read (no pickles) and no upstream weights are loaded; the upstream paths are carried over as they
    were recorded (override them at load time if they moved). Returns `dst`."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    src, dst = Path(src), Path(dst)
    spec = _read_legacy_spec(src)
    if spec is None:
        raise ModelFileError(f"legacy tokenizer: {src} has no {LEGACY_CONFIG_NAME} of format {LEGACY_FORMAT!r}")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"convert tokenizer: {dst} exists and is not empty")
    weights = load_file(check_file(src / LEGACY_WEIGHTS_NAME, "legacy tokenizer weights"))
    empty = load_file(check_file(src / LEGACY_EMPTY_PROMPT_NAME, "legacy tokenizer empty-prompt conditions"))
    with init_empty_weights():  # the weights come from the file: skip the random init
        controlnet = LaddControlNet.from_config(spec["controlnet"])
        embedder = TokenConditionEmbedder.from_config(spec["embedder"])
    for prefix, module in (("controlnet.", controlnet), ("cond_embedder.", embedder)):
        part = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
        module.load_state_dict(part, strict=True, assign=True)
    unused = [k for k in weights if not k.startswith(("controlnet.", "cond_embedder."))]
    if unused:
        raise ModelFileError(f"legacy tokenizer: {src / LEGACY_WEIGHTS_NAME} holds unexpected tensors {unused[:5]}")
    empty_prompt = EmptyPromptConditions.from_tensors(empty["prompt_embeds"], empty["pooled_prompt_embeds"])
    dst.mkdir(parents=True, exist_ok=True)
    for sub, module in (("controlnet", controlnet), ("embedder", embedder), ("empty_prompt", empty_prompt)):
        module.save_pretrained(dst / sub, safe_serialization=True)
    _write_index(dst, {**{k: spec.get(k) for k in SPEC_KEYS}, "format": FORMAT})
    return dst
