"""LlamaGen VQ-16 tokenizer: upstream key layout, parity with LlamaGen's formulation, safe loading,
preprocessing of real photographs.

The references below are LlamaGen's forward passes (tokenizer/tokenizer_image/vq_model.py) written
functionally over the raw tensors of the checkpoint file, not over `layton.vq`'s modules.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata

from layton.vq import VQConfig, VQModel, load_llamagen_vq, preprocess
from layton.zoo.llamagen_vq import TINY, write_tiny_llamagen_vq


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_llamagen_vq(tmp_path_factory.mktemp("vq"), seed=0)


@pytest.fixture(scope="module")
def model(ckpt):
    return load_llamagen_vq(ckpt)


@pytest.fixture(scope="module")
def sd(ckpt):
    return torch.load(ckpt, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def photos():
    return [Image.fromarray(skdata.astronaut()), Image.fromarray(skdata.camera())]


# ---- LlamaGen's formulation over raw state-dict tensors ----------------------------------------

def _conv(x, sd, p, **kw):
    return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], **kw)


def _gn(x, sd, p):  # Normalize(): GroupNorm(32, eps=1e-6)
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _swish(x):
    return x * torch.sigmoid(x)


def _res(x, sd, p):
    h = _conv(_swish(_gn(x, sd, p + "norm1")), sd, p + "conv1", padding=1)
    h = _conv(_swish(_gn(h, sd, p + "norm2")), sd, p + "conv2", padding=1)
    return (_conv(x, sd, p + "nin_shortcut") if p + "nin_shortcut.weight" in sd else x) + h


def _attn(x, sd, p):
    b, c, hh, ww = x.shape
    y = _gn(x, sd, p + "norm")
    q, k, v = (_conv(y, sd, p + n).reshape(b, c, hh * ww) for n in "qkv")
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c**-0.5, dim=-1)
    return x + _conv(torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww), sd, p + "proj_out")


def _levels(x, sd, prefix, n_levels, resample):
    for i in range(n_levels):
        p, j = f"{prefix}.conv_blocks.{i}.", 0
        while f"{p}res.{j}.conv1.weight" in sd:
            x = _res(x, sd, f"{p}res.{j}.")
            if f"{p}attn.{j}.q.weight" in sd:
                x = _attn(x, sd, f"{p}attn.{j}.")
            j += 1
        x = resample(x, p)
    return x


def _mid(x, sd, p):
    return _res(_attn(_res(x, sd, p + "0."), sd, p + "1."), sd, p + "2.")


def ref_encoder(x, sd, n_levels=5):
    def down(h, p):  # stride-2 conv after (0, 1, 0, 1) zero padding
        if p + "downsample.conv.weight" not in sd:
            return h
        return _conv(F.pad(h, (0, 1, 0, 1)), sd, p + "downsample.conv", stride=2)

    h = _levels(_conv(x, sd, "encoder.conv_in", padding=1), sd, "encoder", n_levels, down)
    return _conv(_swish(_gn(_mid(h, sd, "encoder.mid."), sd, "encoder.norm_out")), sd, "encoder.conv_out", padding=1)


def ref_decoder(z, sd, n_levels=5):
    def up(h, p):  # nearest x2, then conv
        if p + "upsample.conv.weight" not in sd:
            return h
        return _conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, p + "upsample.conv", padding=1)

    h = _levels(_mid(_conv(z, sd, "decoder.conv_in", padding=1), sd, "decoder.mid."), sd, "decoder", n_levels, up)
    return _conv(_swish(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out", padding=1)


def ref_quantize(z, codebook):
    """VectorQuantizer.forward with l2_norm=True: nearest normalised code by L2 distance."""
    z = torch.einsum("bchw->bhwc", z)
    zf = F.normalize(z.reshape(-1, z.shape[-1]), p=2, dim=-1)
    e = F.normalize(codebook, p=2, dim=-1)
    d = torch.sum(zf**2, dim=1, keepdim=True) + torch.sum(e**2, dim=1) - 2 * torch.einsum("bd,dn->bn", zf, e.t())
    return torch.argmin(d, dim=1).reshape(z.shape[:3])


# ---- layout and config ------------------------------------------------------------------------

# Names read off LlamaGen's vq_model.py: Encoder/Decoder.conv_blocks[i] with .res/.attn/.downsample
# (.upsample in the decoder, whose levels run lowest resolution first), mid = [Resnet, Attn, Resnet].
UPSTREAM_KEYS = [
    "encoder.conv_in.weight",
    "encoder.conv_blocks.0.res.0.norm1.weight",
    "encoder.conv_blocks.0.res.0.conv1.weight",
    "encoder.conv_blocks.0.downsample.conv.weight",
    "encoder.conv_blocks.2.res.0.nin_shortcut.weight",  # 32 -> 64 channels
    "encoder.conv_blocks.4.attn.0.q.weight",
    "encoder.conv_blocks.4.attn.0.proj_out.bias",
    "encoder.mid.0.norm1.weight",
    "encoder.mid.1.k.weight",
    "encoder.mid.2.conv2.bias",
    "encoder.norm_out.weight",
    "encoder.conv_out.weight",
    "quant_conv.weight",
    "quantize.embedding.weight",
    "quantize.codebook_used",
    "post_quant_conv.weight",
    "decoder.conv_in.weight",
    "decoder.mid.1.v.bias",
    "decoder.conv_blocks.0.res.1.conv2.weight",  # num_res_blocks + 1 in the decoder
    "decoder.conv_blocks.0.attn.1.norm.weight",
    "decoder.conv_blocks.0.upsample.conv.weight",
    "decoder.conv_blocks.4.res.0.conv1.weight",
    "decoder.norm_out.bias",
    "decoder.conv_out.weight",
]
NOT_UPSTREAM = ["encoder.conv_blocks.3.attn.0.q.weight", "encoder.conv_blocks.4.downsample.conv.weight",
                "decoder.conv_blocks.1.attn.0.q.weight", "decoder.conv_blocks.4.upsample.conv.weight"]


def test_written_checkpoint_has_llamagen_layout(ckpt, sd):
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert set(raw) == {"model"}
    assert all(k in sd for k in UPSTREAM_KEYS)
    assert not any(k in sd for k in NOT_UPSTREAM)
    assert sd["quantize.embedding.weight"].shape == (1024, 8) and sd["quantize.codebook_used"].shape == (65536,)


def test_full_vq16_layout():
    """Full-size VQ-16 on the meta device: 343 learned tensors + codebook_used (the count Janus-Pro's
    LlamaGen-derived gen_vision_model ships), ~72M parameters as the LlamaGen paper states."""
    with torch.device("meta"):
        full = VQModel()
    keys = full.state_dict()
    assert len(keys) == 344
    assert 71e6 < sum(p.numel() for p in full.parameters()) < 73e6
    assert keys["encoder.conv_blocks.4.res.0.conv1.weight"].shape == (512, 256, 3, 3)
    assert keys["quant_conv.weight"].shape == (8, 256, 1, 1)
    assert VQConfig.from_state_dict(keys) == VQConfig()
    assert VQConfig().downsample == 16


def test_config_inferred_from_state_dict(sd, model):
    want = VQConfig(**TINY)
    assert VQConfig.from_state_dict(sd) == want
    assert model.config == want
    assert not model.training and not any(p.requires_grad for p in model.parameters())


# ---- parity -----------------------------------------------------------------------------------

def test_codes_match_llamagen_quantizer(model, sd, photos):
    for size, images in ((224, photos[:1]), (256, photos), (288, photos[1:])):
        x = preprocess(images, size)
        z = F.conv2d(model.encoder(x), sd["quant_conv.weight"], sd["quant_conv.bias"])
        codes = model.encode_codes(x)
        assert codes.shape == (len(images), size // 16, size // 16) and codes.dtype == torch.int64
        assert torch.equal(codes, ref_quantize(z, sd["quantize.embedding.weight"]))
        assert len(codes.unique()) > 64  # a random codebook that real pictures actually use


def test_encoder_decoder_match_llamagen_forward(model, sd, photos):
    x = preprocess(photos, 128)  # 8x8 codes: the layout is exercised, the cost stays small
    z_ref = ref_encoder(x, sd)
    torch.testing.assert_close(model.encoder(x), z_ref, rtol=1e-4, atol=1e-5)
    codes = model.encode_codes(x)
    feats = model.code_features(codes)
    torch.testing.assert_close(feats, F.normalize(sd["quantize.embedding.weight"], dim=-1)[codes].permute(0, 3, 1, 2))
    torch.testing.assert_close(model.encode_features(x), feats, rtol=0, atol=0)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(2, 8, 8))
    dec_ref = ref_decoder(F.conv2d(feats, sd["post_quant_conv.weight"], sd["post_quant_conv.bias"]), sd).clamp(-1, 1)
    torch.testing.assert_close(model.decode_codes(codes), dec_ref, rtol=1e-4, atol=1e-5)


def test_decode_shapes_and_image_size_checks(model):
    codes = torch.randint(0, 1024, (2, 16, 16))
    out = model.decode_codes(codes)
    assert out.shape == (2, 3, 256, 256) and out.min() >= -1 and out.max() <= 1
    assert model.encode_codes(torch.zeros(1, 3, 256, 288)).shape == (1, 16, 18)  # non-square
    with pytest.raises(ValueError, match="multiples of 16"):
        model.encode_codes(torch.zeros(1, 3, 250, 256))


# ---- loading ----------------------------------------------------------------------------------

def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "vq_ds16_c2i.pt"
    with pytest.raises(FileNotFoundError, match="vq_ds16_c2i.pt"):
        load_llamagen_vq(path)


def test_wrong_keys_name_the_path(tmp_path, sd):
    other = tmp_path / "other.pt"
    torch.save({"model": {"backbone.weight": torch.zeros(3)}}, other)
    with pytest.raises(ValueError, match="other.pt.*not a LlamaGen VQ"):
        load_llamagen_vq(other)
    partial = tmp_path / "partial.pt"
    broken = {k: v for k, v in sd.items() if k != "decoder.conv_out.bias"} | {"extra.bias": torch.zeros(1)}
    torch.save({"model": broken}, partial)
    with pytest.raises(ValueError, match=r"partial.pt.*1 missing.*decoder.conv_out.bias.*1 unexpected.*extra.bias"):
        load_llamagen_vq(partial)
    not_sd = tmp_path / "list.pt"
    torch.save([1, 2], not_sd)
    with pytest.raises(ValueError, match="list.pt"):
        load_llamagen_vq(not_sd)
    garbage = tmp_path / "truncated.pt"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="truncated.pt"):
        load_llamagen_vq(garbage)


def test_checkpoint_variants_load(tmp_path, sd, model):
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    want = model.encode_codes(x)
    variants = {
        "state_dict.pt": {"state_dict": sd},
        "bare.pt": sd,
        # LlamaGen's vq_train.py also pickles its argparse.Namespace and step count
        "train.pt": {"model": sd, "steps": 10, "args": argparse.Namespace(vq_model="VQ-16", codebook_size=1024)},
        # saved with codebook_show_usage=False: no usage buffer
        "no_usage.pt": {"model": {k: v for k, v in sd.items() if k != "quantize.codebook_used"}},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        assert torch.equal(load_llamagen_vq(tmp_path / name).encode_codes(x), want), name


UNPICKLED: list[str] = []


def _record(tag):
    UNPICKLED.append(tag)
    return tag


class Payload:
    """A custom object whose unpickling would call `_record` (stand-in for arbitrary code)."""

    def __reduce__(self):
        return (_record, ("ran",))


def test_never_unpickles_arbitrary_objects(tmp_path, sd):
    path = tmp_path / "evil.pt"
    torch.save({"model": sd, "payload": Payload()}, path)
    with pytest.raises(ValueError, match="evil.pt.*refusing to unpickle"):
        load_llamagen_vq(path)
    assert UNPICKLED == []


# ---- preprocessing ----------------------------------------------------------------------------

def test_preprocess_modes_and_sizes(photos):
    astronaut, camera = photos
    rgba = astronaut.copy()
    rgba.putalpha(128)
    small = astronaut.resize((100, 60))
    cases = {"L": camera, "RGBA": rgba, "small": small, "P": astronaut.quantize(64), "CMYK": astronaut.convert("CMYK")}
    for name, image in cases.items():
        out = preprocess([image], 256)
        assert out.shape == (1, 3, 256, 256) and out.dtype == torch.float32, name
        assert out.min() >= -1 and out.max() <= 1 and out.std() > 0.1, name
    grey = preprocess(camera, 256)[0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert torch.equal(preprocess(rgba, 256), preprocess(astronaut, 256))  # alpha dropped, as LlamaGen's convert("RGB")
    # 512x512 -> 288: a plain resize, no crop; a tensor goes through the same pipeline as PIL
    tensor = torch.from_numpy(skdata.astronaut()).permute(2, 0, 1)
    torch.testing.assert_close(preprocess(tensor, 288), preprocess(astronaut, 288))
    assert preprocess(torch.stack([tensor, tensor]).float() / 255, 224).shape == (2, 3, 224, 224)
    assert torch.equal(preprocess([skdata.camera(), skdata.astronaut()], 256), preprocess([camera, astronaut], 256))


def test_preprocess_center_crops_the_longer_side():
    # left third black, middle white, right third black: a centre crop of the wide image is all white
    arr = np.zeros((60, 180, 3), np.uint8)
    arr[:, 60:120] = 255
    out = preprocess(Image.fromarray(arr), 32)[0]
    assert out.shape == (3, 32, 32)
    assert out[:, :, 4:-4].min() > 0.9


# ---- tiny zoo writer --------------------------------------------------------------------------

def test_writer_is_seeded_and_keeps_global_rng(tmp_path):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = write_tiny_llamagen_vq(tmp_path / "a", seed=0)
    assert torch.equal(torch.rand(3), expected_next)
    assert a.name == "vq_ds16_t2i.pt"
    b = write_tiny_llamagen_vq(tmp_path / "b", seed=0)
    c = write_tiny_llamagen_vq(tmp_path / "c", seed=1)
    sa, sb, sc = (torch.load(p, weights_only=True)["model"] for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["quantize.embedding.weight"], sc["quantize.embedding.weight"])
