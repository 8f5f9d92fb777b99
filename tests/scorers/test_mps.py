"""MPS scorer: restricted unpickling of a whole pickled module, parity with upstream's inference.

The tiny release is a real `torch.save(module)`; the scorer reads it with the restricted unpickler.
The reference below follows upstream's `infer_one_sample` step by step, one pair at a time, on the
in-memory module that was pickled (its `XCLIPModel` mirrors upstream's per-token feature methods),
with upstream's cross-attention model restated in plain tensor ops. It shares no code with
`layton.scorers.mps`.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import einsum

from layton.scorers.mps import CONDITION, MPSScorer
from layton.scorers.restricted_unpickle import (
    StandIn,
    convert_mps_checkpoint,
    read_module_tensors,
    restricted_load,
)
from layton.zoo.mps import build_tiny_mps_module, write_tiny_mps

PROMPTS = [
    "a photo of a cat",
    "a cup of coffee on a wooden table",
    "an astronaut in a white suit",
    "a rocket in the sky at sunset, highly detailed, cinematic lighting, sharp focus, " * 4,  # > 77 tokens
    "stars at night",
    "quokka!",
]
OFFICIAL_CONDITION = (
    "light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
    "instance, texture, quantity, attributes, position, number, location, word, things."
)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_tiny_mps(tmp_path_factory.mktemp("mps"))


@pytest.fixture(scope="module")
def vocab_size(release):
    return len(json.loads((release["processor"] / "vocab.json").read_text()))


@pytest.fixture(scope="module")
def scorer(release):
    return MPSScorer.from_release(release["checkpoint"], release["processor"])


@pytest.fixture(scope="module")
def images():
    from skimage import data

    photos = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("astronaut", "coffee", "chelsea", "rocket")]
    rng = np.random.default_rng(1)
    return photos + [
        Image.fromarray(rng.integers(0, 256, (90, 170, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (300, 260), dtype=np.uint8)),  # grayscale
    ]


# ----------------------------------------------------------------- upstream inference, restated


def _rotate_half(x):
    x1, x2 = x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2).unbind(dim=-2)  # "... (j d) -> ... j d", j=2
    return torch.cat((-x2, x1), dim=-1)


def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + "norm.weight"], sd[p + "norm.bias"])


def _swiglu(x):
    x, gate = x.chunk(2, dim=-1)
    return F.silu(gate) * x


def reference_cross_model(sd, query_tokens, context_tokens, mask, heads):
    n_layers = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    for i in range(n_layers):
        # Residual(CrossAttention(parallel_ff=True))
        p = f"layers.{i}.0.fn."
        x = _ln(query_tokens, sd, p)
        b, n, _ = x.shape
        q = (x @ sd[p + "to_q.weight"].T).reshape(b, n, heads, -1).permute(0, 2, 1, 3)
        q = q * q.shape[-1] ** -0.5
        k, v = (context_tokens @ sd[p + "to_kv.weight"].T).chunk(2, dim=-1)
        sim = einsum("b h i d, b j d -> b h i j", q, k) + mask.unsqueeze(1).repeat(1, heads, 1, 1)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = einsum("b h i j, b j d -> b h i d", attn, v).permute(0, 2, 1, 3).reshape(b, n, -1)
        ff = _swiglu(x @ sd[p + "ff.0.weight"].T) @ sd[p + "ff.2.weight"].T
        query_tokens = out @ sd[p + "to_out.weight"].T + ff + query_tokens
        # Residual(ParallelTransformerBlock), no mask
        p = f"layers.{i}.1.fn."
        x = _ln(query_tokens, sd, p)
        inv_freq = sd[p + "rotary_emb.inv_freq"]
        dim_head = inv_freq.shape[0] * 2
        ff_inner2 = sd[p + "fused_attn_ff_proj.weight"].shape[0] - heads * dim_head - 2 * dim_head
        q, k, v, ff = (x @ sd[p + "fused_attn_ff_proj.weight"].T).split((heads * dim_head, dim_head, dim_head, ff_inner2), dim=-1)
        q = q.reshape(b, n, heads, dim_head).permute(0, 2, 1, 3)
        freqs = einsum("i , j -> i j", torch.arange(n, dtype=inv_freq.dtype), inv_freq)
        pos = torch.cat((freqs, freqs), dim=-1)
        q, k = (t * pos.cos() + _rotate_half(t) * pos.sin() for t in (q, k))
        q = q * dim_head**-0.5
        sim = einsum("b h i d, b j d -> b h i j", q, k)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = einsum("b h i j, b j d -> b h i d", attn, v).permute(0, 2, 1, 3).reshape(b, n, -1)
        query_tokens = out @ sd[p + "attn_out.weight"].T + _swiglu(ff) @ sd[p + "ff_out.1.weight"].T + query_tokens
    return query_tokens


def official_score(clip_model, processor_dir, prompt, image):
    """upstream eval_overall_mps_on_*.py: infer_one_sample, for one image."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(str(processor_dir))
    clip_processor = CLIPImageProcessorPil.from_pretrained(str(processor_dir))

    def _tokenize(caption):
        return tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length",
                         truncation=True, return_tensors="pt").input_ids

    image_input = clip_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
    text_input = _tokenize(prompt)
    condition_batch = _tokenize(OFFICIAL_CONDITION).repeat(text_input.shape[0], 1)
    text_f, text_features = clip_model.model.get_text_features(text_input)
    image_f = clip_model.model.get_image_features(image_input)
    condition_f, _ = clip_model.model.get_text_features(condition_batch)
    sim_text_condition = einsum("b i d, b j d -> b j i", text_f, condition_f)
    sim_text_condition = torch.max(sim_text_condition, dim=1, keepdim=True)[0]
    sim_text_condition = sim_text_condition / sim_text_condition.max()
    mask = torch.where(sim_text_condition > 0.3, 0, float("-inf"))
    mask = mask.repeat(1, image_f.shape[1], 1)
    cross_sd = clip_model.cross_model.state_dict()
    heads = clip_model.cross_model.layers[0][0].fn.heads
    image_features = reference_cross_model(cross_sd, image_f, text_f, mask, heads)[:, 0, :]
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    image_score = clip_model.logit_scale.exp() * text_features @ image_features.T
    return image_score[0].item(), int((mask[0, 0] == 0).sum())


