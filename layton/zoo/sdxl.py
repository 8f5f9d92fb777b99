"""Tiny SDXL base 1.0: the real diffusers `StableDiffusionXLPipeline` classes with small configs.

LADD decodes Layton tokens with the frozen SDXL UNet and VAE and conditions it on SDXL's fixed
empty-prompt embeddings, so the tiny zoo needs an SDXL that loads, encodes "" and denoises exactly
as the real one does. `write_tiny_sdxl(dir)` writes a pipeline directory in the release layout of
stabilityai/stable-diffusion-xl-base-1.0 (model_index.json, unet/, vae/, text_encoder/,
text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/; safetensors), which
`StableDiffusionXLPipeline.from_pretrained(dir)` loads as it loads the release. Only sizes differ:

    component        real SDXL base 1.0                       tiny
    unet             (320, 640, 1280), 2 layers per block,    (32, 32, 64), 1 layer per block,
                     transformer depth (1, 2, 10), heads      transformer depth (1, 1, 1), heads
                     (5, 10, 20) x 64, cross-attn dim 2048    (2, 2, 4) x 16, cross-attn dim 96
    added conds      pooled 1280 + 6 x 256 time ids = 2816    pooled 32 + 6 x 8 time ids = 80
    vae              (128, 256, 512, 512), 2 layers/level,    (16, 16, 32, 32), 1 layer/level,
                     GroupNorm(32), 4 latent channels         GroupNorm(8), 4 latent channels
    text_encoder     CLIP ViT-L text (768, 12 layers)         CLIP text (32, 2 layers)
    text_encoder_2   OpenCLIP bigG text (1280, 32 layers,     CLIP text (64, 2 layers,
                     projection 1280)                         projection 32)

The tiny sizes are set by speed, not parameter count: at a 16x16 latent the cost is per-module
overhead, so depth is cut first. One UNet forward (batch 2) and one VAE decode of a 16x16 latent
take roughly 40-50 ms each on one CPU core.

Kept from the real model because the pipeline's and LADD's arithmetic depend on them: SDXL's block
layout (DownBlock2D + two CrossAttnDownBlock2D, a cross-attention mid block, mirrored up blocks)
with linear projections in the transformers, cross-attention over the concatenated penultimate
hidden states of both text encoders, the "text_time" added conditions (pooled text_encoder_2
embedding + 6 Fourier-embedded size/crop ids), 4 latent channels with 8x VAE downsampling and the
0.13025 scaling factor, CLIP's 77-token window with tokenizer_2 padding with "!", and the
scaled-linear EulerDiscrete scheduler config. A 16x16 latent (128 px) is the natural test size.

`write_tiny_consistency_loras` writes the two few-step LoRAs LADD stage 2 merges into the UNet, each
in its release's own format (see its docstring).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from layton.zoo.text_tokenizers import CLIP_MAX_LENGTH, save_clip_tokenizer_release, train_clip_tokenizer

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (EulerDiscreteScheduler).
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    steps_offset=1,
    timestep_spacing="leading",
)
SDXL_VAE_SCALING_FACTOR = 0.13025
LORA_RANK = 4
# Modules the tiny consistency LoRAs adapt: TLCM's SDXL target list (LCM-LoRA's, from diffusers'
# train_lcm_distill_lora_sdxl.py): attention and feed-forward projections, the transformers' in/out
# projections, resnet convolutions and time projections, and the down/upsampling convolutions.
LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)  # fmt: skip
LORA_STD = 0.05  # small factors: the merged update is a perturbation, not a new model

HYPERSD_FILE = "Hyper-SDXL-1step-lora.safetensors"  # ByteDance/Hyper-SD release name
TLCM_DIR = "TLCM-SDXL-lora"  # a PEFT adapter directory, as AIGCer-OPPO/TLCM lora_model/ (hub)


def build_tiny_sdxl(seed: int = 0):
    """The tiny StableDiffusionXLPipeline in memory (CPU, float32). Same seed -> identical weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = train_clip_tokenizer()
    tokenizer_2 = train_clip_tokenizer()
    # The release's tokenizer_2 pads with "!" (OpenCLIP pads with token 0), a special token there, so
    # a "!" in a prompt is split off before BPE; add_special_tokens does the same here.
    tokenizer_2.add_special_tokens({"pad_token": "!"})

    def clip_config(hidden: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            projection_dim=32,
            num_hidden_layers=2,  # SDXL reads hidden_states[-2], the output of layer 1
            num_attention_heads=2,
            max_position_embeddings=CLIP_MAX_LENGTH,
            hidden_act=act,
            # pooled output = hidden state at the first <|endoftext|>
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    addition_time_embed_dim = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(clip_config(32, "quick_gelu"))  # CLIP ViT-L uses quick_gelu
        torch.manual_seed(seed + 1)
        text_encoder_2 = CLIPTextModelWithProjection(clip_config(64, "gelu"))  # OpenCLIP bigG uses gelu
        torch.manual_seed(seed + 2)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            transformer_layers_per_block=(1, 1, 1),
            attention_head_dim=(2, 2, 4),  # diffusers' SDXL config stores head counts here
            norm_num_groups=32,
            cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim,
            projection_class_embeddings_input_dim=text_encoder_2.config.projection_dim + 6 * addition_time_embed_dim,
        )
        torch.manual_seed(seed + 3)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,  # four levels -> 8x downsampling
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=128,
            scaling_factor=SDXL_VAE_SCALING_FACTOR,
            force_upcast=True,  # as the release (its fp16-fix variant sets False)
        )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def write_tiny_sdxl(out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny SDXL base pipeline to `out_dir` (safetensors) and return the directory."""
    out_dir = Path(out_dir)
    pipe = build_tiny_sdxl(seed)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # The SDXL release ships vocab.json + merges.txt and no tokenizer.json for both tokenizers.
    save_clip_tokenizer_release(pipe.tokenizer, out_dir / "tokenizer", with_tokenizer_json=False)
    save_clip_tokenizer_release(pipe.tokenizer_2, out_dir / "tokenizer_2", with_tokenizer_json=False)
    return out_dir


def _lora_targets(unet) -> list[tuple[str, torch.nn.Module]]:
    names = [(n, m) for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return [(n, m) for n, m in names if any(n == t or n.endswith("." + t) for t in LORA_TARGETS)]


def write_tiny_consistency_loras(out_dir: Path, unet, seed: int = 0) -> dict[str, Path]:
    """Seeded rank-4 LoRAs for `unet` in the two release formats LADD stage 2 loads.

    - "hypersd": one kohya-format file under ByteDance/Hyper-SD's SDXL 1-step LoRA name:
      `lora_unet_<diffusers module path with '_'>.{lora_down.weight, lora_up.weight, alpha}`, the
      convention of the LCM/TCD-style SDXL LoRAs that `pipe.load_lora_weights(...)` converts (the
      release file's keys were not inspected here; the loader also accepts peft/diffusers keys).
    - "tlcm": a PEFT adapter directory like TLCM's SDXL release (`PeftModel.save_pretrained` of a
      LoRA-wrapped UNet, loaded there with `PeftModel.load_adapter`): `adapter_model.safetensors`
      with `base_model.model.<module>.lora_{A,B}.weight`, and `adapter_config.json`, which alone
      holds r and lora_alpha. The returned path is the safetensors file; the config stays beside it.

    Both use alpha != rank, so a loader that ignores alpha gets the wrong merge.
    """
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = _lora_targets(unet)

    kohya: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 100)
        for name, module in targets:
            key = "lora_unet_" + name.replace(".", "_")
            if isinstance(module, torch.nn.Conv2d):
                down = (LORA_RANK, module.in_channels, *module.kernel_size)
                up = (module.out_channels, LORA_RANK, 1, 1)
            else:
                down, up = (LORA_RANK, module.in_features), (module.out_features, LORA_RANK)
            kohya[f"{key}.lora_down.weight"] = torch.randn(down) * LORA_STD
            kohya[f"{key}.lora_up.weight"] = torch.randn(up) * LORA_STD
            kohya[f"{key}.alpha"] = torch.tensor(float(LORA_RANK // 2))
    hypersd = out_dir / HYPERSD_FILE
    save_file(kohya, hypersd)

    # TLCM's own recipe: wrap the UNet with peft and save the adapter. The factors are redrawn
    # (peft's default initialisation zeroes lora_B, a no-op adapter).
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK // 2, target_modules=list(LORA_TARGETS))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed + 200)
        peft_unet = get_peft_model(copy.deepcopy(unet), config)
        for name, param in peft_unet.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn_like(param) * LORA_STD)
    tlcm_dir = out_dir / TLCM_DIR
    peft_unet.save_pretrained(str(tlcm_dir), safe_serialization=True)
    (tlcm_dir / "README.md").unlink(missing_ok=True)
    return {"hypersd": hypersd, "tlcm": tlcm_dir / "adapter_model.safetensors"}
