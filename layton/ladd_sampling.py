"""Turning token features into SDXL latents with LADD: many-step DDIM, or 1-2 consistency steps.

Both samplers use diffusers' schedulers built from the SDXL release's scheduler config, so the
noise schedule (scaled-linear betas, 1000 steps) is the one the UNet was trained on. The
consistency sampler is LCM's multistep rule: predict z0 from pure noise at the first timestep,
re-noise it to the next, predict again. In training only the last step carries gradients (the
TLCM recipe: the first of two steps is under stop-gradient).
"""

from __future__ import annotations

import torch


def ddim_latents(ladd, token_features: torch.Tensor, noise: torch.Tensor, scheduler_config: dict, steps: int) -> torch.Tensor:
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config, clip_sample=False)  # latents are not in [-1, 1]
    sched.set_timesteps(steps, device=noise.device)
    z = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = ladd(z, t.expand(z.shape[0]), token_features)
        z = sched.step(eps, t, z, eta=0.0).prev_sample
    return z


def consistency_latents(
    ladd,
    token_features: torch.Tensor,
    noise: torch.Tensor,
    scheduler_config: dict,
    timesteps: list[int],
    generator: torch.Generator | None = None,
    grad_last_only: bool = True,
) -> torch.Tensor:
    """z0 after len(timesteps) consistency steps from `noise`. Differentiable through the last step."""
    from diffusers import LCMScheduler

    sched = LCMScheduler.from_config(scheduler_config, clip_sample=False)
    sched.set_timesteps(timesteps=list(timesteps), device=noise.device)
    z, denoised = noise, noise
    grad = torch.is_grad_enabled()
    n = len(sched.timesteps)
    for i, t in enumerate(sched.timesteps):
        with torch.set_grad_enabled(grad and (i == n - 1 or not grad_last_only)):
            eps = ladd(z, t.expand(z.shape[0]), token_features)
            z, denoised = sched.step(eps, t, z, generator=generator, return_dict=False)
    return denoised
