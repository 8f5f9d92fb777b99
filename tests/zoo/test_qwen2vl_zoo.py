"""The tiny Qwen2-VL: release layout, offline loading, chat template, seeded weights, output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from layton.zoo.qwen2vl import SPECIAL_TOKENS, write_tiny_qwen2vl


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return write_tiny_qwen2vl(tmp_path_factory.mktemp("qwen") / "tiny-qwen2vl", seed=0)


@pytest.fixture(scope="module")
def loaded(qwen_dir):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(qwen_dir)
    model = Qwen2VLForConditionalGeneration.from_pretrained(qwen_dir).eval()
    return processor, model


def _images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (192, 256, 3), dtype=np.uint8)),
    ]


def _messages(text="Describe this image in detail."):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def test_release_layout(qwen_dir):
    for name in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]:
        assert (qwen_dir / name).is_file(), name
    assert not list(qwen_dir.rglob("*.bin"))
    config = json.loads((qwen_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl"
    vision = config["vision_config"]
    assert (vision["patch_size"], vision["temporal_patch_size"], vision["spatial_merge_size"]) == (14, 2, 2)
    assert vision["hidden_size"] == config["text_config"]["hidden_size"]


def test_writing_is_seeded(qwen_dir, tmp_path):
    ref = load_file(qwen_dir / "model.safetensors")
    same = load_file(write_tiny_qwen2vl(tmp_path / "same", seed=0) / "model.safetensors")
    other = load_file(write_tiny_qwen2vl(tmp_path / "other", seed=1) / "model.safetensors")
    assert same.keys() == ref.keys() and all(torch.equal(same[k], ref[k]) for k in ref)
    assert any(not torch.equal(other[k], ref[k]) for k in ref)


def test_tokenizer_and_special_tokens(loaded):
    processor, model = loaded
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS))) and ids[-1] == len(tok) - 1
    for t in SPECIAL_TOKENS:  # each special token is one id, never split
        assert tok(t, add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids(t)]
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = "A photo of a Cat, standing on 42 tables.\nNew line!"
    assert tok.decode(tok(text).input_ids) == text  # byte-level BPE round-trips any text


def test_chat_template_and_vision_tokens(loaded):
    processor, _ = loaded
    text = processor.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image in detail.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    inputs = processor(text=[text, text], images=_images(), padding=True, return_tensors="pt")
    # 64^2 -> min 56^2 -> 4x4 patches -> 4 tokens; 192x256 -> max 112^2 budget -> 6x8 patches -> 12.
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 6, 8]]
    n_image_tokens = (inputs["input_ids"] == processor.image_token_id).sum(dim=1)
    assert n_image_tokens.tolist() == [4, 12]


def test_greedy_generation_gives_text(loaded):
    processor, model = loaded
    processor.tokenizer.padding_side = "left"
    text = processor.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text, text], images=_images(), padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    assert new.shape[1] == 16  # special tokens (eos included) are never predicted: runs to the limit
    captions = [c.strip() for c in processor.batch_decode(new, skip_special_tokens=True)]
    assert all(c and c.replace(" ", "").isalpha() for c in captions), captions
    assert captions[0] != captions[1]  # the image matters
