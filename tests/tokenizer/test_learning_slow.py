"""Training improves reconstructions of real photographs (tiny models; slow)."""

from __future__ import annotations

import math

import pytest
import torch

from stages.tokenizer.config import TokenizerTrainConfig
from tests.tokenizer.conftest import PHOTOS, photo, tokenizer_config_dict

pytestmark = pytest.mark.slow

PX = 64


def _psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    mse = ((x - y) / 2).square().mean().item()  # [-1, 1] -> [0, 1]
    return 10 * math.log10(1 / mse)


def _quality(tok, lpips) -> tuple[float, float]:
    """Mean LPIPS and PSNR of the 1-step reconstructions of the training photographs at PX px."""
    from layton.tokenizer import images_to_tensor

    images = [photo(n) for n in PHOTOS]
    target = images_to_tensor(images, PX)
    with torch.no_grad():
        recon = tok.decode_tensor(tok.encode(images), size=PX, seed=0)
        return lpips(recon, target).mean().item(), _psnr(recon, target)


def fit_vae(sdxl_dir, out_dir, steps: int = 300):
    """The tiny SDXL VAE, fitted to the photographs: a random VAE cannot reconstruct anything (its
    round trip is worse than a grey image), which would hide what LADD learns. The real SDXL VAE
    reconstructs well; this stands in for it, through `model.vae` as the fp16-fix VAE would."""
    from diffusers import AutoencoderKL

    from layton.tokenizer import images_to_tensor

    photos = images_to_tensor([photo(n) for n in PHOTOS], 2 * PX)
    vae = AutoencoderKL.from_pretrained(sdxl_dir, subfolder="vae")
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):  # random PX crops of 2*PX photographs
        oy, ox = torch.randint(0, PX + 1, (2,), generator=gen).tolist()
        x = photos[torch.randint(0, len(PHOTOS), (8,), generator=gen)][:, :, oy:oy + PX, ox:ox + PX]
        post = vae.encode(x).latent_dist
        loss = (vae.decode(post.sample(generator=gen)).sample - x).square().mean() + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # unit-variance latents, as SDXL's scaling factor gives its VAE
        std = vae.encode(images_to_tensor([photo(n) for n in PHOTOS], PX)).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(out_dir)
    return out_dir


def test_stage1_then_stage2_improve_reconstruction(tiny_zoo, ray_local, photo_shards, tmp_path):
    from layton.perceptual import build_lpips
    from layton.tokenizer import LaytonTokenizer
    from workflows.train_tokenizer import run_tokenizer_stage

    torch.set_num_threads(1)  # tiny models: a second thread only adds waiting
    vae = fit_vae(tiny_zoo / "sdxl", tmp_path / "vae")
    cfg = tokenizer_config_dict(
        tiny_zoo, photo_shards, tmp_path / "runs",
        model__vae=str(vae), data__cache_in_memory=True,
        stage1__max_steps=200, stage1__batch_size=3, stage1__resolution_schedule=[[0, PX]],
        stage1__optim__lr=5e-4, stage1__checkpoint_every=200, stage1__image_every=200, stage1__log_every=50,
        stage2__max_steps=150, stage2__batch_size=3, stage2__resolution_schedule=[[0, PX]],
        stage2__optim__lr=5e-4, stage2__checkpoint_every=150, stage2__image_every=150, stage2__log_every=50,
    )
    config = TokenizerTrainConfig.model_validate(cfg)
    lpips = build_lpips(config.stage2.lpips.net, config.stage2.lpips.backbone)

    untrained = LaytonTokenizer.build(config.model)
    untrained.fuse_consistency(config.stage2.consistency)
    before = _quality(untrained, lpips)

    run_tokenizer_stage(config, 1)
    after_stage1 = LaytonTokenizer.from_pretrained(tmp_path / "runs" / "tokenizer-stage1" / "tokenizer")
    after_stage1.fuse_consistency(config.stage2.consistency)
    mid = _quality(after_stage1, lpips)
    run_tokenizer_stage(config, 2)
    trained = LaytonTokenizer.from_pretrained(tmp_path / "runs" / "tokenizer-stage2" / "tokenizer")
    after = _quality(trained, lpips)
    print(f"LPIPS / PSNR: untrained {before}, after stage 1 {mid}, after stage 2 {after}")
    # The frozen tiny UNet is random and the tiny VAE barely fitted, so the reachable gain is small;
    # measured: LPIPS 0.156 -> 0.134, PSNR 8.85 -> 9.29 dB. Stage 2 optimises LPIPS directly.
    assert after[0] < 0.92 * before[0]
    assert after[1] > before[1] + 0.2
