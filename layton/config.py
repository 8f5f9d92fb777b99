"""Typed configuration: the base every stage's config is built from, and the sections stages share.

Every section is a pydantic model that forbids unknown fields, so a typo fails at load time with
the file and the dotted field path in the message, before any Ray work starts. Each stage's own
schema lives beside the stage (`stages/<stage>/config.py`).

Two annotations carry what the rest of the code needs to know about a field:
- `PathStr`: a path. It is resolved here, once, at validation: a URI stays as written, a local path
  is made absolute (Ray workers do not run in the driver's directory); a hub id that the local hub
  cache holds stays an id.
- `Runtime[...]`: where or how a stage runs (the cluster, actors, batch sizes of the engine, where
  the output lives), not what it produces. The settings fingerprint (`layton.completion`) leaves
  these fields out, so moving a run to more GPUs or another directory still resumes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from layton.storage import is_uri

Dtype = Literal["float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the field."""


class Section(BaseModel):
    # Floats finite: a NaN threshold would reject every sample. (Strict types come with `from_file`.)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _cached_hub_id(path: str) -> bool:
    """`org/name` that the local hub cache holds (a run never downloads)."""
    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        return False
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    return Path(cache, "models--" + path.replace("/", "--")).is_dir()


def resolve_path(path: str) -> str:
    """The one rule for path fields: URIs as written, local paths absolute, cached hub ids as ids."""
    if is_uri(path) or (not Path(path).exists() and _cached_hub_id(path)):
        return path
    return str(Path(path).expanduser().resolve())


PathStr = Annotated[str, AfterValidator(resolve_path)]


class _RuntimeMarker:
    def __repr__(self) -> str:
        return "RUNTIME"


RUNTIME = _RuntimeMarker()
T = TypeVar("T")
Runtime = Annotated[T, RUNTIME]


# --- sections several stages share ---------------------------------------------------------------


class Resources(Section):
    """Per-stage Ray resources. Nothing is hard-coded: every stage reads these."""

    num_actors: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0)  # per actor
    num_cpus: float = Field(1.0, gt=0)  # per actor
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the actor got a GPU


class RayConfig(Section):
    address: str | None = None  # None: start a local instance
    num_cpus: int | None = Field(None, ge=1)  # local instance only
    num_gpus: int | None = Field(None, ge=0)  # local instance only
    dashboard: bool = True  # local instance only; binds to 127.0.0.1


class Acceleration(Section):
    """GPU speed options of a stage's main network (FLUX transformer, SDXL UNet, GPT) and its VAE.
    All Runtime: they change speed and memory, not what is computed (up to float rounding); the
    weights' dtype and autocast are settings of their own (`dtype`, `mixed_precision`). Each works on
    CPU too, so the tests run every code path. Applied by `layton.acceleration`."""

    compile: Runtime[bool] = False  # torch.compile the main network (the first call pays the compile)
    compile_mode: Runtime[Literal["default", "reduce-overhead", "max-autotune"]] = "default"
    attention: Runtime[Literal["sdpa", "eager"]] = "sdpa"  # scaled_dot_product_attention, or the math path
    channels_last: Runtime[bool] = False  # convolutional networks (UNet, VAE) in NHWC memory format
    vae_slicing: Runtime[bool] = False  # decode a batch one image at a time (peak memory)
    vae_tiling: Runtime[bool] = False  # decode/encode in overlapping tiles (1024² and larger on small GPUs)
    # Tile side in px (a multiple of 64). diffusers' own default is the VAE's sample_size (SDXL: 1024),
    # which leaves a 1024² image untiled.
    vae_tile_size: Runtime[int] = Field(512, ge=64, multiple_of=64)


class OptimConfig(Section):
    name: Literal["adam", "adamw"] = "adam"
    lr: float = Field(1e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)


class LPIPSConfig(Section):
    net: Literal["vgg", "alex", "squeeze"] = "vgg"
    backbone: PathStr  # torchvision release weights of the backbone (vgg16-397923af.pth, ...)


class TrainRunConfig(Section):
    storage_path: Runtime[PathStr]  # Ray Train storage (checkpoints, TensorBoard, exports)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # rerunning the same name resumes
    num_workers: int = Field(1, ge=1)
    use_gpu: Runtime[bool] = False
    cpus_per_worker: Runtime[float] = Field(1.0, gt=0)
    # How Ray places the workers (ScalingConfig.placement_strategy): PACK fills nodes, SPREAD spreads them.
    placement_strategy: Runtime[Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]] = "PACK"
    seed: int = 0


class TrainDataConfig(Section):
    """How a training job reads its rows (the data sections of the training stages build on it)."""

    shuffle_seed: int = 0
    shuffle_files: bool = True  # the data set's files in a new order every epoch (seeded by shuffle_seed)
    shuffle_buffer: Runtime[int] = Field(256, ge=0)  # rows of each worker's local shuffle buffer; 0: off
    read_cpus: Runtime[float] = Field(1.0, gt=0)  # per Ray Data read task: kept free of the training workers
    # Keep each worker's rows in memory after the first epoch (small data sets: the demo, tests);
    # large ones stream every epoch from Ray Data.
    cache_in_memory: Runtime[bool] = False


class SamplingConfig(Section):
    """LaytonGen sampling: training's sample grids, GenEval and COCO generation."""

    cfg_scale: float = Field(7.5, ge=0)  # <= 1: no guidance (LlamaGen's rule)
    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(1000, ge=0)  # 0: off
    top_p: float = Field(1.0, gt=0, le=1)  # 1: off
    image_size: int = Field(1024, ge=8)  # decoded px
    decode_steps: int | None = Field(None, ge=1)  # default: the tokenizer's consistency steps
    # Weights of the GPT and the tokenizer's decoder, sampled under autocast to it (CUDA; CPU runs float32).
    dtype: Dtype = "float32"
    accel: Runtime[Acceleration] = Acceleration()


class ImageRewardPaths(Section):
    checkpoint: PathStr  # ImageReward.pt
    med_config: PathStr  # med_config.json
    tokenizer: PathStr  # bert-base-uncased tokenizer directory


class MPSPaths(Section):
    checkpoint: PathStr  # MPS_overall_checkpoint.pth or its converted .safetensors
    processor: PathStr  # the CLIP ViT-H-14 tokenizer + image processor directory


# --- reading ---------------------------------------------------------------------------------------


def field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def validation_problems(e: ValidationError, prefix: str = "") -> list[str]:
    """One `dotted.field: message` per problem pydantic found."""
    return [f"{prefix}{field_path(err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()]


S = TypeVar("S", bound=BaseModel)


def parse_yaml(text: str, source: str) -> dict:
    """A YAML mapping; anything else raises ConfigError naming `source`."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def from_file(data: dict, cls: type[S]) -> S:
    """`cls` from data a user wrote (YAML), strictly: numbers must be numbers (no '-1.0', True or
    '8' for 8), integers integers (8.0 is not one), booleans booleans ('yes' is not one). Through
    JSON because there strict mode still takes a list for a tuple, as YAML writes one."""
    return cls.model_validate_json(json.dumps(data, default=str), strict=True)


def validate(raw: dict, cls: type[S], source: str) -> S:
    try:
        return from_file(raw, cls)
    except ValidationError as e:
        raise ConfigError(f"{source}: " + "; ".join(validation_problems(e))) from None


def load_config(path: str | Path, cls: type[S]) -> S:
    """Read a YAML file into `cls`; any problem raises ConfigError naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    return validate(parse_yaml(path.read_text(), str(path)), cls, str(path))


def save_config(config: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
