"""LaytonTokenizer: image -> 256 token ids (LlamaGen VQ-16) -> image (LADD + SDXL VAE).

A tokenizer directory holds only what training produced; the frozen upstream weights are named by
path, so a checkpoint is megabytes, not the 7 GB of SDXL:

    tokenizer_config.json    paths of the VQ checkpoint, SDXL release, VAE and consistency LoRA,
                             the encoder size, the embedder and ControlNet configs, the stage
    ladd.safetensors         the trainable ControlNet copy and token condition embedder
    empty_prompt.safetensors SDXL's fixed empty-prompt conditions

`from_pretrained(DIR, sdxl=..., vq=...)` overrides a path when the weights moved. A stage-2
directory names its consistency LoRA, which is fused into the UNet at load time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from layton.ladd import LADD, TokenConditionEmbedder, controlnet_from_config, empty_prompt_conditions
from layton.ladd_sampling import consistency_latents, ddim_latents
from layton.model_files import ModelFileError, check_file, check_model_dir

CONFIG_NAME = "tokenizer_config.json"
WEIGHTS_NAME = "ladd.safetensors"
EMPTY_PROMPT_NAME = "empty_prompt.safetensors"
FORMAT = "layton-tokenizer/1"


def _path_or_id(p: str | None) -> str | None:
    """Local paths are stored absolute so a checkpoint loads from any working directory."""
    if p is None:
        return None
    return str(Path(p).resolve()) if Path(p).exists() else p


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
    from layton.vq import preprocess

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

        from layton.vq import load_llamagen_vq

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
            "vq": _path_or_id(model_cfg.vq),
            "sdxl": _path_or_id(model_cfg.sdxl),
            "vae": _path_or_id(model_cfg.vae),
            "encoder_size": model_cfg.inference_encoder_size,
            "embedder": ladd.cond_embedder.config,
            "controlnet": dict(ladd.controlnet.config),
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
    ) -> LaytonTokenizer:
        directory = Path(directory)
        cfg_path = directory / CONFIG_NAME
        if not cfg_path.is_file():
            raise ModelFileError(f"tokenizer: {directory} has no {CONFIG_NAME} (not a Layton tokenizer directory)")
        spec = json.loads(cfg_path.read_text())
        if spec.get("format") != FORMAT:
            raise ModelFileError(f"tokenizer: {cfg_path} has format {spec.get('format')!r}, expected {FORMAT!r}")
        spec["vq"], spec["sdxl"], spec["vae"] = vq or spec["vq"], sdxl or spec["sdxl"], vae or spec["vae"]
        if lora and spec.get("consistency"):
            spec["consistency"]["lora"] = lora
        check_file(spec["vq"], f"tokenizer vq (from {cfg_path})")
        check_model_dir(spec["sdxl"], f"tokenizer sdxl (from {cfg_path})", marker="model_index.json")

        vq_model, unet, vae_model, sched = cls._load_upstream(spec["vq"], spec["sdxl"], spec["vae"], dtype)
        if spec.get("consistency"):
            from layton.lora import fuse_lora_into_unet

            c = spec["consistency"]
            check_file(c["lora"], f"tokenizer consistency LoRA (from {cfg_path})")
            fuse_lora_into_unet(unet, c["lora"], scale=c["lora_scale"])
        e = spec["embedder"]
        embedder = TokenConditionEmbedder(e["in_channels"], e["channels"], e["out_channels"])
        empty = load_file(directory / EMPTY_PROMPT_NAME)
        ladd = LADD(unet, controlnet_from_config(spec["controlnet"]), embedder, empty["prompt_embeds"], empty["pooled_prompt_embeds"])
        ladd.load_trainable_state_dict(load_file(directory / WEIGHTS_NAME))
        ladd.to(dtype).eval()
        return cls(vq_model, ladd, vae_model, sched, spec)

    def fuse_consistency(self, consistency_cfg) -> None:
        """Stage 2: merge the consistency LoRA (Hyper-SD / TLCM) into the frozen UNet."""
        from layton.lora import fuse_lora_into_unet

        fuse_lora_into_unet(self.ladd.unet, consistency_cfg.lora, scale=consistency_cfg.lora_scale)
        self.spec["consistency"] = {
            "kind": consistency_cfg.kind,
            "lora": _path_or_id(consistency_cfg.lora),
            "lora_scale": consistency_cfg.lora_scale,
            "timesteps": consistency_cfg.resolved_timesteps(),
        }

    def save_pretrained(self, directory: str | Path, stage: int | None = None) -> Path:
        """Weights first, config last: a directory with a config is a whole checkpoint."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if stage is not None:
            self.spec["stage"] = stage
        weights = {k: v.detach().float().contiguous().cpu() for k, v in self.ladd.trainable_state_dict().items()}
        save_file(weights, directory / WEIGHTS_NAME)
        save_file(
            {"prompt_embeds": self.ladd.prompt_embeds.float().cpu().contiguous(),
             "pooled_prompt_embeds": self.ladd.pooled_prompt_embeds.float().cpu().contiguous()},
            directory / EMPTY_PROMPT_NAME,
        )
        tmp = directory / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(self.spec, indent=1, default=str))
        os.replace(tmp, directory / CONFIG_NAME)
        return directory

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

    @torch.no_grad()
    def decode_tensor(self, ids, size: int = 1024, steps: int | None = None, sampler: str | None = None, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator("cpu").manual_seed(seed)
        z = self.latents(self.token_features(ids), size, steps=steps, sampler=sampler, generator=gen)
        return self.vae_decode(z).clamp(-1, 1)

    def decode(self, ids, size: int = 1024, steps: int | None = None, sampler: str | None = None, seed: int = 0) -> list[Image.Image]:
        """Token ids -> PIL images of `size` px. A stage-2 tokenizer takes 1 or 2 consistency steps."""
        return tensor_to_images(self.decode_tensor(ids, size, steps, sampler, seed))

    def reconstruct(self, images: Sequence, size: int, **kw) -> list[Image.Image]:
        return self.decode(self.encode(images), size=size, **kw)
