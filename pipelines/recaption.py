"""Recaptioning generated images with Qwen2-VL.

Two back ends with the same prompt and the same greedy decoding:

- `TransformersRecaptioner`: transformers `generate` in-process; runs anywhere (the CPU tests,
  the embedded default with the tiny zoo model), one batched call per `caption(...)`.
- `build_vllm_recaptioner`: a Ray Data LLM processor (`ray.data.llm`) running vLLM engines on
  GPUs; maps a Dataset of sample rows to the same rows plus a `recaption` column. In synthesis
  only accepted samples become requests (`vllm_rows`), with one cheap carrier request per shard
  holding the rest of the shard; `ShardAssembler` puts each shard back together and writes it.

The instruction is a user turn holding the image and a text part; an optional `{prompt}`
placeholder in the instruction is replaced by the sample's generation prompt.
"""

from __future__ import annotations

import base64
import json
from functools import partial
from typing import Any

import numpy as np

from layton.storage import Root
from pipelines.shard_rows import ACCEPTED, FAILED, SAMPLE_COLUMNS, indices_with
from pipelines.shard_rows import unpack
from pipelines.shards import write_shard

DEFAULT_INSTRUCTION = "Describe this image in detail."


def render_instruction(instruction: str, prompt: str) -> str:
    """The instruction with `{prompt}` replaced; plain replace, so other braces stay literal."""
    return instruction.replace("{prompt}", prompt)


def chat_messages(image_part: dict, text: str) -> list[dict]:
    """One user turn, image first then text, as Qwen2-VL's examples order them."""
    return [{"role": "user", "content": [image_part, {"type": "text", "text": text}]}]


class TransformersRecaptioner:
    """Greedy Qwen2-VL captions with transformers; deterministic for fixed inputs."""

    def __init__(
        self,
        model_path,
        *,
        instruction: str = DEFAULT_INSTRUCTION,
        max_new_tokens: int = 128,
        device: str = "cpu",
        dtype: str = "float32",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.instruction = instruction
        self.max_new_tokens = max_new_tokens
        self.device = torch.device(device)
        self.processor = AutoProcessor.from_pretrained(str(model_path), trust_remote_code=False)
        # Decoder-only batching: pad on the left so every row's new tokens start at the same index.
        self.processor.tokenizer.padding_side = "left"
        # The image processor's pixel budget decides the number of vision tokens per image.
        current = self.processor.image_processor.size
        size = {
            "shortest_edge": int(min_pixels) if min_pixels is not None else current["shortest_edge"],
            "longest_edge": int(max_pixels) if max_pixels is not None else current["longest_edge"],
        }
        self._images_kwargs = {"size": size} if (min_pixels, max_pixels) != (None, None) else {}
        self.model = AutoModelForImageTextToText.from_pretrained(
            str(model_path), dtype=getattr(torch, dtype), trust_remote_code=False
        ).to(self.device)
        self.model.eval()

    def caption(self, images: list, prompts: list[str]) -> list[str]:
        """Captions for PIL images; `prompts` are their generation prompts (for `{prompt}`)."""
        import torch

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        texts = [
            self.processor.apply_chat_template(
                chat_messages({"type": "image"}, render_instruction(self.instruction, p)),
                add_generation_prompt=True,
                tokenize=False,
            )
            for p in prompts
        ]
        inputs = self.processor(
            text=texts,
            images=[im.convert("RGB") for im in images],
            padding=True,
            return_tensors="pt",
            **self._images_kwargs,
        ).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1
            )  # (B, prompt_len + new_len)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]


# --------------------------------------------------------------------------------------------
# vLLM through ray.data.llm
# --------------------------------------------------------------------------------------------

# Columns the ray.data.llm stages read or write. An input column of the same name would be
# overwritten on the way through, so its value is stashed and restored (in practice: `prompt`,
# which the chat-template and engine stages use for the rendered LLM prompt).
ENGINE_COLUMNS = frozenset(
    {
        "prompt", "messages", "sampling_params", "multimodal_data", "multimodal_uuids",
        "mm_processor_kwargs", "tokenization_kwargs", "tokenized_prompt", "prompt_token_ids",
        "num_input_tokens", "generated_tokens", "generated_text", "num_generated_tokens",
        "embeddings", "metrics", "logprobs", "prompt_logprobs", "request_id", "batch_uuid",
        "time_taken_llm", "params", "model",
    }
)  # fmt: skip
_COLUMNS_KEY = "layton_columns"  # original column names, in order
_STASH_KEY = "layton_stash"  # original values of columns in ENGINE_COLUMNS

