"""The synthesis stage's config: prompts → FLUX images → ImageReward/MPS → Qwen2-VL captions → shards."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from layton.config import (Acceleration, Dtype, ImageRewardPaths, MPSPaths, PathStr, RayConfig, Resources, Runtime, Section)


class PromptsConfig(Section):
    paths: list[PathStr] = Field(min_length=1)  # parquet files, directories or globs
    text_column: str = "TEXT"  # LAION metadata's caption column
    id_column: str | None = None  # when absent, id = hash(file name, row)
    max_chars: int = Field(1000, ge=1)  # longer prompts are rejected, not truncated
    dedup: bool = True  # a distributed pre-pass (pipelines/dedup.py) finds repeated texts
    limit: int | None = Field(None, ge=1)  # the first `limit` input rows, in file order
    sample_fraction: float | None = Field(None, gt=0, le=1)
    sample_seed: int = 0


class GenerationConfig(Section):
    model: PathStr  # FluxPipeline directory (or a cached hub id)
    height: int = Field(1024, ge=16)
    width: int = Field(1024, ge=16)
    num_inference_steps: int = Field(50, ge=1)
    guidance_scale: float = 3.5
    max_sequence_length: int = Field(512, ge=1, le=512)
    batch_size: int = Field(1, ge=1)  # prompts per model call; also the chunk every stage batches by
    dtype: Dtype = "bfloat16"
    seed: int = 0  # mixed into every prompt's seed
    accel: Runtime[Acceleration] = Acceleration()  # attention, torch.compile of the transformer, VAE slicing/tiling
    resources: Runtime[Resources] = Resources()

    @model_validator(mode="after")
    def _multiple_of_16(self):
        # FLUX packs 2x2 patches of an 8x-downsampled latent.
        for name in ("height", "width"):
            if getattr(self, name) % 16:
                raise ValueError(f"{name}={getattr(self, name)} must be a multiple of 16")
        return self


class ScoringConfig(Section):
    imagereward: ImageRewardPaths
    mps: MPSPaths
    imagereward_threshold: float = 0.8
    mps_threshold: float = 12.0
    dtype: Dtype = "float32"
    resources: Runtime[Resources] = Resources()


class RecaptionConfig(Section):
    backend: Literal["transformers", "vllm"] = "transformers"
    model: PathStr  # Qwen2-VL model directory
    instruction: str = "Describe this image in detail."
    max_new_tokens: int = Field(128, ge=1)
    dtype: Dtype = "bfloat16"
    vllm_batch_size: Runtime[int] = Field(16, ge=1)
    engine_kwargs: Runtime[dict] = Field(default_factory=dict)  # passed to vLLM as is
    resources: Runtime[Resources] = Resources()


class OutputConfig(Section):
    dir: Runtime[PathStr]  # a local path or a URI (s3://..., anything pyarrow or fsspec opens)
    # Prompts handled per shard (accepted or not): input rows per shard, / sample_fraction when set.
    # A shard is the unit of work: a retried task or a killed run redoes at most the shards in flight.
    shard_size: int = Field(1000, ge=1)
    image_format: Literal["jpg", "png", "webp"] = "jpg"
    jpeg_quality: int = Field(95, ge=1, le=100)


class FaultsConfig(Section):
    """How the synthesis run rides out failures. A stage actor killed mid-shard is restarted and
    its shard redone; a task (reading, writing a shard) is retried. Bounded, so that an input that
    crashes a process every time ends the run with an error instead of looping."""

    max_actor_restarts: int = Field(4, ge=0)
    max_task_retries: int = Field(4, ge=0)


class SynthConfig(Section):
    prompts: PromptsConfig
    generation: GenerationConfig
    scoring: ScoringConfig
    recaption: RecaptionConfig
    output: OutputConfig
    order: Literal["score_first", "recaption_first"] = "score_first"
    faults: Runtime[FaultsConfig] = FaultsConfig()
    ray: Runtime[RayConfig] = RayConfig()
