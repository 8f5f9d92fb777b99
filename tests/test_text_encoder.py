"""LaytonGen's flan-t5 text features against a direct T5EncoderModel forward (tiny flan-t5-xl)."""

from __future__ import annotations

import shutil

import pytest
import torch

from layton.model_files import ModelFileError
from layton.text_encoder import T5_MAX_LENGTH, T5TextEncoder, left_pad, pad_valid_tokens
from layton.zoo.flan_t5 import write_tiny_flan_t5

L = T5_MAX_LENGTH
PROMPTS = ["a red car", "a photo of a cat sitting on a sofa near the window", "", "dog"]
LONG = " ".join(["a red car parked on the street"] * 50)  # 350 words


@pytest.fixture(scope="module")
def flan_dir(tmp_path_factory, one_torch_thread):
    return write_tiny_flan_t5(tmp_path_factory.mktemp("flan_t5") / "flan-t5-xl", seed=0)


@pytest.fixture(scope="module")
def encoder(flan_dir):
    return T5TextEncoder(str(flan_dir))


def test_features_equal_direct_forward_left_padded(flan_dir, encoder):
    from transformers import AutoTokenizer, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(flan_dir)(PROMPTS, max_length=L, padding="max_length", truncation=True,
                                                  return_tensors="pt")  # fmt: skip
    model = T5EncoderModel.from_pretrained(flan_dir).eval()
    with torch.no_grad():
        right = model(**tok).last_hidden_state
    out = encoder.encode(PROMPTS)
    assert out.features.shape == (len(PROMPTS), L, encoder.dim) and out.features.dtype == torch.float32
    for i, n in enumerate(tok["attention_mask"].sum(1).tolist()):
        assert torch.equal(out.features[i, L - n :], right[i, :n])  # valid rows moved to the end, unchanged
        assert torch.equal(out.features[i, : L - n], torch.zeros(L - n, encoder.dim))  # padding exactly zero
        assert out.mask[i].tolist() == [False] * (L - n) + [True] * n
        with torch.no_grad():  # padding never leaks into valid tokens: same as the unpadded forward
            alone = model(input_ids=tok["input_ids"][i : i + 1, :n]).last_hidden_state[0]
        torch.testing.assert_close(out.features[i, L - n :], alone, rtol=1e-5, atol=1e-5)


def test_token_counts_include_eos(encoder):
    out = encoder.encode(PROMPTS)
    assert out.mask.sum(1).tolist() == out.n_tokens
    for prompt, n in zip(PROMPTS, out.n_tokens):
        ids = encoder.tokenizer(prompt)["input_ids"]
        assert n == len(ids) == len(encoder.tokenizer(prompt, add_special_tokens=False)["input_ids"]) + 1
        assert ids[-1] == encoder.tokenizer.eos_token_id


def test_truncation_and_empty_prompt(encoder):
    out = encoder.encode([LONG, "a red car", ""])
    assert out.n_tokens == [L, 4, 1] and out.truncated == [True, False, False]
    assert out.mask[0].all() and out.mask[2].tolist() == [False] * (L - 1) + [True]


def test_pad_valid_tokens_round_trip(encoder):
    prompts = [*PROMPTS, LONG]
    rows, truncated = encoder.encode_valid(prompts)
    out = encoder.encode(prompts)
    assert [r.shape for r in rows] == [(n, encoder.dim) for n in out.n_tokens] and truncated == out.truncated
    features, mask = pad_valid_tokens(rows)
    assert torch.equal(mask, out.mask)
    assert torch.equal(features, out.features.half().float())  # stored rows are float16


def test_pad_valid_tokens_cuts_long_rows_and_left_pad_matches():
    rows = [torch.arange(6.0).reshape(3, 2), torch.ones(0, 2), torch.arange(10.0).reshape(5, 2)]
    features, mask = pad_valid_tokens(rows, max_length=4)
    assert mask.tolist() == [[False, True, True, True], [False] * 4, [True] * 4]
    assert features[2].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]] and features[0, 0].tolist() == [0, 0]
    right = torch.full((3, 4, 2), 9.0)  # the tokenizer's layout: valid rows first, padding garbage
    right[0, :3], right[2] = rows[0], rows[2][:4]
    right_mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    lp_features, lp_mask = left_pad(right, right_mask)
    assert torch.equal(lp_features, features) and torch.equal(lp_mask, mask)


def test_prompt_normalization(encoder):
    a, b = encoder.encode(["  A Red CAR "]), encoder.encode(["a red car"])
    assert torch.equal(a.features, b.features) and a.n_tokens == b.n_tokens


def test_missing_directory_is_a_model_file_error(tmp_path):
    missing = tmp_path / "no-flan-t5-here"
    with pytest.raises(ModelFileError, match=str(missing)):
        T5TextEncoder(str(missing))


def test_missing_encoder_weights_are_an_error(flan_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(flan_dir, tmp_path / "broken")
    state = load_file(broken / "model.safetensors")
    del state["encoder.final_layer_norm.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="encoder.final_layer_norm.weight"):
        T5TextEncoder(str(broken))


def test_writer_is_deterministic(flan_dir, tmp_path):
    again = write_tiny_flan_t5(tmp_path / "again", seed=0)
    assert (again / "model.safetensors").read_bytes() == (flan_dir / "model.safetensors").read_bytes()
    assert (again / "config.json").read_text() == (flan_dir / "config.json").read_text()