# A request that carries no image to caption (a shard's carrier row) is the cheapest request of
# the same shape: a 28x28 black image (Qwen2-VL's minimum resize makes it 56x56, i.e. 4 vision
# tokens) and max_tokens=1. The same message structure for every row keeps the Arrow schema of
# `messages` uniform.
_PLACEHOLDER_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAIAAAD9b0jDAAAAGUlEQVR4nO3BMQEAAADCoPVPbQdvoAAAeA0JTAAB9ZfCmAAAAABJRU5ErkJggg=="
)
_MIME = {b"\xff\xd8": "image/jpeg", b"\x89P": "image/png", b"RI": "image/webp"}


def image_data_url(data: bytes) -> str:
    """Data URL of an encoded image, as stored (no re-encoding): a plain string through Arrow."""
    mime = _MIME.get(bytes(data[:2]))
    if mime is None:
        raise ValueError("image bytes are not JPEG, PNG or WebP")
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def vllm_preprocess_row(
    row: dict[str, Any], *, instruction: str, max_new_tokens: int, model_source: str | None = None
) -> dict[str, Any]:
    """Sample row -> the fields ray.data.llm's stages read (OpenAI-style chat + sampling params).

    Greedy (temperature 0) as the transformers back end. Returned keys are merged into the row.
    """
    accepted = row["status"] == ACCEPTED
    image = row["image"] if accepted else _PLACEHOLDER_PNG
    # The engine stage reads a `model` column as a LoRA adapter name when it differs from the
    # engine's model: an input column of that name must read as the base model on the way through.
    override = {}
    if "model" in row:
        if model_source is None:
            raise ValueError("rows have a `model` column: pass model_source so it is not read as a LoRA name")
        override["model"] = str(model_source)
    return {
        **override,
        "messages": chat_messages(
            {"type": "image_url", "image_url": {"url": image_data_url(image)}},
            render_instruction(instruction, str(row["prompt"])),
        ),
        "sampling_params": {
            "temperature": 0.0,
            "max_tokens": int(max_new_tokens) if accepted else 1,
            "skip_special_tokens": True,
        },
        _COLUMNS_KEY: [c for c in row if c not in (_COLUMNS_KEY, _STASH_KEY)],
        _STASH_KEY: {c: row[c] for c in row if c in ENGINE_COLUMNS},
    }


def vllm_postprocess_row(row: dict[str, Any]) -> dict[str, Any]:
    """Engine output row -> the original columns (restored) plus `recaption` ('' if not accepted)
    and `recaption_error` (the engine's error for this request, '' if none)."""
    stash = row[_STASH_KEY]
    out = {c: stash[c] if c in stash else row[c] for c in row[_COLUMNS_KEY]}
    out["recaption"] = str(row.get("generated_text") or "").strip() if out["status"] == ACCEPTED else ""
    out["recaption_error"] = str(row.get("__inference_error__") or "")
    return out


def vllm_processor_config(
    model_path,
    *,
    concurrency: int | tuple[int, int],
    batch_size: int,
    engine_kwargs: dict | None = None,
    num_gpus_per_instance: int = 1,
):
    """The `vLLMEngineProcessorConfig` for Qwen2-VL recaptioning (needs ray[data], not vLLM).

    One engine replica spans `num_gpus_per_instance` GPUs via tensor parallelism; `concurrency`
    is the number of replicas. The multimodal stage turns the image parts into vLLM
    multi_modal_data; the chat-template stage renders the model's own template; tokenizing is
    left to vLLM, which expands the image placeholders itself.
    """
    from ray.data.llm import vLLMEngineProcessorConfig

    kwargs = {
        "tensor_parallel_size": int(num_gpus_per_instance),
        "limit_mm_per_prompt": {"image": 1},
        "max_model_len": 4096,  # ~1.3k vision tokens at 1024^2 + instruction + caption
        "trust_remote_code": False,
        **(engine_kwargs or {}),
    }
    return vLLMEngineProcessorConfig(
        model_source=str(model_path),
        should_continue_on_error=True,  # a failing request is a failed sample, not a failed run
        engine_kwargs=kwargs,
        concurrency=concurrency,
        batch_size=batch_size,
        prepare_multimodal_stage={"enabled": True, "chat_template_content_format": "openai"},
        chat_template_stage=True,
        tokenize_stage=False,
        detokenize_stage=False,
    )