# ----------------------------------------------------------------- tests


def test_restricted_unpickler_recovers_every_tensor(release, vocab_size):
    pickled_module = build_tiny_mps_module(vocab_size, seed=0)  # what write_tiny_mps pickled
    expected = pickled_module.state_dict()
    got = read_module_tensors(release["checkpoint"])
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    root = restricted_load(release["checkpoint"])
    assert isinstance(root, StandIn) and "CLIPModel" in repr(root)  # nothing was imported or rebuilt


def test_scores_match_upstream_inference(release, vocab_size, scorer, images):
    assert CONDITION == OFFICIAL_CONDITION
    clip_model = build_tiny_mps_module(vocab_size, seed=0)
    with torch.no_grad():
        ref, kept = zip(*(official_score(clip_model, release["processor"], p, im) for p, im in zip(PROMPTS, images)))
    assert min(kept) < 77, "the condition mask should drop some text tokens, or it goes untested"
    ours = scorer.score(PROMPTS, images)
    assert ours.dtype == np.float64 and ours.shape == (len(PROMPTS),)
    np.testing.assert_allclose(ours, np.array(ref), atol=1e-4, rtol=1e-5)


def test_batch_equals_one_by_one(scorer, images):
    batch = scorer.score(PROMPTS, images)
    single = np.array([scorer.score([p], [im])[0] for p, im in zip(PROMPTS, images)])
    np.testing.assert_allclose(batch, single, atol=1e-5, rtol=1e-6)


def test_pth_and_converted_safetensors_give_identical_scores(tmp_path, release, scorer, images):
    dst = convert_mps_checkpoint(release["checkpoint"], tmp_path / "MPS_overall_checkpoint.safetensors")
    assert set(load_file(str(dst))) == set(read_module_tensors(release["checkpoint"]))
    converted = MPSScorer.from_release(dst, release["processor"])
    np.testing.assert_array_equal(converted.score(PROMPTS, images), scorer.score(PROMPTS, images))


def test_tiny_scores_spread(scorer, images):
    over_images = scorer.score([PROMPTS[0]] * len(images), images)
    over_prompts = scorer.score(PROMPTS, [images[0]] * len(PROMPTS))
    assert np.isfinite(over_images).all() and over_images.std() > 0.1 and over_prompts.std() > 0.1


