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
    dedup: bool = True  # a distributed pre-pass (pipelines/dedup.py) finds repeated texts
    limit: int | None = Field(None, ge=1)  # the first `limit` input rows, in file order
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
    dir: str  # a local path or a URI (s3://..., anything pyarrow or fsspec opens)
    # Prompts handled per shard (accepted or not): input rows per shard, / sample_fraction when set.
    # A shard is the unit of work: a retried task or a killed run redoes at most the shards in flight.
    shard_size: int = Field(1000, ge=1)
    image_format: Literal["jpg", "png", "webp"] = "jpg"
    jpeg_quality: int = Field(95, ge=1, le=100)


class RayConfig(Section):
    address: str | None = None  # None: start a local instance
    num_cpus: int | None = Field(None, ge=1)  # local instance only
    num_gpus: int | None = Field(None, ge=0)  # local instance only
    dashboard: bool = True  # local instance only; binds to 127.0.0.1


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
    faults: FaultsConfig = FaultsConfig()
    ray: RayConfig = RayConfig()

    def fingerprint(self) -> dict:
        """The settings that decide what lands in the shards.

        Resources, fault handling, the Ray address and where the output lives are left out:
        moving a run to more GPUs or another directory must still resume.
        """
        data = self.model_dump(mode="json")
        data.pop("ray")
        data.pop("faults")
        data["output"].pop("dir")
        for section in ("generation", "scoring", "recaption"):
            data[section].pop("resources")
        data["recaption"].pop("vllm_batch_size")
        data["recaption"].pop("engine_kwargs")
        return data

    def fingerprint_hash(self) -> str:
        blob = json.dumps(self.fingerprint(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]



# --- Tokenizer training (two stages on Ray Train) -------------------------------------------------


class TokenizerModelConfig(Section):
    vq: str  # LlamaGen VQ-16 checkpoint (`{"model": state_dict}` .pt)
    sdxl: str  # SDXL pipeline directory: unet/, vae/, scheduler/, text encoders (empty-prompt conditions)
    vae: str | None = None  # an AutoencoderKL directory (e.g. the fp16-fix VAE); default: sdxl/vae
    encoder_sizes: list[int] = Field(default_factory=lambda: [224, 256, 288], min_length=1)
    inference_encoder_size: int = 256  # 256 px -> 16x16 = 256 tokens
    embedder_channels: list[int] = Field(default_factory=lambda: [512, 256, 128], min_length=1)  # one x2 upsampling each

    @model_validator(mode="after")
    def _sizes(self):
        for s in [*self.encoder_sizes, self.inference_encoder_size]:
            if s % 16:
                raise ValueError(f"encoder size {s} must be a multiple of 16 (the VQ downsamples 16x)")
        return self


class OptimConfig(Section):
    name: Literal["adam", "adamw"] = "adam"
    lr: float = Field(1e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)


class ConsistencyConfig(Section):
    kind: Literal["hypersd", "tlcm"]  # Hyper-SD: 1 step; TLCM: 2 steps
    lora: str  # the LoRA .safetensors, fused into the frozen UNet
    lora_scale: float = 1.0
    timesteps: list[int] | None = None  # default: [999] (hypersd), [999, 499] (tlcm)

    def resolved_timesteps(self) -> list[int]:
        return self.timesteps or ([999] if self.kind == "hypersd" else [999, 499])


class LPIPSConfig(Section):
    net: Literal["vgg", "alex", "squeeze"] = "vgg"
    backbone: str  # torchvision release weights of the backbone (vgg16-397923af.pth, ...)


class StageConfig(Section):
    max_steps: int = Field(ge=1)
    batch_size: int = Field(4, ge=1)  # per worker
    # (from step, image px): progressive resolution; the paper trains 512 then 1024.
    resolution_schedule: list[tuple[int, int]] = Field(default_factory=lambda: [(0, 512), (40000, 1024)], min_length=1)
    optim: OptimConfig = OptimConfig()
    checkpoint_every: int = Field(1000, ge=1)
    log_every: int = Field(10, ge=1)
    image_every: int = Field(1000, ge=1)  # reconstruction grid
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast on CUDA; CPU runs float32
    gradient_checkpointing: bool = False
    vae_slicing: bool = False

    @model_validator(mode="after")
    def _schedule(self):
        steps = [s for s, _ in self.resolution_schedule]
        if steps[0] != 0 or steps != sorted(set(steps)):
            raise ValueError("resolution_schedule must start at step 0 and increase")
        for _, px in self.resolution_schedule:
            if px % 8:
                raise ValueError(f"resolution {px} must be a multiple of 8 (the VAE downsamples 8x)")
        return self

    def resolution_at(self, step: int) -> int:
        return [px for s, px in self.resolution_schedule if s <= step][-1]


class Stage2Config(StageConfig):
    consistency: ConsistencyConfig
    lpips: LPIPSConfig
    init_from: str | None = None  # stage-1 tokenizer directory; default: the stage-1 run's export


class TokenizerDataConfig(Section):
    shards: list[str] = Field(min_length=1)  # synthesis output directories (complete shards are read)
    precompute: bool = True  # encode tokens + VAE latents once (Ray Data) instead of every step
    precompute_dir: str | None = None  # default: <storage_path>/<name>-precompute
    num_actors: int = Field(1, ge=1)  # precompute actors
    num_gpus: float = Field(0.0, ge=0)  # per precompute actor
    shuffle_seed: int = 0
    # Keep each worker's rows in memory after the first epoch (small data sets: the demo, tests);
    # large ones stream every epoch from Ray Data.
    cache_in_memory: bool = False


class TrainRunConfig(Section):
    storage_path: str  # Ray Train storage (checkpoints, TensorBoard, exports)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # rerunning the same name resumes
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    seed: int = 0


class TokenizerTrainConfig(Section):
    model: TokenizerModelConfig
    data: TokenizerDataConfig
    run: TrainRunConfig
    stage1: StageConfig
    stage2: Stage2Config
    ray: RayConfig = RayConfig()

    def stage(self, n: int) -> StageConfig:
        return self.stage1 if n == 1 else self.stage2

    def resolutions(self) -> list[int]:
        return sorted({px for st in (self.stage1, self.stage2) for _, px in st.resolution_schedule})

    def with_absolute_paths(self) -> TokenizerTrainConfig:
        """Ray Train workers do not run in the driver's directory: local paths are made absolute."""
        m, d, s2 = self.model, self.data, self.stage2
        return self.model_copy(update={
            "model": m.model_copy(update={"vq": _absolute(m.vq), "sdxl": _absolute(m.sdxl), "vae": _absolute(m.vae)}),
            "data": d.model_copy(update={"shards": [_absolute(p) for p in d.shards], "precompute_dir": _resolved(d.precompute_dir)}),
            "run": self.run.model_copy(update={"storage_path": str(Path(self.run.storage_path).resolve())}),
            "stage2": s2.model_copy(update={
                "init_from": _absolute(s2.init_from),
                "consistency": s2.consistency.model_copy(update={"lora": _absolute(s2.consistency.lora)}),
                "lpips": s2.lpips.model_copy(update={"backbone": _absolute(s2.lpips.backbone)}),
            }),
        })


# --- LaytonGen training (Ray Train) -----------------------------------------------------------------


class GPTArch(Section):
    """A LlamaGen size by name, or explicit dims (all three) for other sizes (the tiny zoo's)."""

    size: Literal["GPT-B", "GPT-L", "GPT-XL", "GPT-XXL"] | None = "GPT-XL"
    n_layer: int | None = Field(None, ge=1)
    n_head: int | None = Field(None, ge=1)
    dim: int | None = Field(None, ge=1)
    token_dropout_p: float = Field(0.1, ge=0, lt=1)
    resid_dropout_p: float = Field(0.1, ge=0, lt=1)
    ffn_dropout_p: float = Field(0.1, ge=0, lt=1)
    caption_dropout_p: float = Field(0.1, ge=0, lt=1)  # captions replaced by the unconditional one (CFG)

    @model_validator(mode="after")
    def _dims(self):
        given = [x is not None for x in (self.n_layer, self.n_head, self.dim)]
        if any(given) and not all(given):
            raise ValueError("give all of n_layer, n_head and dim, or none (and a size)")
        if not any(given) and self.size is None:
            raise ValueError("give a size (GPT-B/L/XL/XXL) or n_layer, n_head and dim")
        return self


class GenModelConfig(Section):
    gpt: GPTArch = GPTArch()
    init_from: str | None = None  # a LlamaGen t2i GPT .pt or a LaytonGen directory; default: random init
    text_encoder: str  # flan-t5-xl directory (T5EncoderModel + tokenizer)
    tokenizer: str  # Layton tokenizer directory: its VQ made the training tokens, its decoder draws the samples
    image_size: int = Field(256, ge=16)  # encoder input px: (image_size/16)^2 image tokens

    @model_validator(mode="after")
    def _size(self):
        if self.image_size % 16:
            raise ValueError(f"image_size {self.image_size} must be a multiple of 16 (the VQ downsamples 16x)")
        return self


class GenDataConfig(Section):
    tokens: str  # the tokenizer's precompute directory (key, caption, tokens_<image_size>)
    precompute_dir: str | None = None  # text features; default: <storage_path>/<name>-text
    num_actors: int = Field(1, ge=1)  # text-encoder actors
    num_gpus: float = Field(0.0, ge=0)  # per text-encoder actor
    shuffle_seed: int = 0
    cache_in_memory: bool = False  # as in the tokenizer's data section


class SamplingConfig(Section):
    cfg_scale: float = Field(7.5, ge=0)  # 1: no guidance
    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(1000, ge=0)  # 0: off
    top_p: float = Field(1.0, gt=0, le=1)  # 1: off
    image_size: int = Field(1024, ge=8)  # decoded px
    decode_steps: int | None = Field(None, ge=1)  # default: the tokenizer's consistency steps


class GenTrainLoop(Section):
    max_steps: int = Field(ge=1)
    batch_size: int = Field(8, ge=1)  # per worker
    optim: OptimConfig = OptimConfig(name="adamw", lr=1e-4, betas=(0.9, 0.99), weight_decay=0.05)
    checkpoint_every: int = Field(1000, ge=1)
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(1000, ge=1)  # a grid of samples for `sample_prompts`
    sample_prompts: list[str] = Field(default_factory=lambda: ["a red fire hydrant in front of a skyscraper",
                                                               "a photo of a cat sitting on a sofa"])
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"  # autocast on CUDA; CPU runs float32


class GenTrainConfig(Section):
    model: GenModelConfig
    data: GenDataConfig
    run: TrainRunConfig
    train: GenTrainLoop
    sampling: SamplingConfig = SamplingConfig()
    ray: RayConfig = RayConfig()

    def with_absolute_paths(self) -> GenTrainConfig:
        m, d = self.model, self.data
        return self.model_copy(update={
            "model": m.model_copy(update={"init_from": _absolute(m.init_from), "text_encoder": _absolute(m.text_encoder),
                                          "tokenizer": _absolute(m.tokenizer)}),
            "data": d.model_copy(update={"tokens": _absolute(d.tokens), "precompute_dir": _resolved(d.precompute_dir)}),
            "run": self.run.model_copy(update={"storage_path": str(Path(self.run.storage_path).resolve())}),
        })


# --- Evaluation (Ray Data jobs) ---------------------------------------------------------------------


class ImageSet(Section):
    """Images to evaluate: a folder (recursively), a parquet file/directory with an image-bytes column,
    or synthesis shards (webdataset tars of complete shards)."""

    path: str
    kind: Literal["auto", "folder", "parquet", "shards"] = "auto"
    image_column: str = "image"  # parquet only
    limit: int | None = Field(None, ge=1)


class ReconModelConfig(Section):
    name: str  # the row name in the results table
    kind: Literal["layton", "sdxl_vae", "llamagen_vq"]
    path: str  # a Layton tokenizer directory | an AutoencoderKL directory | a LlamaGen VQ .pt
    decode_steps: int | None = Field(None, ge=1)  # layton: consistency (1-2) or DDIM steps
    encoder_size: int = 256  # layton / llamagen_vq: encoder input px (16x16 tokens)


class ReconMetricsConfig(Section):
    inception: str  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth
    lpips: LPIPSConfig


class ReconEvalConfig(Section):
    data: ImageSet
    models: list[ReconModelConfig] = Field(min_length=1)
    metrics: ReconMetricsConfig
    size: int = Field(1024, ge=16)  # images are resized to size x size, reconstructed and scored there
    batch_size: int = Field(4, ge=1)
    resources: Resources = Resources()
    output: str  # results.json + results.md
    ray: RayConfig = RayConfig()

    def with_absolute_paths(self) -> ReconEvalConfig:
        """Ray workers do not run in the driver's directory: local paths are made absolute."""
        mc = self.metrics
        return self.model_copy(update={
            "data": self.data.model_copy(update={"path": _absolute(self.data.path)}),
            "models": [m.model_copy(update={"path": _absolute(m.path)}) for m in self.models],
            "metrics": mc.model_copy(update={"inception": _absolute(mc.inception),
                                             "lpips": mc.lpips.model_copy(update={"backbone": _absolute(mc.lpips.backbone)})}),
            "output": _resolved(self.output),
        })


class GenEvalRunConfig(Section):
    metadata: str  # GenEval's evaluation_metadata.jsonl
    images: str  # GenEval folder layout: written when `generator` is set, else scored as found
    generator: str | None = None  # a LaytonGen directory
    images_per_prompt: int = Field(4, ge=1)
    limit: int | None = Field(None, ge=1)  # the first N prompts (a quick subset)
    sampling: SamplingConfig = SamplingConfig()
    seed: int = 0
    detector: str  # Mask2Former COCO instance segmentation directory
    clip: str  # open_clip ViT-L-14 directory (colour classification)
    batch_size: int = Field(4, ge=1)
    resources: Resources = Resources()
    output: str
    ray: RayConfig = RayConfig()


class HPSv2Paths(Section):
    checkpoint: str  # HPS_v2_compressed.pt ({"state_dict": ...})
    architecture: str = "ViT-H-14"  # an open_clip model name or an open_clip_config.json


class FaceScorePaths(Section):
    checkpoint: str  # FS_model.pt
    med_config: str  # med_config.json
    tokenizer: str  # bert-base-uncased tokenizer directory


class PreferenceScorers(Section):
    """The COCO-5K columns; a scorer left out is not computed (at least one is needed)."""

    imagereward: ImageRewardPaths | None = None
    mps: MPSPaths | None = None
    hpsv2: HPSv2Paths | None = None
    facescore: FaceScorePaths | None = None
    dtype: Dtype = "float32"

    @model_validator(mode="after")
    def _any(self):
        if not self.names():
            raise ValueError("configure at least one of imagereward, mps, hpsv2, facescore")
        return self

    def names(self) -> list[str]:
        return [n for n in ("imagereward", "mps", "hpsv2", "facescore") if getattr(self, n) is not None]


class CocoEvalConfig(Section):
    captions: str  # COCO's captions_val2017.json (first caption of each image) or a .txt/.jsonl/.parquet prompt file
    limit: int | None = Field(None, ge=1)  # the first N captions (by image id)
    images: str  # `<images>/images/<id>.png` + metadata.jsonl when `generator` is set; else scored as found
    generator: str | None = None  # a LaytonGen directory
    sampling: SamplingConfig = SamplingConfig()
    seed: int = 0
    scorers: PreferenceScorers
    batch_size: int = Field(8, ge=1)
    resources: Resources = Resources()  # per actor, for generation and scoring alike
    output: str
    ray: RayConfig = RayConfig()

    def with_absolute_paths(self) -> CocoEvalConfig:
        """Ray workers do not run in the driver's directory: local paths are made absolute."""
        sc = self.scorers
        scorers = {n: getattr(sc, n).model_copy(update={k: _absolute(v) for k, v in getattr(sc, n).model_dump().items()})
                   for n in sc.names()}
        return self.model_copy(update={
            "captions": _absolute(self.captions), "images": _resolved(self.images), "generator": _absolute(self.generator),
            "scorers": sc.model_copy(update=scorers), "output": _resolved(self.output),
        })


def _resolved(p: str | None) -> str | None:
    """An output path (it may not exist yet) made absolute."""
    return str(Path(p).resolve()) if p is not None else None


def _absolute(p: str | None) -> str | None:
    """A local path made absolute; None and hub ids (no such local path) stay as they are."""
    return str(Path(p).resolve()) if p is not None and Path(p).exists() else p


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
