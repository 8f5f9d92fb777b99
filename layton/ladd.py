"""LADD, the latent diffusion decoder of Layton: a frozen SDXL UNet steered by token features.

    eps = UNet(z_t, t; residuals = ZeroConv(ControlNet(z_t + E(tokens), t)))

The trainable part is a ControlNet-style copy of the UNet's input stem, down and mid blocks
(diffusers `ControlNetModel.from_unet`, whose per-block outputs are zero-initialised 1x1 convs)
plus `TokenConditionEmbedder`, which lifts the token grid (14², 16² or 18² codebook vectors) onto
the latent grid (64² at 512 px, 128² at 1024 px) and ends in a zero-initialised conv. Both zeros
together make LADD's output at initialisation exactly the frozen UNet's output.

SDXL's text conditions are fixed: the embeddings of the empty prompt (both text encoders) are
computed once from the SDXL release and stored with every checkpoint, so decoding never loads the
text encoders. The size conditions (`time_ids`) follow the decoded resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TRAINABLE_PREFIXES = ("controlnet.", "cond_embedder.")


class TokenConditionEmbedder(nn.Module):
    """Token features (B, C, h, w) -> a residual (B, out, H, W) on the latent grid.

    Each stage doubles the grid (nearest + conv); a final resize lands exactly on the latent grid,
    so any token grid (14/16/18) maps onto any latent grid (64/128).
    """

    def __init__(self, in_channels: int, channels: list[int], out_channels: int):
        super().__init__()
        self.config = {"in_channels": in_channels, "channels": list(channels), "out_channels": out_channels}
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1), nn.SiLU())
            for c_in, c_out in zip([channels[0], *channels[:-1]], channels)
        )
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = F.silu(self.conv_in(tokens))
        for block in self.blocks:
            x = block(x)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
        return self.conv_out(x)


def controlnet_from_unet(unet):
    """The trainable copy: ControlNet initialised from `unet`, its pixel-space embedder removed."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16,))
    controlnet.controlnet_cond_embedding = nn.Identity()  # the token embedder takes its place
    return controlnet


def controlnet_from_config(config: dict):
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_config(config)
    controlnet.controlnet_cond_embedding = nn.Identity()
    return controlnet


class LADD(nn.Module):
    def __init__(self, unet, controlnet, cond_embedder: TokenConditionEmbedder, prompt_embeds, pooled_prompt_embeds):
        super().__init__()
        self.unet = unet
        self.unet.requires_grad_(False)
        self.controlnet = controlnet
        self.cond_embedder = cond_embedder
        self.register_buffer("prompt_embeds", prompt_embeds.detach().clone(), persistent=False)
        self.register_buffer("pooled_prompt_embeds", pooled_prompt_embeds.detach().clone(), persistent=False)

    @classmethod
    def from_unet(cls, unet, token_channels: int, embedder_channels: list[int], prompt_embeds, pooled_prompt_embeds) -> LADD:
        embedder = TokenConditionEmbedder(token_channels, embedder_channels, unet.config.block_out_channels[0])
        return cls(unet, controlnet_from_unet(unet), embedder, prompt_embeds, pooled_prompt_embeds)

    def train(self, mode: bool = True) -> LADD:
        super().train(mode)
        self.unet.eval()  # frozen: no dropout, whatever the trainable part does
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.controlnet.parameters(), *self.cond_embedder.parameters()]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(TRAINABLE_PREFIXES)}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise KeyError(f"LADD weights do not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        self.load_state_dict(state, strict=False)

    def enable_gradient_checkpointing(self) -> None:
        self.controlnet.enable_gradient_checkpointing()
        self.unet.enable_gradient_checkpointing()  # activations of the frozen UNet still carry the gradient

    def _conditions(self, batch: int, height_px: int, width_px: int, dtype: torch.dtype):
        hidden = self.prompt_embeds.to(dtype).expand(batch, -1, -1)
        # SDXL size conditioning: original size, crop top-left, target size.
        time_ids = torch.tensor([height_px, width_px, 0, 0, height_px, width_px], device=hidden.device, dtype=dtype)
        added = {"text_embeds": self.pooled_prompt_embeds.to(dtype).expand(batch, -1), "time_ids": time_ids.expand(batch, -1)}
        return hidden, added

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, token_features: torch.Tensor, vae_scale: int = 8) -> torch.Tensor:
        """Predicted noise for latents `z_t` at timesteps `t`, conditioned on token features."""
        b, _, h, w = z_t.shape
        hidden, added = self._conditions(b, h * vae_scale, w * vae_scale, z_t.dtype)
        cond = self.cond_embedder(token_features.to(z_t.dtype), (h, w))
        down, mid = self.controlnet(z_t, t, hidden, controlnet_cond=cond, added_cond_kwargs=added, return_dict=False)
        return self.unet(
            z_t, t, hidden, added_cond_kwargs=added,
            down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False,
        )[0]

    def unet_forward(self, z_t: torch.Tensor, t: torch.Tensor, vae_scale: int = 8) -> torch.Tensor:
        """The frozen UNet alone, with the same fixed conditions (the zero-conv invariant's reference)."""
        b, _, h, w = z_t.shape
        hidden, added = self._conditions(b, h * vae_scale, w * vae_scale, z_t.dtype)
        return self.unet(z_t, t, hidden, added_cond_kwargs=added, return_dict=False)[0]


def empty_prompt_conditions(sdxl_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's embeddings of "" from the release's two text encoders (computed once, then stored)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, unet=None, vae=None)
    with torch.no_grad():
        prompt_embeds, _, pooled, _ = pipe.encode_prompt("", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    return prompt_embeds.float(), pooled.float()
