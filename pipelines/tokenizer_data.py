"""Training input for the tokenizer: shard images, and the precomputed tokens + latents pass.

The VQ encoder, quantizer and SDXL VAE encoder are frozen, so their outputs for a training image
never change. `precompute` runs them once as a Ray Data pass and writes parquet with, per image:

    key, image (the shard's encoded bytes: stage 2 needs pixels for LPIPS),
    caption     the sample's training caption (`.txt`): LaytonGen's text precompute reads it from here
    tokens_<S>  int16 code ids of the S-px encoder input (S in model.encoder_sizes), row-major h*w
    latent_<R>  float16 bytes of the (4, R/8, R/8) scaled VAE latents (R in the stages' resolutions)
    error       why the image was skipped (unreadable bytes), else ""

The pass is written by `pipelines.precompute.run_pass` (marker last, reuse).
"""

from __future__ import annotations

import io
import logging

import numpy as np
import ray
import torch
from PIL import Image

from layton.devices import pick_device
from layton.storage import absolute, filesystem, join
from layton.tokenizer import images_to_tensor, vae_encode
from layton.vq import load_llamagen_vq
from pipelines.precompute import read_pass, run_pass, training_read
from pipelines.shards import complete_shards, shard_name

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("jpg", "png", "webp")
PASS_VERSION = 2  # 2: the caption column


def _accepted_tars(d: str) -> list[str]:
    """The tar names of the complete shards of a synthesis output directory that accepted samples."""
    done = complete_shards(d)
    if not done:
        raise FileNotFoundError(f"data.shards: {d} holds no complete shard (run `layton synth` first)")
    return [f"{shard_name(s)}.tar" for s in sorted(done) if done[s].get("accepted", 1)]


def shard_tars(dirs: list[str]) -> list[str]:
    """The tars (local paths or URIs) of the complete shards of each synthesis output directory."""
    tars = [join(d, name) for d in dirs for name in _accepted_tars(d)]
    if not tars:
        raise FileNotFoundError(f"data.shards: no accepted samples in {', '.join(dirs)}")
    return tars


def _image_column(batch: dict) -> dict:
    images, captions = [], []
    for i in range(len(batch["__key__"])):
        # A member a sample lacks comes back as None or NaN, depending on the block.
        data = next((batch[c][i] for c in IMAGE_COLUMNS if c in batch and isinstance(batch[c][i], bytes)), b"")
        images.append(data)
        txt = batch["txt"][i] if "txt" in batch else None
        captions.append(txt.decode("utf-8", errors="replace") if isinstance(txt, bytes) else "")
    return {"key": batch["__key__"], "image": np.array(images, dtype=object), "caption": np.array(captions, dtype=object)}


def read_shard_images(dirs: list[str], **read_args) -> ray.data.Dataset:
    """key, encoded image bytes and caption of every accepted sample (decoding happens where it is
    used). `read_args`: Ray Data's read options (`training_read`'s, for a training input)."""
    fs, paths = None, []
    for d in dirs:
        d_fs, base = filesystem(d)
        if fs is not None and not d_fs.equals(fs):
            raise ValueError(f"data.shards: {', '.join(dirs)} are not all on one filesystem (Ray Data reads one)")
        fs = d_fs
        paths += [f"{base}/{name}" for name in _accepted_tars(d)]
    if not paths:
        raise FileNotFoundError(f"data.shards: no accepted samples in {', '.join(dirs)}")
    ds = ray.data.read_webdataset(paths, filesystem=fs, decoder=None, **read_args)
    # The same CPUs as the read: fused into one task, which the CPU check keeps room for.
    return ds.map_batches(_image_column, batch_format="numpy", num_cpus=read_args.get("num_cpus", 1))


def decode_image(data: bytes) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None) or (None, reason). Grayscale, palette, alpha and CMYK images become RGB."""
    if not data:
        return None, "no image member"
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB"), None
    except Exception as e:  # PIL raises many types for truncated/garbled files
        return None, f"unreadable image: {type(e).__name__}"


class PrecomputeStage:
    """Ray Data actor: frozen VQ encoder + SDXL VAE encoder over image bytes."""

    def __init__(self, vq_path: str, vae_dir: str, vae_subfolder: str | None, encoder_sizes: list[int],
                 resolutions: list[int], device: str = "auto"):
        from diffusers import AutoencoderKL


        self.device = pick_device(device)
        self.vq = load_llamagen_vq(vq_path).to(self.device)
        self.vae = AutoencoderKL.from_pretrained(vae_dir, subfolder=vae_subfolder).to(self.device).eval()
        self.encoder_sizes, self.resolutions = encoder_sizes, resolutions

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        decoded = [decode_image(b) for b in batch["image"]]
        ok = [i for i, (img, _) in enumerate(decoded) if img is not None]
        out: dict = {"key": batch["key"], "image": batch["image"], "caption": batch["caption"],
                     # "" rather than null: an all-null column comes back from parquet as float NaN.
                     "error": np.array([err or "" for _, err in decoded], dtype=object)}
        images = [decoded[i][0] for i in ok]
        # Skipped rows get zeros / empty bytes (their `error` says so): typed columns, no nulls.
        for s in self.encoder_sizes:
            col = np.zeros((n, (s // 16) ** 2), dtype=np.int16)
            if images:
                codes = self.vq.encode_codes(images_to_tensor(images, s).to(self.device)).cpu().numpy()
                col[ok] = codes.reshape(len(ok), -1)
            out[f"tokens_{s}"] = col
        for r in self.resolutions:
            col = np.array([b""] * n, dtype=object)
            if images:
                z = vae_encode(self.vae, images_to_tensor(images, r).to(self.device)).float().cpu().numpy()
                for j, i in enumerate(ok):
                    col[i] = z[j].astype(np.float16).tobytes()
            out[f"latent_{r}"] = col
        return out


def precompute_settings(config) -> dict:
    m = config.model
    return {
        "shards": shard_tars(config.data.shards),
        "vq": absolute(m.vq),
        "vae": absolute(m.vae or join(m.sdxl, "vae")),
        "encoder_sizes": sorted(m.encoder_sizes),
        "resolutions": config.resolutions(),
        "version": PASS_VERSION,
    }


def precompute(config) -> dict:
    """Run the pass unless a complete one with the same settings exists. Returns the marker."""
    settings = precompute_settings(config)
    m, d = config.model, config.data
    vae_dir, sub = (m.vae, None) if m.vae else (m.sdxl, "vae")
    return run_pass(config.precompute_path(), settings, lambda: read_shard_images(config.data.shards).map_batches(
        PrecomputeStage,
        fn_constructor_kwargs=dict(vq_path=m.vq, vae_dir=vae_dir, vae_subfolder=sub, encoder_sizes=settings["encoder_sizes"],
                                   resolutions=settings["resolutions"], device="cuda" if d.num_gpus else "cpu"),
        batch_size=8,
        compute=ray.data.ActorPoolStrategy(size=d.num_actors),
        num_gpus=d.num_gpus,
        batch_format="numpy",
    ))


def read_precomputed(config) -> ray.data.Dataset:
    return read_pass(config.precompute_path(), **training_read(config.data))
