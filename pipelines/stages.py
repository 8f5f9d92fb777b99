"""Ray Data stages of the synthesis pipeline: callable classes over chunk rows.

`__init__` loads the model once per actor; `__call__(batch)` maps a batch of chunk rows. Each class
also has a plain `process(chunk)` that works without Ray. A failure is kept to the samples it
concerns: a chunk whose model call raises is retried one sample at a time, and a sample that still
fails is marked `failed` with the error as its reason; the run goes on.
"""

from __future__ import annotations

import io
import logging
import math
import time
from abc import ABC, abstractmethod
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from layton.config import GenerationConfig, RecaptionConfig, ScoringConfig
from layton.devices import pick_device, pick_dtype
from pipelines.chunks import ACCEPTED, FAILED, GENERATED, PENDING, REJECTED, indices_with, pack, unpack
from pipelines.metrics import SynthMetrics

log = logging.getLogger(__name__)


def _error_reason(stage: str, err: BaseException) -> str:
    msg = " ".join(str(err).split())[:200]
    return f"{stage}_error: {type(err).__name__}: {msg}"


def run_isolated(stage: str, fn: Callable[[list[int]], None], idx: list[int], row: dict) -> None:
    """`fn(indices)` on the whole chunk; if it raises, once per sample, marking failures."""
    if not idx:
        return
    try:
        fn(idx)
        return
    except Exception as err:  # noqa: BLE001 — any model error is a per-sample outcome
        if len(idx) == 1:
            row["status"][idx[0]], row["reason"][idx[0]] = FAILED, _error_reason(stage, err)
            return
        log.warning("%s failed on a chunk of %d (%s); retrying one by one", stage, len(idx), err)
    for i in idx:
        run_isolated(stage, fn, [i], row)


class _ChunkStage(ABC):
    """Shared Ray plumbing: batches of chunk rows in, batches of chunk rows out."""

    name = "stage"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return pack([self.process(row) for row in unpack(batch)])

    @abstractmethod
    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        """One chunk row in, the same row with this stage's columns filled in out."""

    def _timed(self, fn: Callable[[], Any], items: int) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.metrics.latency(self.name, time.perf_counter() - t0, items)
        return out


class GenerateStage(_ChunkStage):
    """FLUX.1-dev text-to-image with diffusers' FluxPipeline; one seeded generator per prompt."""

    name = "generate"

    def __init__(self, cfg: dict):
        from diffusers import FluxPipeline

        self.cfg = GenerationConfig.model_validate(cfg)
        self.device = pick_device(self.cfg.resources.device)
        dtype = pick_dtype(self.cfg.dtype, self.device)
        self.pipe = FluxPipeline.from_pretrained(self.cfg.model, dtype=dtype).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.metrics = SynthMetrics()

    def generate(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        """(n, H, W, 3) uint8. Raises on non-finite output (fp16 overflow shows up as NaN)."""
        c = self.cfg
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        images = self.pipe(
            prompt=prompts,
            height=c.height,
            width=c.width,
            num_inference_steps=c.num_inference_steps,
            guidance_scale=c.guidance_scale,
            max_sequence_length=c.max_sequence_length,
            generator=generators,
            output_type="np",
        ).images
        if not np.isfinite(images).all():
            raise FloatingPointError("generated image has non-finite pixels")
        return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        c = self.cfg
        images = np.zeros((len(row["ids"]), c.height, c.width, 3), np.uint8)

        def run(idx: list[int]) -> None:
            out = self._timed(lambda: self.generate([row["prompts"][i] for i in idx], [row["seeds"][i] for i in idx]), len(idx))
            for j, i in enumerate(idx):
                images[i] = out[j]
                row["status"][i] = GENERATED

        todo = indices_with(row, PENDING)
        run_isolated(self.name, run, todo, row)
        self.metrics.count("generated", len(indices_with(row, GENERATED)), "images generated")
        row["images"] = images
        return row


class ScoreStage(_ChunkStage):
    """ImageReward and MPS against the original prompt, then the threshold filter."""

    name = "score"

    def __init__(self, cfg: dict):
        from layton.scorers.imagereward import ImageRewardScorer
        from layton.scorers.mps import MPSScorer

        self.cfg = ScoringConfig.model_validate(cfg)
        device = pick_device(self.cfg.resources.device)
        dtype = pick_dtype(self.cfg.dtype, device)
        ir = self.cfg.imagereward
        self.imagereward = ImageRewardScorer.from_release(ir.checkpoint, ir.med_config, ir.tokenizer, device=device, dtype=dtype)
        self.mps = MPSScorer.from_release(self.cfg.mps.checkpoint, self.cfg.mps.processor, device=device, dtype=dtype)
        self.metrics = SynthMetrics()

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        c = self.cfg

        def run(idx: list[int]) -> None:
            prompts = [row["prompts"][i] for i in idx]
            pils = [Image.fromarray(row["images"][i]) for i in idx]
            ir, mps = self._timed(lambda: (self.imagereward.score(prompts, pils), self.mps.score(prompts, pils)), len(idx))
            self.metrics.scores(list(map(float, ir)), list(map(float, mps)))
            for j, i in enumerate(idx):
                row["imagereward"][i], row["mps"][i] = float(ir[j]), float(mps[j])
                reasons = []
                if not ir[j] >= c.imagereward_threshold:  # NaN fails too
                    reasons.append("imagereward_below_threshold")
                if not mps[j] >= c.mps_threshold:
                    reasons.append("mps_below_threshold")
                row["status"][i] = REJECTED if reasons else ACCEPTED
                row["reason"][i] = ";".join(reasons)

        run_isolated(self.name, run, indices_with(row, GENERATED), row)
        for reason in (r for i in indices_with(row, REJECTED) for r in row["reason"][i].split(";") if "threshold" in r):
            self.metrics.count("rejected", 1, "samples rejected", reason=reason)
        return row


class RecaptionStage(_ChunkStage):
    """Qwen2-VL recaption with transformers (the CPU path; vLLM runs through ray.data.llm)."""

    name = "recaption"

    def __init__(self, cfg: dict, statuses: tuple[str, ...] = (ACCEPTED,)):
        from pipelines.recaption import TransformersRecaptioner

        self.cfg = RecaptionConfig.model_validate(cfg)
        device = pick_device(self.cfg.resources.device)
        self.model = TransformersRecaptioner(
            self.cfg.model,
            instruction=self.cfg.instruction,
            max_new_tokens=self.cfg.max_new_tokens,
            device=str(device),
            dtype=str(pick_dtype(self.cfg.dtype, device)).removeprefix("torch."),
        )
        self.statuses = statuses  # which samples get a caption: accepted (score first) or generated
        self.metrics = SynthMetrics()

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        def run(idx: list[int]) -> None:
            pils = [Image.fromarray(row["images"][i]) for i in idx]
            prompts = [row["prompts"][i] for i in idx]
            captions = self._timed(lambda: self.model.caption(pils, prompts), len(idx))
            for j, i in enumerate(idx):
                row["recaption"][i] = captions[j]

        run_isolated(self.name, run, indices_with(row, self.statuses), row)
        mark_empty_captions(row, self.statuses)
        return row


def mark_empty_captions(row: dict[str, Any], statuses: tuple[str, ...]) -> None:
    """A sample meant to be captioned that got an empty caption cannot be trained on."""
    for i in indices_with(row, statuses):
        if not row["recaption"][i].strip():
            row["status"][i], row["reason"][i] = FAILED, "empty_recaption"


def encode_image(image: np.ndarray, image_format: str, jpeg_quality: int) -> bytes:
    buf = io.BytesIO()
    options = {"quality": jpeg_quality} if image_format in ("jpg", "webp") else {}
    Image.fromarray(image).save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[image_format], **options)
    return buf.getvalue()


