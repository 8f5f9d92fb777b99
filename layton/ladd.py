"""LADD, the latent diffusion decoder of Layton: a frozen SDXL UNet steered by token features.

    eps = UNet(z_t, t; residuals = ZeroConv(ControlNet(z_t + E(tokens), t)))

The trainable part is a ControlNet-style copy of the UNet's input stem, down and mid blocks
(`LaddControlNet`: diffusers `ControlNetModel.from_unet`, whose per-block outputs are zero-initialised
1x1 convs, without its pixel-space condition embedder) plus `TokenConditionEmbedder`, which lifts the
token grid (14², 16² or 18² codebook vectors) onto the latent grid (64² at 512 px, 128² at 1024 px)
and ends in a zero-initialised conv. Both zeros together make LADD's output at initialisation exactly
the frozen UNet's output.

SDXL's text conditions are fixed: the embeddings of the empty prompt (both text encoders) are
computed once from the SDXL release and stored with every checkpoint (`EmptyPromptConditions`), so
decoding never loads the text encoders. The size conditions (`time_ids`) follow the decoded resolution.

Saved form. Each part LADD holds is a diffusers `ModelMixin` + `ConfigMixin` with its own subfolder
(`save_pretrained`: config.json + diffusion_pytorch_model.safetensors, safetensors only):

    controlnet/      LaddControlNet           trained
    embedder/        TokenConditionEmbedder   trained
    empty_prompt/    EmptyPromptConditions    fixed, computed from the SDXL release

LADD itself is the composite that joins them to the frozen UNet. Like diffusers' `MultiControlNetModel`
it has no weights file or config of its own: its `save_pretrained` writes the parts above, never the
UNet, and `LADD.from_pretrained(dir, unet=...)` joins the UNet the caller loaded (the tokenizer directory
names the SDXL release and consistency LoRA it comes from).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ControlNetModel, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from layton.model_files import ModelFileError

TRAINABLE_PREFIXES = ("controlnet.", "cond_embedder.")


class TokenConditionEmbedder(ModelMixin, ConfigMixin):
    """Token features (B, C, h, w) -> a residual (B, out, H, W) on the latent grid.

    Each stage doubles the grid (nearest + conv); a final resize lands exactly on the latent grid,
    so any token grid (14/16/18) maps onto any latent grid (64/128).
    """

    @register_to_config
    def __init__(self, in_channels: int, channels: list[int], out_channels: int):
        super().__init__()
        channels = list(channels)
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


class LaddControlNet(ControlNetModel):
    """The trainable copy: a diffusers ControlNet whose pixel-space condition embedder is removed
    (the token embedder takes its place), so its saved weights are only what training changes."""

    # The signature is ControlNetModel's (wraps), so ConfigMixin reads and writes the same config.
    @functools.wraps(ControlNetModel.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.controlnet_cond_embedding = nn.Identity()


class EmptyPromptConditions(ModelMixin, ConfigMixin):
    """SDXL's embeddings of "": the cross-attention states and the pooled text embedding (fixed buffers)."""

    @register_to_config
    def __init__(self, sequence_length: int = 77, hidden_size: int = 2048, pooled_size: int = 1280):
        super().__init__()
        self.register_buffer("prompt_embeds", torch.zeros(1, sequence_length, hidden_size))
        self.register_buffer("pooled_prompt_embeds", torch.zeros(1, pooled_size))

    @classmethod
    def from_tensors(cls, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor) -> EmptyPromptConditions:
        out = cls(sequence_length=prompt_embeds.shape[1], hidden_size=prompt_embeds.shape[2], pooled_size=pooled_prompt_embeds.shape[1])
        out.prompt_embeds.copy_(prompt_embeds.detach().reshape(out.prompt_embeds.shape))
        out.pooled_prompt_embeds.copy_(pooled_prompt_embeds.detach().reshape(out.pooled_prompt_embeds.shape))
        return out


def controlnet_from_unet(unet) -> LaddControlNet:
    """The trainable copy initialised from `unet` (its unused pixel embedder built at the smallest size)."""
    return LaddControlNet.from_unet(unet, conditioning_embedding_out_channels=(16,))


# Subfolder -> (LADD attribute, class): the parts LADD saves, in the order they are written.
PARTS = {
    "controlnet": ("controlnet", LaddControlNet),
    "embedder": ("cond_embedder", TokenConditionEmbedder),
    "empty_prompt": ("empty_prompt", EmptyPromptConditions),
}
TRAINABLE_PARTS = ("controlnet", "embedder")


def read_part_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of one saved part (diffusers' single file, or its shards and index)."""
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import load_file


    d = Path(directory)
    if (d / SAFETENSORS_WEIGHTS_NAME).is_file():
        return load_file(d / SAFETENSORS_WEIGHTS_NAME)
    if (d / SAFE_WEIGHTS_INDEX_NAME).is_file():
        shards = sorted(set(json.loads((d / SAFE_WEIGHTS_INDEX_NAME).read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(d / shard).items()}
    raise ModelFileError(f"{d} has no {SAFETENSORS_WEIGHTS_NAME} (nor a sharded index)")


class LADD(ModelMixin):
    def __init__(self, unet, controlnet: LaddControlNet, cond_embedder: TokenConditionEmbedder, empty_prompt: EmptyPromptConditions):
        super().__init__()
        self.unet = unet
        self.unet.requires_grad_(False)
        self.controlnet = controlnet
        self.cond_embedder = cond_embedder
        self.empty_prompt = empty_prompt

    @classmethod
    def from_unet(cls, unet, token_channels: int, embedder_channels: list[int], prompt_embeds, pooled_prompt_embeds) -> LADD:
        """An untrained LADD: the embedder (built first: a fixed order of random draws) and the copy of `unet`."""
        # Keywords: diffusers records positional arguments as defaults, which `from_config` would then drop.
        embedder = TokenConditionEmbedder(in_channels=token_channels, channels=list(embedder_channels),
                                          out_channels=unet.config.block_out_channels[0])
        return cls(unet, controlnet_from_unet(unet), embedder, EmptyPromptConditions.from_tensors(prompt_embeds, pooled_prompt_embeds))

    # --- saved form ----------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, **kwargs) -> Path:
        """Write the parts (`PARTS`) as subfolders of `directory`; the frozen UNet is not written."""
        directory = Path(directory)
        for sub, (attr, _) in PARTS.items():
            getattr(self, attr).save_pretrained(directory / sub, safe_serialization=True, **kwargs)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, unet) -> LADD:
        """The parts saved in `directory` joined to the frozen `unet` (already loaded, LoRA fused); in
        eval mode, as diffusers' `from_pretrained` returns models."""
        directory = Path(directory)
        parts = {attr: klass.from_pretrained(directory / sub, use_safetensors=True, local_files_only=True)
                 for sub, (attr, klass) in PARTS.items()}
        return cls(unet, **parts).eval()

    def load_trained(self, directory: str | Path) -> None:
        """Resume: the trainable parts' weights from a saved directory, into this LADD's modules."""
        directory = Path(directory)
        state = {}
        for sub in TRAINABLE_PARTS:
            attr = PARTS[sub][0]
            state.update({f"{attr}.{k}": v for k, v in read_part_weights(directory / sub).items()})
        self.load_trainable_state_dict(state)

    # --- training ------------------------------------------------------------------------------

    @property
    def prompt_embeds(self) -> torch.Tensor:
        return self.empty_prompt.prompt_embeds

    @property
    def pooled_prompt_embeds(self) -> torch.Tensor:
        return self.empty_prompt.pooled_prompt_embeds

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