def test_zoo_is_deterministic(tmp_path, release):
    again = write_tiny_mps(tmp_path / "again", seed=0)
    other = write_tiny_mps(tmp_path / "other", seed=1)
    a, b = read_module_tensors(release["checkpoint"]), read_module_tensors(again["checkpoint"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("vocab.json", "merges.txt", "config.json", "preprocessor_config.json"):
        assert (release["processor"] / name).read_bytes() == (again["processor"] / name).read_bytes()
    c = read_module_tensors(other["checkpoint"])
    assert not torch.equal(a["cross_model.layers.0.0.fn.to_q.weight"], c["cross_model.layers.0.0.fn.to_q.weight"])


# ----------------------------------------------------------------- hostile and broken files


class _Payload:
    """Unpickling this creates `path`: a stand-in for `os.system(...)`, harmless to run in a test."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _ExecPayload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


def test_payload_is_live_under_plain_pickle(tmp_path):
    marker = tmp_path / "plain"
    pickle.Unpickler(io.BytesIO(pickle.dumps(_Payload(marker), protocol=2))).load()
    assert marker.exists()  # so the tests below would notice if the payload ran


@pytest.mark.parametrize("payload", [_Payload, _ExecPayload])
def test_restricted_unpickler_runs_no_code(tmp_path, payload):
    marker = tmp_path / "pwned"
    module = torch.nn.Linear(3, 2)
    module.hook = payload(marker)  # plain attribute: pickled in the module's __dict__
    torch.save(module, tmp_path / "evil_module.pth")
    tensors = read_module_tensors(tmp_path / "evil_module.pth")
    assert set(tensors) == {"weight", "bias"} and torch.equal(tensors["weight"], module.weight.detach())
    torch.save({"model": payload(marker)}, tmp_path / "evil_root.pth")
    with pytest.raises(ValueError, match="evil_root.pth"):
        read_module_tensors(tmp_path / "evil_root.pth")
    assert not marker.exists()


def test_restricted_unpickler_rejects_non_checkpoints(tmp_path):
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="raw.pkl"):
        read_module_tensors(tmp_path / "raw.pkl")
    with zipfile.ZipFile(tmp_path / "fake.pth", "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(("storage", 1, 2), protocol=2)[:-3])  # truncated
    with pytest.raises(ValueError, match="fake.pth"):
        read_module_tensors(tmp_path / "fake.pth")


def test_missing_files_name_the_path(tmp_path, release):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        MPSScorer.from_release(tmp_path / "nowhere" / "MPS_overall_checkpoint.pth", release["processor"])
    with pytest.raises(FileNotFoundError, match="no_processor"):
        MPSScorer.from_release(release["checkpoint"], tmp_path / "no_processor")


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_bad_keys_name_the_file(tmp_path, release, change):
    tensors = {k: v.contiguous().clone() for k, v in read_module_tensors(release["checkpoint"]).items()}
    if change == "missing":
        del tensors["cross_model.layers.1.1.fn.attn_out.weight"]
    else:
        tensors["cross_models.0.layers.0.0.fn.to_q.weight"] = torch.zeros(2, 2)
    bad = tmp_path / "broken_mps.safetensors"
    save_file(tensors, str(bad))
    with pytest.raises(ValueError, match="broken_mps.safetensors"):
        MPSScorer.from_release(bad, release["processor"])


def test_restricted_unpickler_reads_other_tensor_forms(tmp_path):
    module = torch.nn.Linear(2, 3).half()
    module.register_buffer("steps", torch.arange(4))
    module.steps.note = "python attribute"  # pickled through torch._tensor._rebuild_from_type_v2
    module.register_buffer("cache", torch.ones(2), persistent=False)
    torch.save(module, tmp_path / "m.pth")
    got = read_module_tensors(tmp_path / "m.pth")
    assert set(got) == {"weight", "bias", "steps"}  # non-persistent buffers are skipped, like state_dict
    assert got["weight"].dtype == torch.float16 and torch.equal(got["steps"], torch.arange(4))
    torch.save(module.state_dict(), tmp_path / "sd.pth")  # a plain state_dict is returned as is
    assert set(read_module_tensors(tmp_path / "sd.pth")) == {"weight", "bias", "steps"}
