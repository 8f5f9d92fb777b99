"""LaytonTokenizer on the tiny zoo: token grids, decoding, the checkpoint directory, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from layton.config import ConsistencyConfig, TokenizerModelConfig
from layton.model_files import ModelFileError
from layton.tokenizer import CONFIG_NAME, LaytonTokenizer
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
    spec = json.loads((out / CONFIG_NAME).read_text())
    assert spec["stage"] == 2 and spec["consistency"]["kind"] == "hypersd" and spec["consistency"]["timesteps"] == [999]
    loaded = LaytonTokenizer.from_pretrained(out)  # re-fuses the LoRA named in the directory
    ids = tok.encode([photo("chelsea")])
    a = tok.decode_tensor(ids, size=64, seed=3)
    b = loaded.decode_tensor(ids, size=64, seed=3)
    assert a.shape == (1, 3, 64, 64)
    assert torch.allclose(a, b, atol=1e-5)
    two = loaded.decode_tensor(ids, size=64, steps=2, seed=3)
    assert not torch.allclose(a, two)
    images = loaded.decode(ids.view(1, -1), size=64)  # flat (B, 256) ids are accepted too
    assert images[0].size == (64, 64) and images[0].mode == "RGB"


def test_from_pretrained_errors_name_the_path(stage2_dir, tmp_path):
    out, _ = stage2_dir
    with pytest.raises(ModelFileError, match="no tokenizer_config.json"):
        LaytonTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ModelFileError, match="/nowhere/lora.safetensors"):
        LaytonTokenizer.from_pretrained(out, lora="/nowhere/lora.safetensors")
    with pytest.raises(ModelFileError, match="/nowhere/sdxl"):
        LaytonTokenizer.from_pretrained(out, sdxl="/nowhere/sdxl")


def test_stage1_tokenizer_decodes_with_ddim_only(model_cfg, tmp_path):
    tok = LaytonTokenizer.build(model_cfg)
    ids = tok.encode([photo("rocket")])
    assert tok.decode_tensor(ids, size=64, steps=3).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="no consistency LoRA"):
        tok.decode_tensor(ids, size=64, sampler="consistency")


def test_cli_encode_then_decode(stage2_dir, tmp_path):
    out, tok = stage2_dir
    Image.fromarray(photo("coffee")).save(tmp_path / "coffee.png")
    run = lambda *a: subprocess.run([sys.executable, "-m", "layton.cli", *map(str, a)], cwd=ROOT, capture_output=True, text=True)
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
