"""The tiny FLUX.1-dev pipeline: release layout, offline loading, seeded generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from layton.zoo.flux import write_tiny_flux

PROMPTS = ["a red cat sitting on a wooden table", "A castle on a mountain at sunset, 4k"]
GEN = dict(
    height=64, width=64, num_inference_steps=2, guidance_scale=3.5, output_type="np", max_sequence_length=64
)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return write_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux", seed=0)


@pytest.fixture(scope="module")
def pipe(flux_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _tensors(directory):
    files = sorted(directory.rglob("*.safetensors"))
    return {f"{p.parent.name}/{k}": v for p in files for k, v in load_file(p).items()}


def test_release_layout(flux_dir):
    index = json.loads((flux_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    for name in ["transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]:
        assert (flux_dir / name).is_dir(), name
    assert not list(flux_dir.rglob("*.bin")), "weights must be safetensors"
    # CLIP tokenizer stored like the release: BPE vocab + merges with the '</w>' word suffix.
    vocab = json.loads((flux_dir / "tokenizer" / "vocab.json").read_text())
    assert "cat</w>" in vocab and vocab["<|endoftext|>"] == len(vocab) - 1
    scheduler = json.loads((flux_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["use_dynamic_shifting"] and scheduler["shift"] == 3.0
    vae = json.loads((flux_dir / "vae" / "config.json").read_text())
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 0.3611, 0.1159)
    transformer = json.loads((flux_dir / "transformer" / "config.json").read_text())
    assert transformer["guidance_embeds"] and transformer["in_channels"] == 64


def test_writing_is_seeded(flux_dir, tmp_path):
    same = _tensors(write_tiny_flux(tmp_path / "same", seed=0))
    other = _tensors(write_tiny_flux(tmp_path / "other", seed=1))
    ref = _tensors(flux_dir)
    assert same.keys() == ref.keys()
    assert all(torch.equal(same[k], ref[k]) for k in ref)
    assert any(not torch.equal(other[k], ref[k]) for k in ref)


def test_tokenizers_offline(pipe):
    clip = pipe.tokenizer("A photo of a Cat, 42!", padding="max_length", max_length=77)
    assert len(clip.input_ids) == 77
    assert clip.input_ids[0] == pipe.tokenizer.bos_token_id
    assert pipe.tokenizer.decode(clip.input_ids, skip_special_tokens=True) == "a photo of a cat , 4 2 !"
    t5 = pipe.tokenizer_2("A photo of a Cat, 42!").input_ids
    assert t5[-1] == pipe.tokenizer_2.eos_token_id == 1 and pipe.tokenizer_2.pad_token_id == 0
    assert pipe.tokenizer_2.unk_token_id not in t5  # upper case and digits are in the alphabet
    assert pipe.tokenizer_2.decode(t5, skip_special_tokens=True) == "A photo of a Cat, 42!"


def test_generation_shape_and_seeds(pipe):
    images = pipe(PROMPTS, generator=[_gen(1), _gen(2)], **GEN).images
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.float32
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert all(im.std() > 0.01 for im in images), "random weights must still give non-constant images"

    again = pipe(PROMPTS, generator=[_gen(1), _gen(2)], **GEN).images
    np.testing.assert_array_equal(images, again)

    reseeded = pipe(PROMPTS, generator=[_gen(3), _gen(4)], **GEN).images
    assert np.abs(reseeded - images).mean() > 0.01


def test_batch_matches_single_runs(pipe):
    """Each image depends only on its prompt and generator, not on its batch mates.

    On CPU the batched run is not bit-identical to single runs (different matmul blocking);
    it agrees to ~1e-6 on the [0, 1] float images.
    """
    batch = pipe(PROMPTS, generator=[_gen(1), _gen(2)], **GEN).images
    for i, (prompt, seed) in enumerate(zip(PROMPTS, [1, 2])):
        single = pipe([prompt], generator=[_gen(seed)], **GEN).images[0]
        np.testing.assert_allclose(batch[i], single, atol=1e-4)
