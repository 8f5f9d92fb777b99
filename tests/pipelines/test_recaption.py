"""Recaptioning: the transformers back end on the tiny Qwen2-VL, and the vLLM processor's
pre/post-processing (vLLM itself needs a GPU and is not installed here)."""

from __future__ import annotations

import base64
import importlib.util
import io
import json

import numpy as np
import pytest
from PIL import Image

from layton.zoo.qwen2vl import write_tiny_qwen2vl
from pipelines import recaption
from pipelines.recaption import (
    DEFAULT_INSTRUCTION,
    TransformersRecaptioner,
    build_vllm_recaptioner,
    render_instruction,
    vllm_postprocess_row,
    vllm_preprocess_row,
    vllm_processor_config,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return write_tiny_qwen2vl(tmp_path_factory.mktemp("qwen") / "tiny-qwen2vl", seed=0)


@pytest.fixture(scope="module")
def recaptioner(qwen_dir):
    return TransformersRecaptioner(qwen_dir, max_new_tokens=12)


def _arrays():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)]


def _jpeg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _rows():
    a, b = _arrays()
    return [
        {"id": "s0", "prompt": "a red cat", "image": _jpeg(a), "status": "accepted", "seed": 7},
        {"id": "s1", "prompt": "a blue castle", "image": b"", "status": "carrier", "seed": 8},
    ]


def test_render_instruction():
    assert render_instruction(DEFAULT_INSTRUCTION, "x") == DEFAULT_INSTRUCTION
    assert render_instruction('Prompt: "{prompt}". Describe {it}.', "a cat") == 'Prompt: "a cat". Describe {it}.'


def test_transformers_recaptioner(recaptioner):
    images = [Image.fromarray(a) for a in _arrays()]
    prompts = ["a red cat", "a blue castle"]
    batch = recaptioner.caption(images, prompts)
    assert len(batch) == 2 and all(isinstance(c, str) and c and c == c.strip() for c in batch)
    assert recaptioner.caption(images, prompts) == batch  # deterministic
    # Left-padded batch vs one image at a time: identical greedy tokens on CPU.
    assert [recaptioner.caption([im], [p])[0] for im, p in zip(images, prompts)] == batch
    assert recaptioner.caption([], []) == []


def test_transformers_recaptioner_prompt_placeholder_and_pixels(qwen_dir, recaptioner):
    r = TransformersRecaptioner(
        qwen_dir, instruction="The prompt was {prompt}. " + DEFAULT_INSTRUCTION, max_new_tokens=12,
        min_pixels=28 * 28, max_pixels=56 * 56,
    )  # fmt: skip
    images = [Image.fromarray(a) for a in _arrays()]
    out = r.caption(images, ["a red cat", "a blue castle"])
    assert all(out) and out != recaptioner.caption(images, ["a red cat", "a blue castle"])
    grid = r.processor(text=["<|image_pad|>"] * 2, images=images, padding=True, **r._images_kwargs)
    assert grid["image_grid_thw"].tolist() == [[1, 4, 4], [1, 2, 4]]  # within the 56^2 budget


def _data_url_bytes(url: str, mime: str) -> bytes:
    assert url.startswith(f"data:{mime};base64,")
    return base64.b64decode(url.split(",", 1)[1])


def test_preprocess_builds_chat_request():
    accepted, rejected = _rows()
    out = vllm_preprocess_row(accepted, instruction="Prompt: {prompt}. Describe.", max_new_tokens=64)
    (msg,) = out["messages"]
    assert msg["role"] == "user"
    image_part, text_part = msg["content"]
    assert image_part["type"] == "image_url"
    assert _data_url_bytes(image_part["image_url"]["url"], "image/jpeg") == accepted["image"]  # the stored bytes as is
    assert text_part == {"type": "text", "text": "Prompt: a red cat. Describe."}
    assert out["sampling_params"] == {"temperature": 0.0, "max_tokens": 64, "skip_special_tokens": True}

    cheap = vllm_preprocess_row(rejected, instruction=DEFAULT_INSTRUCTION, max_new_tokens=64)
    assert cheap["sampling_params"]["max_tokens"] == 1
    placeholder = Image.open(io.BytesIO(_data_url_bytes(cheap["messages"][0]["content"][0]["image_url"]["url"], "image/png")))
    assert placeholder.size == (28, 28) and not np.asarray(placeholder).any()


