"""LADD: the zero-conv invariant, the token embedder's grids, trainable/frozen split, samplers."""

from __future__ import annotations

import pytest
import torch

from layton.ladd import LADD, TokenConditionEmbedder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def unet():
    from layton.zoo.sdxl import build_tiny_sdxl

    return build_tiny_sdxl(seed=0).unet


def _ladd(unet) -> LADD:
    torch.manual_seed(0)
    prompt = torch.randn(1, 77, unet.config.cross_attention_dim)
    pooled = torch.randn(1, unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim)
    return LADD.from_unet(unet, token_channels=8, embedder_channels=[32, 16], prompt_embeds=prompt, pooled_prompt_embeds=pooled).eval()


def test_output_equals_frozen_unet_at_initialisation(unet):
    ladd = _ladd(unet)
    z = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 900])
    feats = torch.nn.functional.normalize(torch.randn(2, 8, 16, 16), dim=1)
    with torch.no_grad():
        ref = ladd.unet_forward(z, t)
        out = ladd(z, t, feats)
        # The trainable copy's inner weights do not matter while the zero convs are zero.
        for p in ladd.controlnet.down_blocks.parameters():
            p.add_(0.1)
        out_perturbed = ladd(z, t, feats)
    assert torch.equal(out, ref)
    assert torch.equal(out_perturbed, ref)
    # ...and once a zero conv learns something, the output moves: the test can fail.
    with torch.no_grad():
        ladd.controlnet.controlnet_mid_block.weight.fill_(0.01)
        assert not torch.allclose(ladd(z, t, feats), ref)


def test_controlnet_copies_the_unet_and_only_it_trains(unet):
    ladd = _ladd(unet)
    assert torch.equal(ladd.controlnet.conv_in.weight, unet.conv_in.weight)
    assert torch.equal(ladd.controlnet.down_blocks[1].attentions[0].proj_in.weight, unet.down_blocks[1].attentions[0].proj_in.weight)
    assert all(not p.requires_grad for p in ladd.unet.parameters())
    trainable = {id(p) for p in ladd.trainable_parameters()}
    assert trainable.isdisjoint({id(p) for p in ladd.unet.parameters()})
    assert set(ladd.trainable_state_dict()) == {k for k in ladd.state_dict() if not k.startswith("unet.")}
    # Gradients reach the trainable part (through the zero convs) and nothing frozen.
    z, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    ladd.train()
    ladd(z, t, torch.randn(1, 8, 16, 16)).square().mean().backward()
    assert ladd.controlnet.controlnet_mid_block.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in ladd.unet.parameters())
    assert not ladd.unet.training


@pytest.mark.parametrize("grid", [14, 16, 18])
@pytest.mark.parametrize("latent", [16, 64, 128])
def test_embedder_maps_any_token_grid_onto_the_latent_grid(grid, latent):
    emb = TokenConditionEmbedder(8, [16, 8, 8], 32)
    out = emb(torch.randn(2, 8, grid, grid), (latent, latent))
    assert out.shape == (2, 32, latent, latent)
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv


def test_load_trainable_state_dict_refuses_mismatch(unet):
    ladd = _ladd(unet)
    state = ladd.trainable_state_dict()
    state.pop(next(iter(state)))
    with pytest.raises(KeyError, match="missing"):
        ladd.load_trainable_state_dict(state)
