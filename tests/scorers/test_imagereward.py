"""ImageReward scorer: parity with an independent restatement of the official computation.

The `image-reward` package does not import with transformers 5, so the official `ImageReward.score`
is restated below from its source with plain tensor ops on the raw state dict: torchvision
preprocessing as upstream composes it, BLIP's ViT, BLIP's med BERT (bidirectional self-attention,
then cross-attention to every image token, additive -10000 masks), the MLP head and the fixed
normalisation. It uses neither a project module nor the timm / transformers classes the scorer is
built from, so a mis-configured library model (causal self-attention, pooled image tokens, tanh
GELU, ...) shows up as a score difference. The one assumption shared with the scorer is the ViT head
count (64-wide heads), because upstream hard-codes ViT-L and a tiny checkpoint cannot carry that number.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from layton.scorers.imagereward import POSITION_IDS, ImageRewardScorer
from layton.zoo.imagereward import write_tiny_imagereward

PROMPTS = [
    "a photo of a cat",
    "a cup of coffee on a wooden table",
    "an astronaut in a white suit",
    "a rocket in the sky at sunset, highly detailed, cinematic lighting, trending on artstation, "
    "sharp focus, depth of field, bokeh, oil painting by several artists, 8k, colorful and vivid",
    "stars at night",
    "zzqx unknown wordz",
]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_tiny_imagereward(tmp_path_factory.mktemp("imagereward"))


@pytest.fixture(scope="module")
def scorer(release):
    return ImageRewardScorer.from_release(release["checkpoint"], release["med_config"], release["tokenizer"])


@pytest.fixture(scope="module")
def images():
    from skimage import data

    photos = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("astronaut", "coffee", "chelsea", "rocket")]
    rng = np.random.default_rng(0)
    odd = Image.fromarray(rng.integers(0, 256, (90, 170, 3), dtype=np.uint8))  # wide, smaller than 224
    gray = Image.fromarray(rng.integers(0, 256, (300, 260), dtype=np.uint8))  # mode "L", tall
    return photos + [odd, gray]


# ----------------------------------------------------------------- the official computation, restated


def _official_tokenizer(path):
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(path))  # BLIP init_tokenizer
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def _official_transform(n_px):
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([
        Resize(n_px, interpolation=InterpolationMode.BICUBIC),
        CenterCrop(n_px),
        lambda im: im.convert("RGB"),
        ToTensor(),
        Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])


def _vit(sd, image, heads):
    p = "blip.visual_encoder."
    w = sd[p + "patch_embed.proj.weight"]
    x = F.conv2d(image, w, sd[p + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + sd[p + "pos_embed"][:, : x.size(1), :]
    depth = len({k.split(".")[3] for k in sd if k.startswith(p + "blocks.")})
    for i in range(depth):
        b = f"{p}blocks.{i}."
        B, N, C = x.shape
        h = F.layer_norm(x, (C,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(h, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, (C,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])), sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        x = x + h
    return F.layer_norm(x, (x.shape[-1],), sd[p + "norm.weight"], sd[p + "norm.bias"], eps=1e-6)


def _med_attention(sd, pre, hidden, context, ext_mask, heads, eps):
    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)

    q = split(F.linear(hidden, sd[pre + "self.query.weight"], sd[pre + "self.query.bias"]))
    k = split(F.linear(context, sd[pre + "self.key.weight"], sd[pre + "self.key.bias"]))
    v = split(F.linear(context, sd[pre + "self.value.weight"], sd[pre + "self.value.bias"]))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + ext_mask
    ctx = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(hidden.shape)
    out = F.linear(ctx, sd[pre + "output.dense.weight"], sd[pre + "output.dense.bias"])
    return F.layer_norm(out + hidden, (hidden.shape[-1],), sd[pre + "output.LayerNorm.weight"], sd[pre + "output.LayerNorm.bias"], eps=eps)


def _med_bert(sd, cfg, input_ids, attention_mask, image_embeds, image_atts):
    p = "blip.text_encoder."
    eps, heads = cfg["layer_norm_eps"], cfg["num_attention_heads"]
    x = sd[p + "embeddings.word_embeddings.weight"][input_ids]
    x = x + sd[p + "embeddings.position_embeddings.weight"][: input_ids.shape[1]][None]
    x = F.layer_norm(x, (x.shape[-1],), sd[p + "embeddings.LayerNorm.weight"], sd[p + "embeddings.LayerNorm.bias"], eps=eps)
    self_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    cross_mask = (1.0 - image_atts[:, None, None, :].float()) * -10000.0
    for i in range(cfg["num_hidden_layers"]):
        layer = f"{p}encoder.layer.{i}."
        x = _med_attention(sd, layer + "attention.", x, x, self_mask, heads, eps)
        x = _med_attention(sd, layer + "crossattention.", x, image_embeds, cross_mask, heads, eps)
        h = F.gelu(F.linear(x, sd[layer + "intermediate.dense.weight"], sd[layer + "intermediate.dense.bias"]))
        h = F.linear(h, sd[layer + "output.dense.weight"], sd[layer + "output.dense.bias"])
        x = F.layer_norm(h + x, (x.shape[-1],), sd[layer + "output.LayerNorm.weight"], sd[layer + "output.LayerNorm.bias"], eps=eps)
    return x


def official_score(release, prompt, image):
    sd = torch.load(release["checkpoint"], map_location="cpu", weights_only=True)
    cfg = json.loads(release["med_config"].read_text())
    tok = _official_tokenizer(release["tokenizer"])
    text_input = tok(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    img = _official_transform(224)(image).unsqueeze(0)
    heads = sd["blip.visual_encoder.cls_token"].shape[-1] // 64
    image_embeds = _vit(sd, img, heads)
    image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long)
    hidden = _med_bert(sd, cfg, text_input.input_ids, text_input.attention_mask, image_embeds, image_atts)
    r = hidden[:, 0, :].float()
    for i in (0, 2, 4, 6, 7):  # dropouts sit at 1, 3, 5 and are inactive in eval
        r = F.linear(r, sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"])
    return ((r - 0.16717362830052426) / 1.0333394966054072).item()


# ----------------------------------------------------------------- tests


def test_scores_match_official_computation(release, scorer, images):
    ours = scorer.score(PROMPTS, images)
    with torch.no_grad():
        ref = np.array([official_score(release, p, im) for p, im in zip(PROMPTS, images)])
    assert ours.dtype == np.float64 and ours.shape == (len(PROMPTS),)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_batch_equals_one_by_one(scorer, images):
    batch = scorer.score(PROMPTS, images)
    single = np.array([scorer.score([p], [im])[0] for p, im in zip(PROMPTS, images)])
    np.testing.assert_allclose(batch, single, atol=1e-5, rtol=0)
    assert scorer.score([], []).shape == (0,)
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(PROMPTS[:2], images[:3])


def test_tiny_scores_spread_over_images_and_prompts(scorer, images):
    over_images = scorer.score([PROMPTS[0]] * len(images), images)
    over_prompts = scorer.score(PROMPTS, [images[0]] * len(PROMPTS))
    assert np.isfinite(over_images).all() and np.isfinite(over_prompts).all()
    assert over_images.std() > 0.1 and over_prompts.std() > 0.1


def test_tokenizer_has_blip_tokens_and_truncates(scorer, release):
    tok = scorer.tokenizer
    n_vocab = len(release["tokenizer"].joinpath("vocab.txt").read_text().splitlines())
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [n_vocab, n_vocab + 1]
    assert tok.bos_token == "[DEC]"
    ids = tok(PROMPTS[3], padding="max_length", truncation=True, max_length=35).input_ids
    assert len(ids) == 35 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id


def test_zoo_is_deterministic(tmp_path, release):
    a = torch.load(write_tiny_imagereward(tmp_path / "a", seed=0)["checkpoint"], weights_only=True)
    b = torch.load(release["checkpoint"], weights_only=True)
    c = torch.load(write_tiny_imagereward(tmp_path / "c", seed=1)["checkpoint"], weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["mlp.layers.0.weight"], c["mlp.layers.0.weight"])


@pytest.mark.parametrize("which", ["checkpoint", "med_config", "tokenizer"])
def test_missing_file_names_the_path(tmp_path, release, which):
    paths = dict(release)
    paths[which] = tmp_path / "nowhere" / paths[which].name
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageRewardScorer.from_release(paths["checkpoint"], paths["med_config"], paths["tokenizer"])


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_bad_keys_name_the_file(tmp_path, release, change):
    sd = torch.load(release["checkpoint"], weights_only=True)
    if change == "missing":
        del sd["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    elif change == "unexpected":
        sd["blip.itm_head.weight"] = torch.zeros(2, 64)
    else:
        sd["blip.text_proj.weight"] = torch.zeros(7, 64)
    bad = tmp_path / "broken_ImageReward.pt"
    torch.save(sd, bad)
    with pytest.raises(ValueError, match="broken_ImageReward.pt"):
        ImageRewardScorer.from_release(bad, release["med_config"], release["tokenizer"])


def test_position_ids_buffer_is_checked_not_needed(tmp_path, release, scorer, images):
    sd = torch.load(release["checkpoint"], weights_only=True)
    assert torch.equal(sd[POSITION_IDS], torch.arange(sd[POSITION_IDS].shape[1])[None])  # upstream's saved buffer
    del sd[POSITION_IDS]  # a release saved without the buffer scores the same
    torch.save(sd, tmp_path / "no_ids.pt")
    plain = ImageRewardScorer.from_release(tmp_path / "no_ids.pt", release["med_config"], release["tokenizer"])
    np.testing.assert_array_equal(plain.score(PROMPTS[:2], images[:2]), scorer.score(PROMPTS[:2], images[:2]))
    sd[POSITION_IDS] = torch.arange(64).flip(0)[None]  # the text encoder would not use these positions
    torch.save(sd, tmp_path / "flipped_ImageReward.pt")
    with pytest.raises(ValueError, match="flipped_ImageReward.pt"):
        ImageRewardScorer.from_release(tmp_path / "flipped_ImageReward.pt", release["med_config"], release["tokenizer"])


def test_med_config_without_cross_attention_is_refused(tmp_path, release):
    cfg = json.loads(release["med_config"].read_text())
    cfg["add_cross_attention"] = False
    (tmp_path / "med_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="add_cross_attention"):
        ImageRewardScorer.from_release(release["checkpoint"], tmp_path / "med_config.json", release["tokenizer"])