def test_request_renders_with_the_model_chat_template(qwen_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(qwen_dir)
    messages = vllm_preprocess_row(_rows()[0], instruction=DEFAULT_INSTRUCTION, max_new_tokens=8)["messages"]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>Describe this image in detail.<|im_end|>" in text


def _fake_engine(row: dict) -> dict:
    """What the chat-template/engine stages do to a row: overwrite `prompt`, add outputs."""
    return {**row, "prompt": "<|im_start|>rendered", "generated_text": f"  caption of {row['id']} \n"}


def test_postprocess_restores_columns_and_adds_recaption():
    for row in _rows():
        pre = {**row, **vllm_preprocess_row(row, instruction=DEFAULT_INSTRUCTION, max_new_tokens=8)}
        out = vllm_postprocess_row(_fake_engine(pre))
        assert list(out) == [*row, "recaption", "recaption_error"]
        assert out["prompt"] == row["prompt"] and out["seed"] == row["seed"] and out["image"] == row["image"]
        assert out["recaption"] == ("caption of s0" if row["status"] == "accepted" else "")


def test_model_column_is_not_read_as_lora_name():
    row = {**_rows()[0], "model": "flux-dev"}
    with pytest.raises(ValueError, match="model_source"):
        vllm_preprocess_row(row, instruction=DEFAULT_INSTRUCTION, max_new_tokens=8)
    pre = {**row, **vllm_preprocess_row(row, instruction=DEFAULT_INSTRUCTION, max_new_tokens=8, model_source="/m")}
    assert pre["model"] == "/m"  # what the engine stage sees
    assert vllm_postprocess_row(_fake_engine(pre))["model"] == "flux-dev"


def test_pre_and_postprocess_through_ray_data():
    """The row layout survives Ray Data's Arrow blocks, wrapped the way ray.data.llm wraps them."""
    import ray
    from ray.llm._internal.batch.stages.base import wrap_postprocess, wrap_preprocess

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        from functools import partial

        fn = partial(vllm_preprocess_row, instruction=DEFAULT_INSTRUCTION, max_new_tokens=8)
        pre = wrap_preprocess(fn, "__data")
        post = wrap_postprocess(vllm_postprocess_row, "__data")
        ds = ray.data.from_items(_rows()).map(pre).map(lambda r: {"__data": _fake_engine(r["__data"])}).map(post)
        out = sorted(ds.take_all(), key=lambda r: r["id"])
    finally:
        if started:
            ray.shutdown()
    assert [set(r) for r in out] == [{"id", "prompt", "image", "status", "seed", "recaption", "recaption_error"}] * 2
    assert [r["prompt"] for r in out] == ["a red cat", "a blue castle"]
    assert [r["recaption"] for r in out] == ["caption of s0", ""]
    assert [r["image"] for r in out] == [r["image"] for r in _rows()]


def _scored_shard(shard: int, statuses: list[str]) -> dict:
    n = len(statuses)
    return {"shard": shard, "ids": [f"k{shard}_{i}" for i in range(n)], "prompts": [f"p{i}" for i in range(n)],
            "sources": ["f.parquet"] * n, "rows": list(range(n)), "seeds": list(range(n)), "status": statuses,
            "reason": ["" if s == "accepted" else "mps_below_threshold" for s in statuses], "recaption": [""] * n,
            "imagereward": [1.0] * n, "mps": [float("nan")] * n,
            "image": [_jpeg(_arrays()[0]) if s == "accepted" else b"" for s in statuses], "processed_by": "{}"}


def test_only_accepted_samples_reach_the_engine_and_shards_are_reassembled(tmp_path):
    """One request per accepted sample plus one carrier per shard; the assembler writes a shard once
    its carrier and all its requests arrived, in any order and interleaved with other shards."""
    from pipelines.recaption import ShardAssembler, vllm_rows
    from pipelines.shard_rows import pack
    from pipelines.shards import complete_shards, read_index

    a, b = _scored_shard(0, ["accepted", "rejected", "accepted"]), _scored_shard(1, ["rejected", "rejected"])
    requests = vllm_rows(a) + vllm_rows(b)
    assert [r["status"] for r in requests] == ["accepted", "accepted", "carrier", "carrier"]  # no rejected request
    engine_out = []
    for r in requests:
        pre = {**r, **vllm_preprocess_row(r, instruction=DEFAULT_INSTRUCTION, max_new_tokens=8)}
        done = vllm_postprocess_row({**pre, "generated_text": f"caption {r['index']}",
                                     "__inference_error__": "ValueError: bad" if r["index"] == 2 else ""})
        engine_out.append({k: v for k, v in done.items()})
    assembler = ShardAssembler(str(tmp_path), {"generator": None}, "jpg", "f" * 16)
    written = []
    for r in [engine_out[3], engine_out[1], engine_out[2], engine_out[0]]:  # shard 1 completes first
        written += list(assembler(pack([r]))["stats"])
    assert [json.loads(s)["shard"] for s in written] == [1, 0] and not assembler.pending
    index = {r["key"]: r for r in read_index(tmp_path).to_pylist()}
    assert index["k0_0"]["status"] == "accepted" and index["k0_0"]["recaption"] == "caption 0"
    assert index["k0_2"]["status"] == "failed" and index["k0_2"]["reason"] == "recaption_error: ValueError: bad"
    assert index["k0_1"]["reason"] == "mps_below_threshold" and index["k1_0"]["status"] == "rejected"
    assert sorted(complete_shards(tmp_path)) == [0, 1]


def test_processor_config_builds(qwen_dir):
    config = vllm_processor_config(
        qwen_dir, concurrency=2, batch_size=8, engine_kwargs={"max_model_len": 2048}, num_gpus_per_instance=2
    )
    assert config.model_source == str(qwen_dir)
    assert (config.concurrency, config.batch_size) == (2, 8)
    kw = config.engine_kwargs
    assert kw["tensor_parallel_size"] == 2 and kw["max_model_len"] == 2048
    assert kw["limit_mm_per_prompt"] == {"image": 1}
    assert kw["trust_remote_code"] is False
    assert config.should_continue_on_error  # a failing request is a failed sample


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_vllm_missing_names_the_gpu_extra(qwen_dir):
    with pytest.raises(ImportError, match="`gpu` extra"):
        build_vllm_recaptioner(qwen_dir, max_new_tokens=8, concurrency=1, batch_size=2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM (the `gpu` extra) and a GPU")
def test_vllm_recaptioner_end_to_end(qwen_dir):
    import ray

    processor = build_vllm_recaptioner(
        qwen_dir, instruction=DEFAULT_INSTRUCTION, max_new_tokens=8, concurrency=1, batch_size=2,
        engine_kwargs={"enforce_eager": True, "gpu_memory_utilization": 0.3},
    )  # fmt: skip
    out = sorted(processor(ray.data.from_items(_rows())).take_all(), key=lambda r: r["id"])
    assert [r["prompt"] for r in out] == ["a red cat", "a blue castle"]
    assert out[0]["recaption"] and out[1]["recaption"] == ""


def test_module_has_no_eager_vllm_import():
    assert "vllm" not in vars(recaption)