def _none_for_nan(values: list[float]) -> list[float | None]:
    return [None if v is None or math.isnan(v) else v for v in values]


def encode_chunks(batch: dict[str, np.ndarray], image_format: str, jpeg_quality: int) -> dict[str, Any]:
    """Last stage before the writer: accepted images → encoded bytes; the raw tensors are dropped."""
    rows = unpack(batch)
    for row in rows:
        row["image_bytes"] = [
            encode_image(row["images"][i], image_format, jpeg_quality) if s == ACCEPTED else b""
            for i, s in enumerate(row["status"])
        ]
        del row["images"]
        row["imagereward"], row["mps"] = _none_for_nan(row["imagereward"]), _none_for_nan(row["mps"])
    return pack(rows)


def explode(row: dict[str, Any], with_images: bool = False) -> list[dict[str, Any]]:
    """A chunk row → one dict per sample, the form the shard writer (and vLLM) take."""
    samples = []
    for i, key in enumerate(row["ids"]):
        s = {
            "shard": row["shard"],
            "shard_total": row["shard_total"],
            "key": key,
            "prompt": row["prompts"][i],
            "seed": row["seeds"][i],
            "source": row["sources"][i],
            "row": row["rows"][i],
            "status": row["status"][i],
            "reason": row["reason"][i],
            "imagereward": _none_for_nan([row["imagereward"][i]])[0],
            "mps": _none_for_nan([row["mps"][i]])[0],
            "recaption": row["recaption"][i],
        }
        if with_images:
            # vLLM gets the pixels of accepted samples only; others carry a 1x1 placeholder.
            s["image"] = row["images"][i] if s["status"] == ACCEPTED else np.zeros((1, 1, 3), np.uint8)
        else:
            s["image_bytes"] = row["image_bytes"][i]
        samples.append(s)
    return samples


def explode_for_vllm(row: dict[str, Any]) -> list[dict[str, Any]]:
    return explode(row, with_images=True)


def encode_samples(batch: dict[str, np.ndarray], image_format: str, jpeg_quality: int) -> dict[str, Any]:
    """vLLM path: per-sample rows after recaptioning → encoded bytes, raw pixels dropped."""
    images = batch.pop("image")
    status = batch["status"]
    batch["image_bytes"] = np.array(
        [encode_image(images[i], image_format, jpeg_quality) if status[i] == ACCEPTED else b"" for i in range(len(status))],
        dtype=object,
    )
    return batch
