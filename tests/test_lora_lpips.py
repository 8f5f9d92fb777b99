"""Stage-2 building blocks: consistency LoRAs fused into the tiny SDXL UNet, and LPIPS from a local backbone."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from layton.lora import fuse_lora_into_unet
from layton.perceptual import build_lpips
from layton.zoo.lpips_backbone import write_tiny_lpips_backbone
from layton.zoo.sdxl import LORA_RANK, build_tiny_sdxl, write_tiny_consistency_loras

SCALE = 0.7


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def unet():
    return build_tiny_sdxl(seed=0).unet.eval()


@pytest.fixture(scope="module")
def loras(unet, tmp_path_factory):
    return write_tiny_consistency_loras(tmp_path_factory.mktemp("loras"), unet, seed=0)


def _factors(kind: str, path, module: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, alpha) of `module`, read straight from the release-format file(s)."""
    sd = load_file(path)
    if kind == "hypersd":  # kohya: lora_unet_<path with _>.{lora_down,lora_up,alpha}
        key = "lora_unet_" + module.replace(".", "_")
        return sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], sd[f"{key}.alpha"].item()
    config = json.loads((path.parent / "adapter_config.json").read_text())  # PEFT: alpha in the config
    key = f"base_model.model.{module}"
    return sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"], float(config["lora_alpha"])


def _merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, scale: float) -> torch.Tensor:
    delta = (b.flatten(1) @ a.flatten(1)).reshape(weight.shape)  # Linear, or kxk conv A with 1x1 conv B
    return weight + scale * (alpha / a.shape[0]) * delta


def test_release_formats(unet, loras, tmp_path):
    assert loras["hypersd"].name == "Hyper-SDXL-1step-lora.safetensors"
    kohya = load_file(loras["hypersd"])
    assert all(re.fullmatch(r"lora_unet_\w+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in kohya)
    assert all(v.abs().sum() > 0 for v in kohya.values())

    peft = load_file(loras["tlcm"])
    assert all(re.fullmatch(r"base_model\.model\.[\w.]+\.lora_[AB]\.weight", k) for k in peft)
    config = json.loads((loras["tlcm"].parent / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == LORA_RANK and config["lora_alpha"] != LORA_RANK
    assert {"to_q", "to_out.0", "conv1", "time_emb_proj"} <= set(config["target_modules"])
    assert all(v.abs().sum() > 0 for v in peft.values())

    again = write_tiny_consistency_loras(tmp_path, unet, seed=0)  # seeded
    for kind, path in loras.items():
        ref, new = load_file(path), load_file(again[kind])
        assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref)


@pytest.mark.parametrize("kind", ["hypersd", "tlcm"])
def test_fuse_merges_exactly_the_targeted_layers(unet, loras, kind):
    from diffusers import UNet2DConditionModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    fused = copy.deepcopy(unet)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    names = fuse_lora_into_unet(fused, loras[kind], scale=SCALE)
    after = fused.state_dict()

    # a plain UNet again: same class and keys, no peft layers or config left
    assert type(fused) is UNet2DConditionModel and after.keys() == before.keys()
    assert not any(isinstance(m, BaseTunerLayer) for m in fused.modules()) and not hasattr(fused, "peft_config")

    # the modules named in the file, and only their weights, changed
    sd = load_file(loras[kind])
    if kind == "hypersd":
        by_key = {"lora_unet_" + n.replace(".", "_"): n for n, _ in unet.named_modules()}
        expected = {by_key[k.split(".")[0]] for k in sd}
    else:
        expected = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in sd}
    assert set(names) == expected
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{n}.weight" for n in names}
    assert any("attn2.to_k" in n for n in names) and any("resnets.0.conv1" in n for n in names)

    # W' = W + scale * alpha / r * B @ A, from the file, for a Linear and a 3x3 conv
    for module in ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "down_blocks.0.resnets.0.conv1"]:
        a, b, alpha = _factors(kind, loras[kind], module)
        w = before[f"{module}.weight"]
        torch.testing.assert_close(after[f"{module}.weight"], _merged(w, a, b, alpha, SCALE), rtol=1e-5, atol=1e-6)
        assert alpha != a.shape[0]  # so a loader ignoring alpha would fail the line above


def test_fused_unet_runs_and_differs(unet, loras):
    fused = copy.deepcopy(unet)
    fuse_lora_into_unet(fused, loras["hypersd"])
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 16, 16, generator=gen)
    time_ids = torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2)  # original size, crop, target size
    cond = dict(
        encoder_hidden_states=torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen),
        added_cond_kwargs={"text_embeds": torch.zeros(2, 32), "time_ids": time_ids},
    )
    with torch.no_grad():
        base = unet(z, torch.tensor([999, 999]), **cond).sample
        out = fused(z, torch.tensor([999, 999]), **cond).sample
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-4


