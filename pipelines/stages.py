"""Ray Data stages of the synthesis pipeline: callable classes over shard rows, and the writer.

`__init__` loads the model once per actor; `__call__(batch)` maps a batch of shard rows. Each class
also has a plain `process(shard_row)` that works without Ray. A failure is kept to the samples it
concerns: a model batch whose call raises is retried one sample at a time, and a sample that still
fails is marked `failed` with the error as its reason; the run goes on.
"""

from __future__ import annotations

import io
import logging
import json
import time
from abc import ABC, abstractmethod
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from layton.acceleration import accelerate_flux
from layton.devices import pick_device, pick_dtype
from layton.scorers.imagereward import ImageRewardScorer
from layton.scorers.mps import MPSScorer
from pipelines.metrics import SynthMetrics
from pipelines.recaption import TransformersRecaptioner
from pipelines.shard_rows import ACCEPTED, FAILED, GENERATED, PENDING, REJECTED, batches, indices_with, pack, unpack
from pipelines.shards import writer_identity
from stages.synth.config import GenerationConfig, RecaptionConfig, ScoringConfig

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


class _ShardStage(ABC):
    """Shared Ray plumbing: batches of shard rows in, batches of shard rows out."""

    name = "stage"
    batch_size = 1

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return pack([self._stamped(self.process(row)) for row in unpack(batch)])

    def _stamped(self, row: dict[str, Any]) -> dict[str, Any]:
        """Which process ran this stage on the shard, and when: recorded in the shard's stats."""
        seen = json.loads(row.get("processed_by") or "{}")
        row["processed_by"] = json.dumps({**seen, self.name: {**writer_identity(), "at": round(time.time(), 3)}})
        return row

    @abstractmethod
    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        """One shard row in, the same row with this stage's columns filled in out."""

    def each_batch(self, row: dict[str, Any], statuses: str | tuple[str, ...], fn: Callable[[list[int]], None]) -> None:
        """`fn` on the samples with `statuses`, in model batches cut in shard order, failures isolated."""
        for idx in batches(indices_with(row, statuses), self.batch_size):
            run_isolated(self.name, fn, idx, row)

    def _timed(self, fn: Callable[[], Any], items: int) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.metrics.latency(self.name, time.perf_counter() - t0, items)
        return out


def encode_image(image: np.ndarray, image_format: str, jpeg_quality: int) -> bytes:
    buf = io.BytesIO()
    options = {"quality": jpeg_quality} if image_format in ("jpg", "webp") else {}
    Image.fromarray(image).save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[image_format], **options)
    return buf.getvalue()


def decode_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


class GenerateStage(_ShardStage):
    """FLUX.1-dev text-to-image with diffusers' FluxPipeline; one seeded generator per prompt.
    Images leave the stage encoded in the stored format."""

    name = "generate"

    def __init__(self, cfg: dict, image_format: str = "png", jpeg_quality: int = 95):
        from diffusers import FluxPipeline

        self.cfg = GenerationConfig.model_validate(cfg)
        self.batch_size = self.cfg.batch_size
        self.image_format, self.jpeg_quality = image_format, jpeg_quality
        self.device = pick_device(self.cfg.resources.device)
        dtype = pick_dtype(self.cfg.dtype, self.device)
        self.pipe = accelerate_flux(FluxPipeline.from_pretrained(self.cfg.model, dtype=dtype).to(self.device), self.cfg.accel)
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
        row["image"] = [b""] * len(row["ids"])

        def run(idx: list[int]) -> None:
            out = self._timed(lambda: self.generate([row["prompts"][i] for i in idx], [row["seeds"][i] for i in idx]), len(idx))
            for j, i in enumerate(idx):
                row["image"][i] = encode_image(out[j], self.image_format, self.jpeg_quality)
                row["status"][i] = GENERATED

        self.each_batch(row, PENDING, run)
        self.metrics.count("generated", len(indices_with(row, GENERATED)), "images generated")
        return row


class ScoreStage(_ShardStage):
    """ImageReward and MPS of the stored image against the original prompt, then the threshold
    filter. The images of samples that are not accepted are dropped here: they are never stored."""

    name = "score"

    def __init__(self, cfg: dict, batch_size: int = 1):
        self.cfg = ScoringConfig.model_validate(cfg)
        self.batch_size = batch_size
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
            pils = [decode_image(row["image"][i]) for i in idx]
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

        self.each_batch(row, GENERATED, run)
        for reason in (r for i in indices_with(row, REJECTED) for r in row["reason"][i].split(";") if "threshold" in r):
            self.metrics.count("rejected", 1, "samples rejected", reason=reason)
        row["image"] = [b if s == ACCEPTED else b"" for b, s in zip(row["image"], row["status"])]
        return row


class RecaptionStage(_ShardStage):
    """Qwen2-VL recaption of the stored image with transformers (the CPU path; vLLM runs through
    ray.data.llm)."""

    name = "recaption"

    def __init__(self, cfg: dict, statuses: tuple[str, ...] = (ACCEPTED,), batch_size: int = 1):
        self.cfg = RecaptionConfig.model_validate(cfg)
        self.batch_size = batch_size
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
            pils = [decode_image(row["image"][i]) for i in idx]
            prompts = [row["prompts"][i] for i in idx]
            captions = self._timed(lambda: self.model.caption(pils, prompts), len(idx))
            for j, i in enumerate(idx):
                row["recaption"][i] = captions[j]

        self.each_batch(row, self.statuses, run)
        mark_empty_captions(row, self.statuses)
        return row


def mark_empty_captions(row: dict[str, Any], statuses: tuple[str, ...]) -> None:
    """A sample meant to be captioned that got an empty caption cannot be trained on."""
    for i in indices_with(row, statuses):
        if not row["recaption"][i].strip():
            row["status"][i], row["reason"][i] = FAILED, "empty_recaption"
            row["image"][i] = b""
