"""The tiny SDXL base pipeline: release layout, offline loading, SDXL's conditioning arithmetic."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from layton.zoo.sdxl import write_tiny_sdxl


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="module")
def pipe(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tensors(directory):
    files = sorted(directory.rglob("*.safetensors"))
    return {f"{p.parent.name}/{k}": v for p in files for k, v in load_file(p).items()}


def _time_ids(batch: int, px: int = 128) -> torch.Tensor:
    # (original size, crop top-left, target size), as StableDiffusionXLPipeline._get_add_time_ids
    return torch.tensor([[px, px, 0, 0, px, px]] * batch, dtype=torch.float32)


def test_release_layout(sdxl_dir):
    index = json.loads((sdxl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    assert index["force_zeros_for_empty_prompt"] is True
    for name in ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]:
        assert (sdxl_dir / name).is_dir(), name
    assert not list(sdxl_dir.rglob("*.bin")), "weights must be safetensors"
    for tok in ["tokenizer", "tokenizer_2"]:  # vocab + merges, no tokenizer.json, as the release
        assert {p.name for p in (sdxl_dir / tok).iterdir()} >= {"vocab.json", "merges.txt"}
        assert not (sdxl_dir / tok / "tokenizer.json").exists()

    scheduler = json.loads((sdxl_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EulerDiscreteScheduler"
    expected = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                    steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")  # fmt: skip
    assert {k: scheduler[k] for k in expected} == expected

    vae = json.loads((sdxl_dir / "vae" / "config.json").read_text())
    assert (vae["latent_channels"], vae["scaling_factor"], len(vae["block_out_channels"])) == (4, 0.13025, 4)

    unet = json.loads((sdxl_dir / "unet" / "config.json").read_text())
    te = json.loads((sdxl_dir / "text_encoder" / "config.json").read_text())
    te2 = json.loads((sdxl_dir / "text_encoder_2" / "config.json").read_text())
    assert unet["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet["up_block_types"] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert unet["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    assert unet["addition_embed_type"] == "text_time" and unet["use_linear_projection"]
    assert (unet["in_channels"], unet["out_channels"]) == (4, 4)
    assert unet["cross_attention_dim"] == te["hidden_size"] + te2["hidden_size"]
    assert unet["projection_class_embeddings_input_dim"] == te2["projection_dim"] + 6 * unet["addition_time_embed_dim"]


def test_writing_is_seeded(sdxl_dir, tmp_path):
    same = _tensors(write_tiny_sdxl(tmp_path / "same", seed=0))
    other = _tensors(write_tiny_sdxl(tmp_path / "other", seed=1))
    ref = _tensors(sdxl_dir)
    assert same.keys() == ref.keys()
    assert all(torch.equal(same[k], ref[k]) for k in ref)
    assert any(not torch.equal(other[k], ref[k]) for k in ref)


def test_tokenizers_offline(pipe):
    ids = pipe.tokenizer("A photo of a Cat, 42!", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == pipe.tokenizer.bos_token_id
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat , 4 2 !"
    # Same vocabulary, but the release's tokenizer_2 pads with "!" (OpenCLIP pads with token 0)
    # where tokenizer pads with <|endoftext|>.
    text = "A photo of a Cat, 42"
    ids = pipe.tokenizer(text, padding="max_length", max_length=77).input_ids
    ids_2 = pipe.tokenizer_2(text, padding="max_length", max_length=77).input_ids
    n = ids.index(pipe.tokenizer.eos_token_id) + 1
    assert ids_2[:n] == ids[:n]
    assert set(ids[n:]) == {pipe.tokenizer.eos_token_id}
    assert set(ids_2[n:]) == {pipe.tokenizer_2.convert_tokens_to_ids("!")} != {pipe.tokenizer.eos_token_id}


def test_empty_prompt_conditions(pipe):
    """encode_prompt("") gives what LADD stores: both encoders' penultimate states and the pooled text."""
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            "", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    assert neg is None and neg_pooled is None
    assert embeds.shape == (1, 77, pipe.unet.config.cross_attention_dim)
    assert pooled.shape == (1, pipe.text_encoder_2.config.projection_dim)

    # independently: SDXL concatenates hidden_states[-2] of both encoders; pooled is text_encoder_2's
    # projected <|endoftext|> state
    with torch.no_grad():
        parts = []
        for tok, enc in [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]:
            ids = tok("", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            out = enc(ids, output_hidden_states=True)
            parts.append(out.hidden_states[-2])
        assert torch.allclose(embeds, torch.cat(parts, dim=-1))
        assert torch.allclose(pooled, out.text_embeds)


def test_unet_forward_with_added_conditions(pipe):
    unet = pipe.unet
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt("", device="cpu", do_classifier_free_guidance=False)
        z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([999, 500])
        added = {"text_embeds": pooled.repeat(2, 1), "time_ids": _time_ids(2)}
        eps = unet(z, t, encoder_hidden_states=embeds.repeat(2, 1, 1), added_cond_kwargs=added).sample
        assert eps.shape == z.shape and torch.isfinite(eps).all()
        # the size conditioning is live: other time ids, other prediction
        added_1024 = {"text_embeds": pooled.repeat(2, 1), "time_ids": _time_ids(2, px=1024)}
        eps_1024 = unet(z, t, encoder_hidden_states=embeds.repeat(2, 1, 1), added_cond_kwargs=added_1024).sample
        assert (eps - eps_1024).abs().max() > 1e-4

        image = pipe.vae.decode(z[:1] / pipe.vae.config.scaling_factor).sample
        assert image.shape == (1, 3, 128, 128) and torch.isfinite(image).all()


def test_pipeline_generates(pipe):
    gen = dict(height=128, width=128, num_inference_steps=2, guidance_scale=5.0, output_type="np")
    images = pipe("a red cat", generator=torch.Generator().manual_seed(1), **gen).images
    assert images.shape == (1, 128, 128, 3) and np.isfinite(images).all()
    again = pipe("a red cat", generator=torch.Generator().manual_seed(1), **gen).images
    np.testing.assert_array_equal(images, again)