def test_per_module_kohya_alphas(unet, loras, tmp_path):
    """Alphas that differ between modules (kohya) each apply to their own module."""
    sd = load_file(loras["hypersd"])
    odd = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    sd[f"lora_unet_{odd.replace('.', '_')}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "mixed-alpha.safetensors"
    save_file(sd, path)
    fused = copy.deepcopy(unet)
    fuse_lora_into_unet(fused, path)
    for module in [odd, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"]:
        a, b, alpha = _factors("hypersd", path, module)
        w = dict(unet.named_parameters())[f"{module}.weight"]
        torch.testing.assert_close(dict(fused.named_parameters())[f"{module}.weight"], _merged(w, a, b, alpha, 1.0))


def test_bad_lora_paths_raise_naming_the_path(unet, loras, tmp_path):
    missing = tmp_path / "nope" / "Hyper-SDXL-1step-lora.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        fuse_lora_into_unet(copy.deepcopy(unet), missing)

    pickled = tmp_path / "pytorch_lora_weights.bin"
    pickled.write_bytes(b"not read")
    with pytest.raises(ValueError, match=re.escape(str(pickled)) + ".*safetensors"):
        fuse_lora_into_unet(copy.deepcopy(unet), pickled)

    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"encoder.layers.0.weight": torch.ones(2, 2)}, unrelated)
    with pytest.raises(ValueError, match=re.escape(str(unrelated))):
        fuse_lora_into_unet(copy.deepcopy(unet), unrelated)

    # kohya keys for blocks this UNet does not have (e.g. an SD1.5-sized LoRA)
    foreign = tmp_path / "foreign.safetensors"
    key = "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{key}.lora_down.weight": torch.ones(4, 64), f"{key}.lora_up.weight": torch.ones(64, 4),
               f"{key}.alpha": torch.tensor(4.0)}, foreign)  # fmt: skip
    target = copy.deepcopy(unet)
    with pytest.raises(ValueError, match=re.escape(str(foreign))):
        fuse_lora_into_unet(target, foreign)
    assert all(torch.equal(p, q) for p, q in zip(target.parameters(), unet.parameters()))

    # the UNet's module names, but another model's sizes
    resized = tmp_path / "resized.safetensors"
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{key}.lora_down.weight": torch.ones(4, 640), f"{key}.lora_up.weight": torch.ones(640, 4),
               f"{key}.alpha": torch.tensor(4.0)}, resized)  # fmt: skip
    target = copy.deepcopy(unet)
    with pytest.raises(ValueError, match=re.escape(str(resized))):
        fuse_lora_into_unet(target, resized)
    assert target.state_dict().keys() == unet.state_dict().keys()  # no peft layers left behind

    # a PEFT adapter without its adapter_config.json: alpha unknown
    orphan = tmp_path / "orphan" / "adapter_model.safetensors"
    orphan.parent.mkdir()
    orphan.write_bytes(loras["tlcm"].read_bytes())
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fuse_lora_into_unet(copy.deepcopy(unet), orphan)


# --- LPIPS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return write_tiny_lpips_backbone(tmp_path_factory.mktemp("lpips"), net="alex", seed=0)


@pytest.fixture(scope="module")
def lpips_alex(backbone):
    return build_lpips("alex", backbone)


@pytest.fixture(scope="module")
def photos():
    from skimage import data

    def prep(img):  # uint8 HWC -> 1x3x64x64 in [-1, 1]
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
        return torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True)

    return prep(data.astronaut()), prep(data.coffee())


def test_lpips_loads_backbone_file_and_package_linear_layers(lpips_alex, backbone):
    import lpips

    state = torch.load(backbone, weights_only=True)
    assert all(k.startswith("features.") for k in state)
    torch.testing.assert_close(getattr(lpips_alex.net.slice1, "0").weight, state["features.0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(getattr(lpips_alex.net.slice5, "10").bias, state["features.10.bias"], rtol=0, atol=0)
    shipped = torch.load(f"{lpips.__path__[0]}/weights/v0.1/alex.pth", map_location="cpu", weights_only=True)
    torch.testing.assert_close(lpips_alex.lin0.model[1].weight, shipped["lin0.model.1.weight"], rtol=0, atol=0)
    assert not lpips_alex.training and not any(p.requires_grad for p in lpips_alex.parameters())


def test_lpips_on_real_photographs(lpips_alex, photos):
    astronaut, coffee = photos
    with torch.no_grad():
        assert lpips_alex(astronaut, astronaut).item() == 0
        d_ab, d_ba = lpips_alex(astronaut, coffee).item(), lpips_alex(coffee, astronaut).item()
        noise = torch.randn(astronaut.shape, generator=torch.Generator().manual_seed(0))
        noisy = (astronaut + 0.1 * noise).clamp(-1, 1)
        d_noise = lpips_alex(astronaut, noisy).item()
    assert d_ab > 0 and abs(d_ab - d_ba) < 1e-5
    assert 0 < d_noise < d_ab  # a noisy copy is closer than another photograph

    # usable as a loss: gradients reach the image, not the frozen metric
    x = coffee.clone().requires_grad_(True)
    lpips_alex(x, astronaut).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lpips_accepts_full_torchvision_state_dict(lpips_alex, backbone, photos, tmp_path):
    state = torch.load(backbone, weights_only=True)
    full = {**state, "classifier.1.weight": torch.zeros(8, 8), "classifier.1.bias": torch.zeros(8)}
    torch.save(full, tmp_path / "alexnet-full.pth")
    other = build_lpips("alex", tmp_path / "alexnet-full.pth")
    with torch.no_grad():
        assert other(*photos).item() == lpips_alex(*photos).item()


def test_lpips_needs_its_backbone(backbone, tmp_path):
    with pytest.raises(ValueError, match="backbone weights"):
        build_lpips("alex")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.pth"))):
        build_lpips("alex", tmp_path / "missing.pth")
    # a file for another backbone does not fit
    torch.save({"features.0.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth"):
        build_lpips("alex", tmp_path / "wrong.pth")
    assert build_lpips("alex", random_backbone=True) is not None  # tests only
