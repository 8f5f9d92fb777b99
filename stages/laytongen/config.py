"""The LaytonGen stage's config: GPT training over the tokenizer's tokens on Ray Train."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from layton.config import Acceleration, OptimConfig, PathStr, RayConfig, Runtime, SamplingConfig, Section, TrainDataConfig, TrainRunConfig
from layton.storage import join


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
    init_from: PathStr | None = None  # a LlamaGen t2i GPT .pt or a LaytonGen directory; default: random init
    text_encoder: PathStr  # flan-t5-xl directory (T5EncoderModel + tokenizer)
    tokenizer: PathStr  # Layton tokenizer directory: its VQ made the training tokens, its decoder draws the samples
    image_size: int = Field(256, ge=16)  # encoder input px: (image_size/16)^2 image tokens

    @model_validator(mode="after")
    def _size(self):
        if self.image_size % 16:
            raise ValueError(f"image_size {self.image_size} must be a multiple of 16 (the VQ downsamples 16x)")
        return self


class GenDataConfig(TrainDataConfig):
    tokens: PathStr  # the tokenizer's precompute directory (key, caption, tokens_<image_size>)
    precompute_dir: Runtime[PathStr | None] = None  # text features; default: <storage_path>/<name>-text
    num_actors: Runtime[int] = Field(1, ge=1)  # text-encoder actors
    num_gpus: Runtime[float] = Field(0.0, ge=0)  # per text-encoder actor


class GenTrainLoop(Section):
    max_steps: int = Field(ge=1)
    batch_size: int = Field(8, ge=1)  # per worker
    optim: OptimConfig = OptimConfig(name="adamw", lr=1e-4, betas=(0.9, 0.99), weight_decay=0.05)
    checkpoint_every: Runtime[int] = Field(1000, ge=1)
    log_every: Runtime[int] = Field(10, ge=1)
    sample_every: Runtime[int] = Field(1000, ge=1)  # a grid of samples for `sample_prompts`
    sample_prompts: Runtime[list[str]] = Field(default_factory=lambda: ["a red fire hydrant in front of a skyscraper",
                                                                        "a photo of a cat sitting on a sofa"])
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"  # autocast on CUDA; CPU runs float32
    accel: Runtime[Acceleration] = Acceleration()  # attention, torch.compile of the GPT's forward


class GenTrainConfig(Section):
    model: GenModelConfig
    data: GenDataConfig
    run: TrainRunConfig
    train: GenTrainLoop
    sampling: SamplingConfig = SamplingConfig()
    ray: Runtime[RayConfig] = RayConfig()

    def job_dir(self) -> str:
        """The Ray Train run directory (a local path or a URI); its export is `laytongen/` inside."""
        return join(self.run.storage_path, self.run.name)

    def export_dir(self) -> str:
        return join(self.job_dir(), "laytongen")

    def text_path(self) -> str:
        return self.data.precompute_dir or join(self.run.storage_path, f"{self.run.name}-text")
