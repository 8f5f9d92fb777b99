"""The tokenizer stages' config: stage 1 (diffusion loss) and stage 2 (consistency + LPIPS) on Ray Train."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from layton.config import Acceleration, LPIPSConfig, OptimConfig, PathStr, RayConfig, Runtime, Section, TrainDataConfig, TrainRunConfig
from layton.storage import join


class TokenizerModelConfig(Section):
    vq: PathStr  # LlamaGen VQ-16 checkpoint (`{"model": state_dict}` .pt)
    sdxl: PathStr  # SDXL pipeline directory: unet/, vae/, scheduler/, text encoders (empty-prompt conditions)
    vae: PathStr | None = None  # an AutoencoderKL directory (e.g. the fp16-fix VAE); default: sdxl/vae
    encoder_sizes: list[int] = Field(default_factory=lambda: [224, 256, 288], min_length=1)
    inference_encoder_size: int = 256  # 256 px -> 16x16 = 256 tokens
    embedder_channels: list[int] = Field(default_factory=lambda: [512, 256, 128], min_length=1)  # one x2 upsampling each

    @model_validator(mode="after")
    def _sizes(self):
        for s in [*self.encoder_sizes, self.inference_encoder_size]:
            if s % 16:
                raise ValueError(f"encoder size {s} must be a multiple of 16 (the VQ downsamples 16x)")
        return self


class ConsistencyConfig(Section):
    kind: Literal["hypersd", "tlcm"]  # Hyper-SD: 1 step; TLCM: 2 steps
    lora: PathStr  # the LoRA .safetensors, fused into the frozen UNet
    lora_scale: float = 1.0
    timesteps: list[int] | None = None  # default: [999] (hypersd), [999, 499] (tlcm)

    def resolved_timesteps(self) -> list[int]:
        return self.timesteps or ([999] if self.kind == "hypersd" else [999, 499])


class StageConfig(Section):
    max_steps: int = Field(ge=1)
    batch_size: int = Field(4, ge=1)  # per worker
    # (from step, image px): progressive resolution; the paper trains 512 then 1024.
    resolution_schedule: list[tuple[int, int]] = Field(default_factory=lambda: [(0, 512), (40000, 1024)], min_length=1)
    optim: OptimConfig = OptimConfig()
    checkpoint_every: Runtime[int] = Field(1000, ge=1)
    log_every: Runtime[int] = Field(10, ge=1)
    image_every: Runtime[int] = Field(1000, ge=1)  # reconstruction grid
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast on CUDA; CPU runs float32
    gradient_checkpointing: Runtime[bool] = False
    # attention, torch.compile of the UNet and ControlNet copy, channels_last, VAE slicing/tiling
    accel: Runtime[Acceleration] = Acceleration()

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
    init_from: PathStr | None = None  # stage-1 tokenizer directory; default: the stage-1 run's export


class TokenizerDataConfig(TrainDataConfig):
    shards: list[PathStr] = Field(min_length=1)  # synthesis output directories (complete shards are read)
    precompute: bool = True  # encode tokens + VAE latents once (Ray Data) instead of every step
    precompute_dir: Runtime[PathStr | None] = None  # default: <storage_path>/<name>-precompute
    num_actors: Runtime[int] = Field(1, ge=1)  # precompute actors
    num_gpus: Runtime[float] = Field(0.0, ge=0)  # per precompute actor


class TokenizerTrainConfig(Section):
    model: TokenizerModelConfig
    data: TokenizerDataConfig
    run: TrainRunConfig
    stage1: StageConfig
    stage2: Stage2Config
    ray: Runtime[RayConfig] = RayConfig()

    def stage(self, n: int) -> StageConfig:
        return self.stage1 if n == 1 else self.stage2

    def stage_dir(self, n: int) -> str:
        """Stage n's Ray Train run directory (a local path or a URI); its export is `tokenizer/` inside."""
        return join(self.run.storage_path, f"{self.run.name}-stage{n}")

    def export_dir(self, n: int) -> str:
        return join(self.stage_dir(n), "tokenizer")

    def precompute_path(self) -> str:
        return self.data.precompute_dir or join(self.run.storage_path, f"{self.run.name}-precompute")

    def resolutions(self) -> list[int]:
        return sorted({px for st in (self.stage1, self.stage2) for _, px in st.resolution_schedule})
