"""Typed configuration, loaded from YAML.

Every section is a pydantic model that forbids unknown fields, so a typo fails at load time with
the file and the dotted field path in the message — before any Ray work starts.
Relative paths in a config are resolved against the current working directory (the repository
root when the job runs under Ray Jobs with the repository as `working_dir`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Dtype = Literal["float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(Section):
    """Per-stage Ray resources. Nothing is hard-coded: every stage reads these."""

    num_actors: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0)  # per actor
    num_cpus: float = Field(1.0, gt=0)  # per actor
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the actor got a GPU


class PromptsConfig(Section):
    paths: list[str] = Field(min_length=1)  # parquet files, directories or globs
    text_column: str = "TEXT"  # LAION metadata's caption column
    id_column: str | None = None  # when absent, id = hash(file name, row)
    max_chars: int = Field(1000, ge=1)  # longer prompts are rejected, not truncated
    dedup: bool = True
    limit: int | None = Field(None, ge=1)
    sample_fraction: float | None = Field(None, gt=0, le=1)
    sample_seed: int = 0


class GenerationConfig(Section):
    model: str  # FluxPipeline directory (or a hub id on machines that reach a hub)
    height: int = Field(1024, ge=16)
    width: int = Field(1024, ge=16)
    num_inference_steps: int = Field(50, ge=1)
    guidance_scale: float = 3.5
    max_sequence_length: int = Field(512, ge=1, le=512)
    batch_size: int = Field(1, ge=1)  # prompts per model call; also the chunk every stage batches by
    dtype: Dtype = "bfloat16"
    seed: int = 0  # mixed into every prompt's seed
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _multiple_of_16(self):
        # FLUX packs 2x2 patches of an 8x-downsampled latent.
        for name in ("height", "width"):
            if getattr(self, name) % 16:
                raise ValueError(f"{name}={getattr(self, name)} must be a multiple of 16")
        return self


class ImageRewardPaths(Section):
    checkpoint: str  # ImageReward.pt
    med_config: str  # med_config.json
    tokenizer: str  # bert-base-uncased tokenizer directory


class MPSPaths(Section):
    checkpoint: str  # MPS_overall_checkpoint.pth or its converted .safetensors
    processor: str  # the CLIP ViT-H-14 tokenizer + image processor directory


class ScoringConfig(Section):
    imagereward: ImageRewardPaths
    mps: MPSPaths
    imagereward_threshold: float = 0.8
    mps_threshold: float = 12.0
    dtype: Dtype = "float32"
    resources: Resources = Resources()


class RecaptionConfig(Section):
    backend: Literal["transformers", "vllm"] = "transformers"
    model: str  # Qwen2-VL model directory
    instruction: str = "Describe this image in detail."
    max_new_tokens: int = Field(128, ge=1)
    dtype: Dtype = "bfloat16"
    vllm_batch_size: int = Field(16, ge=1)
    engine_kwargs: dict = Field(default_factory=dict)  # passed to vLLM as is
    resources: Resources = Resources()


class OutputConfig(Section):
    dir: str
    shard_size: int = Field(1000, ge=1)  # prompts handled per shard (accepted or not)
    image_format: Literal["jpg", "png", "webp"] = "jpg"
    jpeg_quality: int = Field(95, ge=1, le=100)


class RayConfig(Section):
    address: str | None = None  # None: start a local instance
    num_cpus: int | None = Field(None, ge=1)  # local instance only
    num_gpus: int | None = Field(None, ge=0)  # local instance only
    dashboard: bool = True  # local instance only; binds to 127.0.0.1


class SynthConfig(Section):
    prompts: PromptsConfig
    generation: GenerationConfig
    scoring: ScoringConfig
    recaption: RecaptionConfig
    output: OutputConfig
    order: Literal["score_first", "recaption_first"] = "score_first"
    ray: RayConfig = RayConfig()

    def fingerprint(self) -> dict:
        """The settings that decide what lands in the shards.

        Resources and the Ray address are left out: moving a run to more GPUs must still resume.
        """
        data = self.model_dump(mode="json")
        data.pop("ray")
        for section in ("generation", "scoring", "recaption"):
            data[section].pop("resources")
        data["recaption"].pop("vllm_batch_size")
        data["recaption"].pop("engine_kwargs")
        return data

    def fingerprint_hash(self) -> str:
        blob = json.dumps(self.fingerprint(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def load_config(path: str | Path, cls: type[BaseModel] = SynthConfig) -> BaseModel:
    """Read YAML into `cls`; any problem raises ConfigError naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{_field_path(err['loc']) or '<root>'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{path}: {problems}") from None


def save_config(config: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
