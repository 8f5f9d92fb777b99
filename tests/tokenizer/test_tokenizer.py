"""LaytonTokenizer on the tiny zoo: token grids, decoding, the checkpoint directory, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from layton.model_files import ModelFileError
from layton.tokenizer import INDEX_NAME, LaytonTokenizer
from stages.tokenizer.config import ConsistencyConfig, TokenizerModelConfig
from tests.tokenizer.conftest import ROOT, photo

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_cfg(tiny_zoo) -> TokenizerModelConfig:
    return TokenizerModelConfig(vq=str(tiny_zoo / "llamagen_vq" / "vq_ds16_t2i.pt"), sdxl=str(tiny_zoo / "sdxl"), embedder_channels=[32])


@pytest.fixture(scope="module")
def stage2_dir(model_cfg, tiny_zoo, tmp_path_factory):
    """A stage-2 tokenizer directory (untrained weights, Hyper-SD LoRA fused)."""
    tok = LaytonTokenizer.build(model_cfg)
    with torch.no_grad():  # non-zero residuals, so that the saved weights matter for the output
        tok.ladd.controlnet.controlnet_mid_block.weight.normal_(0, 0.02)
        tok.ladd.cond_embedder.conv_out.weight.normal_(0, 0.02)
    tok.fuse_consistency(ConsistencyConfig(kind="hypersd", lora=str(tiny_zoo / "consistency" / "Hyper-SDXL-1step-lora.safetensors")))
    out = tmp_path_factory.mktemp("tok") / "stage2"
    tok.save_pretrained(out, stage=2)
    return out, tok


@pytest.mark.parametrize("size,grid", [(224, 14), (256, 16), (288, 18)])
def test_encoder_sizes_give_token_grids(model_cfg, size, grid):
    from layton.tokenizer import images_to_tensor

    tok = LaytonTokenizer.build(model_cfg)
    ids = tok.encode([photo("astronaut"), photo("coffee")], encoder_size=size)
    assert ids.shape == (2, grid, grid) and ids.dtype == torch.int64
    assert 0 <= int(ids.min()) and int(ids.max()) < 1024
    # Odd inputs: grayscale, alpha, smaller than the encoder input.
    odd = [Image.fromarray(photo("camera")), Image.fromarray(photo("astronaut")).convert("RGBA"),
           Image.fromarray(photo("coffee")).resize((20, 12))]
    assert images_to_tensor(odd, size).shape == (3, 3, size, size)
    assert tok.encode(odd, encoder_size=size).shape == (3, grid, grid)


def test_stage2_directory_round_trip(stage2_dir):
    out, tok = stage2_dir
    assert sorted(p.name for p in out.iterdir()) == ["controlnet", "embedder", "empty_prompt", INDEX_NAME]
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["_class_name"] == "LaytonTokenizer" and index["format"] == "layton-tokenizer/2"
    assert index["stage"] == 2 and index["consistency"]["kind"] == "hypersd" and index["consistency"]["timesteps"] == [999]
    assert index["controlnet"] == ["layton.ladd", "LaddControlNet"] and index["embedder"] == ["layton.ladd", "TokenConditionEmbedder"]
    loaded = LaytonTokenizer.from_pretrained(out)  # re-fuses the LoRA named in the directory
    ids = tok.encode([photo("chelsea")])
    a = tok.decode_tensor(ids, size=64, seed=3)
    b = loaded.decode_tensor(ids, size=64, seed=3)
    assert a.shape == (1, 3, 64, 64)
    assert torch.equal(a, b)
    two = loaded.decode_tensor(ids, size=64, steps=2, seed=3)
    assert not torch.allclose(a, two)
    images = loaded.decode(ids.view(1, -1), size=64)  # flat (B, 256) ids are accepted too
    assert images[0].size == (64, 64) and images[0].mode == "RGB"


def test_from_pretrained_errors_name_the_path(stage2_dir, tmp_path):
    out, _ = stage2_dir
    with pytest.raises(ModelFileError, match="not a Layton tokenizer directory .no model_index.json"):
        LaytonTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ModelFileError, match="sdxl_release.*StableDiffusionXLPipeline"):  # a diffusers pipeline's index
        (tmp_path / "sdxl_release").mkdir()
        (tmp_path / "sdxl_release" / INDEX_NAME).write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
        LaytonTokenizer.from_pretrained(tmp_path / "sdxl_release")
    with pytest.raises(ModelFileError, match="/nowhere/lora.safetensors"):
        LaytonTokenizer.from_pretrained(out, lora="/nowhere/lora.safetensors")
    with pytest.raises(ModelFileError, match="/nowhere/sdxl"):
        LaytonTokenizer.from_pretrained(out, sdxl="/nowhere/sdxl")


def test_directory_decodes_identically_after_it_moved(stage2_dir, tmp_path):
    _, tok = stage2_dir
    first = tok.save_pretrained(tmp_path / "first", stage=2)
    assert str(first) not in (first / INDEX_NAME).read_text()  # the parts are named relative to the directory
    moved = shutil.copytree(first, tmp_path / "elsewhere" / "tok")
    shutil.rmtree(first)
    loaded = LaytonTokenizer.from_pretrained(moved)
    ids = tok.encode([photo("rocket")])
    assert torch.equal(loaded.decode_tensor(ids, size=64, seed=5), tok.decode_tensor(ids, size=64, seed=5))
    assert torch.equal(loaded.decode_tensor(ids, size=64, steps=2, seed=5), tok.decode_tensor(ids, size=64, steps=2, seed=5))
    # The upstream weights moved too: overrides name where they are now.
    index = json.loads((moved / INDEX_NAME).read_text())
    sdxl = shutil.copytree(index["sdxl"], tmp_path / "weights" / "sdxl")
    vq = shutil.copy(index["vq"], tmp_path / "weights" / "vq.pt")
    lora = shutil.copy(index["consistency"]["lora"], tmp_path / "weights" / "lora.safetensors")
    overridden = LaytonTokenizer.from_pretrained(moved, sdxl=str(sdxl), vq=str(vq), lora=str(lora))
    assert (overridden.spec["sdxl"], overridden.spec["consistency"]["lora"]) == (str(sdxl), str(lora))
    assert torch.equal(overridden.decode_tensor(ids, size=64, seed=5), tok.decode_tensor(ids, size=64, seed=5))


def write_legacy_tokenizer(tok: LaytonTokenizer, directory: Path) -> Path:
    """A tokenizer directory in the first layout, written as its writer did (spec, LADD's trainable
    tensors, the empty-prompt conditions)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    save_file({k: v.detach().float().contiguous() for k, v in tok.ladd.trainable_state_dict().items()},
              directory / "ladd.safetensors")
    save_file({"prompt_embeds": tok.ladd.prompt_embeds.float().contiguous(),
               "pooled_prompt_embeds": tok.ladd.pooled_prompt_embeds.float().contiguous()}, directory / "empty_prompt.safetensors")
    embedder = {k: tok.ladd.cond_embedder.config[k] for k in ("in_channels", "channels", "out_channels")}
    spec = {**tok.spec, "format": "layton-tokenizer/1", "embedder": embedder, "controlnet": dict(tok.ladd.controlnet.config)}
    (directory / "tokenizer_config.json").write_text(json.dumps(spec, indent=1, default=str))
    return directory


