"""The reconstruction evaluation's config: rFID / PSNR / SSIM / LPIPS of tokenizers and baselines."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from layton.config import Acceleration, LPIPSConfig, PathStr, RayConfig, Resources, Runtime, Section


class ImageSet(Section):
    """Images to evaluate: a folder (recursively), a parquet file/directory with an image-bytes column,
    or synthesis shards (webdataset tars of complete shards)."""

    path: PathStr
    kind: Literal["auto", "folder", "parquet", "shards"] = "auto"
    image_column: str = "image"  # parquet only
    limit: int | None = Field(None, ge=1)


class ReconModelConfig(Section):
    name: str  # the row name in the results table
    kind: Literal["layton", "sdxl_vae", "llamagen_vq"]
    path: PathStr  # a Layton tokenizer directory | an AutoencoderKL directory | a LlamaGen VQ .pt
    decode_steps: int | None = Field(None, ge=1)  # layton: consistency (1-2) or DDIM steps
    encoder_size: int = 256  # layton / llamagen_vq: encoder input px (16x16 tokens)
    accel: Runtime[Acceleration] = Acceleration()  # layton / sdxl_vae: attention, compile, channels_last, VAE slicing/tiling


class ReconMetricsConfig(Section):
    inception: PathStr  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth
    lpips: LPIPSConfig


class ReconEvalConfig(Section):
    data: ImageSet
    models: list[ReconModelConfig] = Field(min_length=1)
    metrics: ReconMetricsConfig
    size: int = Field(1024, ge=16)  # images are resized to size x size, reconstructed and scored there
    batch_size: Runtime[int] = Field(4, ge=1)
    resources: Runtime[Resources] = Resources()
    output: Runtime[PathStr]  # results.json + results.md
    ray: Runtime[RayConfig] = RayConfig()
