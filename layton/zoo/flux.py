"""Tiny FLUX.1-dev: the real diffusers `FluxPipeline` classes with small configs and seeded weights.

`write_tiny_flux(dir)` writes a pipeline directory in the release layout of
black-forest-labs/FLUX.1-dev (model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
text_encoder_2/, tokenizer_2/, scheduler/), so `FluxPipeline.from_pretrained(dir)` loads it
exactly as it loads the real weights. Only sizes differ from the real model:

    component        real FLUX.1-dev                      tiny
    transformer      19 double + 38 single blocks,        1 double + 1 single block,
                     24 heads x 128, joint dim 4096       2 heads x 16, joint dim 32
    vae              (128,256,512,512), 16 latent ch.     (8,16,16,16), 16 latent ch.
    text_encoder     CLIP ViT-L text (768, 12 layers)     CLIP text (32, 2 layers)
    text_encoder_2   T5 v1.1 XXL encoder (4096, 24 l.)    T5 v1.1-style encoder (32, 2 layers)

Kept from the real model because the pipeline's arithmetic depends on them: 16 latent channels
packed 2x2 into 64 transformer input channels, 8x VAE downsampling (four VAE levels), the VAE's
scaling/shift factors, guidance embedding (FLUX.1-dev is guidance-distilled), CLIP's 77-token
window, and the dynamic-shift flow-matching scheduler config. Height and width must therefore be
multiples of 16 (8x VAE x 2x2 packing); 64x64 gives a 4x4 grid of 16 image tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from layton.zoo.flan_t5 import tiny_t5_v11_config
from layton.zoo.text_tokenizers import CLIP_MAX_LENGTH, save_clip_tokenizer_release, train_clip_tokenizer, train_t5_tokenizer

# FLUX.1-dev's scheduler/scheduler_config.json values (dynamic shifting by image sequence length).
FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def build_tiny_flux(seed: int = 0):
    """The tiny FluxPipeline in memory (CPU, float32). Same seed -> identical weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel

    tokenizer = train_clip_tokenizer()
    tokenizer_2 = train_t5_tokenizer()

    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                projection_dim=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=CLIP_MAX_LENGTH,
                hidden_act="quick_gelu",
                # pooled output = hidden state at the first <|endoftext|>, as in CLIP ViT-L
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        torch.manual_seed(seed + 1)
        text_encoder_2 = T5EncoderModel(  # T5 v1.1, as FLUX's t5-v1_1-xxl
            tiny_t5_v11_config(tokenizer_2, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                               relative_attention_num_buckets=8, relative_attention_max_distance=32)
        )
        torch.manual_seed(seed + 2)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 VAE latent channels x (2x2 packed patch)
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=text_encoder_2.config.d_model,  # T5 token features
            pooled_projection_dim=text_encoder.config.hidden_size,  # CLIP pooled output
            guidance_embeds=True,  # FLUX.1-dev takes guidance as an input
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, like (16, 56, 56) -> 128
        )
        torch.manual_seed(seed + 3)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,  # four levels -> 8x downsampling
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
    return pipe


def write_tiny_flux(out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny FLUX.1-dev pipeline to `out_dir` (safetensors) and return the directory."""
    out_dir = Path(out_dir)
    pipe = build_tiny_flux(seed)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    save_clip_tokenizer_release(pipe.tokenizer, out_dir / "tokenizer", with_tokenizer_json=False)
    return out_dir