def test_legacy_directory_is_refused_and_converts(stage2_dir, tmp_path):
    from layton.tokenizer import convert_legacy_tokenizer, is_tokenizer_dir

    _, tok = stage2_dir
    legacy = write_legacy_tokenizer(tok, tmp_path / "legacy")
    for call in (lambda: LaytonTokenizer.from_pretrained(legacy), lambda: is_tokenizer_dir(legacy)):
        with pytest.raises(ModelFileError, match=f"{legacy}.*old layout.*layton convert tokenizer.*convert_legacy_tokenizer"):
            call()
    from app.cli import main

    new = tmp_path / "new"
    assert main(["convert", "tokenizer", str(legacy), str(new)]) == 0  # the command the error names
    assert is_tokenizer_dir(new) and json.loads((new / INDEX_NAME).read_text())["stage"] == 2
    ids = tok.encode([photo("chelsea")])
    assert torch.equal(LaytonTokenizer.from_pretrained(new).decode_tensor(ids, size=64, seed=3), tok.decode_tensor(ids, size=64, seed=3))
    with pytest.raises(FileExistsError, match="not empty"):
        convert_legacy_tokenizer(legacy, new)
    with pytest.raises(ModelFileError, match="layton-tokenizer/1"):
        convert_legacy_tokenizer(new, tmp_path / "again")  # already converted


def test_stage1_tokenizer_decodes_with_ddim_only(model_cfg, tmp_path):
    tok = LaytonTokenizer.build(model_cfg)
    ids = tok.encode([photo("rocket")])
    assert tok.decode_tensor(ids, size=64, steps=3).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="no consistency LoRA"):
        tok.decode_tensor(ids, size=64, sampler="consistency")


def test_cli_encode_then_decode(stage2_dir, tmp_path):
    out, tok = stage2_dir
    Image.fromarray(photo("coffee")).save(tmp_path / "coffee.png")
    run = lambda *a: subprocess.run([sys.executable, "-m", "app.cli", *map(str, a)], cwd=ROOT, capture_output=True, text=True)
    r = run("encode", tmp_path / "coffee.png", "-o", tmp_path / "ids.npy", "--tokenizer", out)
    assert r.returncode == 0, r.stderr
    ids = np.load(tmp_path / "ids.npy")
    assert ids.shape == (1, 16, 16)
    assert np.array_equal(ids, tok.encode([Image.open(tmp_path / "coffee.png")]).numpy())
    r = run("decode", tmp_path / "ids.npy", "-o", tmp_path / "out.png", "--tokenizer", out, "--size", 64)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "out.png").size == (64, 64)
    r = run("encode", tmp_path / "missing.png", "-o", tmp_path / "x.npy", "--tokenizer", out)
    assert r.returncode == 2 and "missing.png" in r.stderr


def test_decode_matches_the_plain_diffusers_path(stage2_dir, tiny_zoo):
    """`decode_tensor` (inference mode, glibc keeping freed blocks for reuse) gives what the plain
    diffusers calls give on a VAE loaded fresh, up to float rounding: the same latents, then
    `AutoencoderKL.decode`."""
    from diffusers import AutoencoderKL

    from layton.devices import keep_freed_cpu_memory

    _, tok = stage2_dir
    plain_vae = AutoencoderKL.from_pretrained(tiny_zoo / "sdxl", subfolder="vae").eval()
    ids = tok.encode([photo("astronaut"), photo("coffee")])
    for size, steps, sampler in ((128, None, None), (64, 2, None), (64, 3, "ddim")):
        got = tok.decode_tensor(ids, size=size, steps=steps, sampler=sampler, seed=4)
        with torch.no_grad():
            z = tok.latents(tok.token_features(ids), size, steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(4))
            ref = plain_vae.decode(z / plain_vae.config.scaling_factor).sample.clamp(-1, 1)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)
    assert keep_freed_cpu_memory() == (sys.platform == "linux")  # glibc here: large blocks reused
