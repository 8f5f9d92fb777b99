"""LADD: the zero-conv invariant, the token embedder's grids, trainable/frozen split, its saved parts."""

from __future__ import annotations

import pytest
import torch

from layton.ladd import LADD, LaddControlNet, TokenConditionEmbedder

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
    assert set(ladd.trainable_state_dict()) == {k for k in ladd.state_dict() if not k.startswith(("unet.", "empty_prompt."))}
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


def test_saved_parts_are_diffusers_models_without_the_frozen_unet(unet, tmp_path):
    import json

    from safetensors.torch import load_file

    ladd = _ladd(unet)
    with torch.no_grad():  # non-zero residuals, so that the saved weights matter for the output
        ladd.controlnet.controlnet_mid_block.weight.normal_(0, 0.02)
        ladd.cond_embedder.conv_out.weight.normal_(0, 0.02)
    ladd.save_pretrained(tmp_path)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == [f"{sub}/{name}" for sub in ("controlnet", "embedder", "empty_prompt")
                     for name in ("config.json", "diffusion_pytorch_model.safetensors")]
    assert json.loads((tmp_path / "controlnet" / "config.json").read_text())["_class_name"] == "LaddControlNet"
    assert json.loads((tmp_path / "embedder" / "config.json").read_text())["channels"] == [32, 16]
    stored = {f"controlnet.{k}" for k in load_file(tmp_path / "controlnet" / "diffusion_pytorch_model.safetensors")}
    stored |= {f"cond_embedder.{k}" for k in load_file(tmp_path / "embedder" / "diffusion_pytorch_model.safetensors")}
    assert stored == set(ladd.trainable_state_dict())  # what training changes, and no UNet tensor

    # diffusers' own loaders read each part; joined to the same UNet the output is bitwise the same.
    assert isinstance(LaddControlNet.from_pretrained(tmp_path / "controlnet").controlnet_cond_embedding, torch.nn.Identity)
    loaded = LADD.from_pretrained(tmp_path, unet)
    assert loaded.unet is unet and not loaded.training
    z, t, feats = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        ref = ladd(z, t, feats)
        assert not torch.equal(ref, ladd.unet_forward(z, t))
        assert torch.equal(loaded(z, t, feats), ref)
        # Resume: the saved weights go into another LADD's modules in place.
        fresh = _ladd(unet)
        params = fresh.trainable_parameters()
        fresh.load_trained(tmp_path)
        assert all(a is b for a, b in zip(params, fresh.trainable_parameters()))
        assert torch.equal(fresh.eval()(z, t, feats), ref)