def require_vllm() -> None:
    """Fail early (before any cluster work) when the vLLM back end cannot run here."""
    try:
        import vllm  # noqa: F401
        from ray.data.llm import build_processor  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "recaption.backend 'vllm' needs vLLM and ray.data.llm: install the `gpu` extra "
            "(pip install 'layton-on-ray[gpu]') on the GPU nodes, or use backend 'transformers'. "
            f"({e})"
        ) from e


def build_vllm_recaptioner(
    model_path,
    *,
    instruction: str = DEFAULT_INSTRUCTION,
    max_new_tokens: int = 128,
    concurrency: int | tuple[int, int] = 1,
    batch_size: int = 16,
    engine_kwargs: dict | None = None,
    num_gpus_per_instance: int = 1,
):
    """A ray.data.llm processor: Dataset(prompt, image, status, ...) -> same rows + `recaption`."""
    require_vllm()
    from ray.data.llm import build_processor

    config = vllm_processor_config(
        model_path,
        concurrency=concurrency,
        batch_size=batch_size,
        engine_kwargs=engine_kwargs,
        num_gpus_per_instance=num_gpus_per_instance,
    )
    return build_processor(
        config,
        preprocess=partial(
            vllm_preprocess_row,
            instruction=instruction,
            max_new_tokens=max_new_tokens,
            model_source=config.model_source,
        ),
        postprocess=vllm_postprocess_row,
    )


# --------------------------------------------------------------------------------------------
# Synthesis through vLLM: shard rows -> requests -> shard rows again
# --------------------------------------------------------------------------------------------

CARRIER = "carrier"  # status of a shard's carrier row


def vllm_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A scored shard row -> one request row per accepted sample, plus the shard's carrier: the
    whole shard without images (JSON), which also tells the assembler how many requests to await."""
    accepted = indices_with(row, ACCEPTED)
    carried = {k: row[k] for k in SAMPLE_COLUMNS if k != "image"} | {"processed_by": row.get("processed_by", "{}")}
    common = {"shard": row["shard"], "requests": len(accepted)}
    out = [{**common, "index": i, "prompt": row["prompts"][i], "status": ACCEPTED, "image": row["image"][i], "carried": ""}
           for i in accepted]
    out.append({**common, "index": -1, "prompt": "", "status": CARRIER, "image": b"", "carried": json.dumps(carried)})
    return out


def assemble(carrier: dict[str, Any], captioned: list[dict[str, Any]]) -> dict[str, Any]:
    """The shard row again, with the captions (or the engine's error) of its accepted samples."""
    row = json.loads(carrier["carried"])
    row["shard"] = carrier["shard"]
    row["image"] = [b""] * len(row["ids"])
    for r in captioned:
        i = r["index"]
        if r["recaption_error"]:
            row["status"][i], row["reason"][i] = FAILED, "recaption_error: " + " ".join(r["recaption_error"].split())[:200]
        elif not r["recaption"].strip():
            row["status"][i], row["reason"][i] = FAILED, "empty_recaption"
        else:
            row["recaption"][i], row["image"][i] = r["recaption"], r["image"]
    return row


class ShardAssembler:
    """Collects a shard's request rows as they leave the engines, and writes the shard when its
    carrier and every request have arrived. One actor (`size=1`) sees every row; partial shards
    wait in its memory, so a lost assembler loses those shards (a rerun redoes them)."""

    def __init__(self, out: str, meta: dict, image_ext: str, fingerprint: str):
        self.root, self.meta, self.image_ext, self.fingerprint = Root(out), meta, image_ext, fingerprint
        self.pending: dict[int, list[dict]] = {}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        stats = []
        for r in unpack(batch):
            got = self.pending.setdefault(r["shard"], [])
            got.append(r)
            carrier = next((x for x in got if x["status"] == CARRIER), None)
            if carrier is not None and len(got) == carrier["requests"] + 1:
                del self.pending[r["shard"]]
                row = assemble(carrier, [x for x in got if x is not carrier])
                stats.append(json.dumps(write_shard(self.root, row, self.meta, self.image_ext, self.fingerprint)))
        return {"stats": np.array(stats, dtype=object)}
