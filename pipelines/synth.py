"""The synthesis run: prompts → FLUX images → scores → recaptions → shards, resumable.

Order of work: every check that can fail (config, prompt files, model files, manifest) runs
before Ray starts. Then the output directory is scanned: complete shards are kept, anything a
killed run left is removed, and the plan covers exactly the prompts no complete shard recorded.
The Ray Data pipeline streams chunk rows through the stage actors; the driver writes shards as
their samples arrive and finishes each one when all its prompts are in.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import ray

from layton.config import SynthConfig, save_config
from layton.model_files import check_synth_models
from layton.ray_cluster import init_ray
from pipelines.chunks import ACCEPTED, GENERATED, unpack
from pipelines.metrics import SynthMetrics
from pipelines.plan import PlanSummary, write_plan
from pipelines.prompts import check_prompt_files, read_prompts
from pipelines.shards import ShardWriter, complete_shards, handled_ids, remove_incomplete
from pipelines.stages import (
    GenerateStage,
    RecaptionStage,
    ScoreStage,
    encode_chunks,
    encode_samples,
    explode,
    explode_for_vllm,
    mark_empty_captions,
)

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


class ResumeConflict(RuntimeError):
    """The output directory holds a run with different settings."""


@dataclass
class SynthResult:
    out_dir: str
    shards_written: int = 0
    shards_skipped: int = 0
    prompts: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    seconds: float = 0.0
    plan: dict = field(default_factory=dict)


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def prepare_output(config: SynthConfig, force: bool) -> Path:
    """Create the output directory, or check that it holds a run of the same settings."""
    out = Path(config.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        changes = _diff(old.get("settings", {}), config.fingerprint())
        if changes and not force:
            raise ResumeConflict(
                f"{out} holds a run with other settings; refusing to resume into it "
                f"(pass --force to continue with the new settings):\n  " + "\n  ".join(changes)
            )
    manifest = {
        "settings": config.fingerprint(),
        "settings_hash": config.fingerprint_hash(),
        "models": {
            "generation": config.generation.model,
            "imagereward": config.scoring.imagereward.checkpoint,
            "mps": config.scoring.mps.checkpoint,
            "recaption": config.recaption.model,
        },
        "thresholds": {"imagereward": config.scoring.imagereward_threshold, "mps": config.scoring.mps_threshold},
        "order": config.order,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    save_config(config, out / "config.yaml")
    return out


def sample_meta(config: SynthConfig) -> dict:
    g = config.generation
    return {
        "generator": {
            "model": g.model,
            "height": g.height,
            "width": g.width,
            "num_inference_steps": g.num_inference_steps,
            "guidance_scale": g.guidance_scale,
            "dtype": g.dtype,
        },
        "models": {
            "imagereward": config.scoring.imagereward.checkpoint,
            "mps": config.scoring.mps.checkpoint,
            "recaption": config.recaption.model,
        },
    }


def _stage(ds, cls, res, **kwargs):
    return ds.map_batches(
        cls,
        fn_constructor_kwargs=kwargs,
        batch_size=1,  # one chunk row: the chunk is the model batch
        compute=ray.data.ActorPoolStrategy(size=res.num_actors),
        num_gpus=res.num_gpus,
        num_cpus=res.num_cpus,
    )


def build_dataset(config: SynthConfig, plan_path: Path):
    """The Ray Data pipeline over the plan; yields chunk rows (transformers) or sample rows (vLLM)."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards finish in order; tars are reproducible
    ds = ray.data.read_parquet(str(plan_path))
    g, s, r = config.generation, config.scoring, config.recaption
    ds = _stage(ds, GenerateStage, g.resources, cfg=g.model_dump())
    score = dict(cfg=s.model_dump())
    caption = dict(cfg=r.model_dump())
    fmt = dict(image_format=config.output.image_format, jpeg_quality=config.output.jpeg_quality)
    if r.backend == "vllm":
        from pipelines.recaption import build_vllm_recaptioner

        ds = _stage(ds, ScoreStage, s.resources, **score)
        ds = ds.flat_map(explode_for_vllm)
        processor = build_vllm_recaptioner(
            r.model,
            instruction=r.instruction,
            max_new_tokens=r.max_new_tokens,
            concurrency=r.resources.num_actors,
            batch_size=r.vllm_batch_size,
            engine_kwargs=r.engine_kwargs,
            num_gpus_per_instance=max(1, int(r.resources.num_gpus)),
        )
        return processor(ds).map_batches(encode_samples, fn_kwargs=fmt)
    if config.order == "score_first":
        ds = _stage(ds, ScoreStage, s.resources, **score)
        ds = _stage(ds, RecaptionStage, r.resources, **caption, statuses=(ACCEPTED,))
    else:
        ds = _stage(ds, RecaptionStage, r.resources, **caption, statuses=(GENERATED,))
        ds = _stage(ds, ScoreStage, s.resources, **score)  # a sample whose caption failed is not scored
    return ds.map_batches(encode_chunks, fn_kwargs=fmt)


def _samples(config: SynthConfig, ds) -> Iterator[dict]:
    """The pipeline's output as one dict per handled prompt, in plan order."""
    if config.recaption.backend == "vllm":
        for sample in ds.iter_rows():
            row = {k: [sample[k] or ""] for k in ("status", "reason", "recaption")}
            mark_empty_captions(row, (ACCEPTED,))
            yield {**sample, **{k: v[0] for k, v in row.items()}}
    else:
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
            for chunk in unpack(batch):
                yield from explode(chunk)


def check_resources(config: SynthConfig, started_here: bool) -> None:
    """The stage actors must fit with room for Ray Data's read and encode tasks, or the run hangs.

    On a local instance the resources are fixed: too little is an error. A cluster may autoscale,
    so there it is a warning.
    """
    stages = {"generation": config.generation, "scoring": config.scoring, "recaption": config.recaption}
    need_cpu = sum(s.resources.num_actors * s.resources.num_cpus for s in stages.values()) + 1  # + a task slot
    need_gpu = sum(s.resources.num_actors * s.resources.num_gpus for s in stages.values())
    have = ray.cluster_resources()
    problems = [
        f"{kind}: stage actors need {need:g} (+1 CPU for tasks) but Ray has {have.get(kind, 0):g}"
        for kind, need in (("CPU", need_cpu), ("GPU", need_gpu))
        if need > have.get(kind, 0)
    ]
    if not problems:
        return
    detail = "; ".join(problems) + " (" + ", ".join(
        f"{n}: {s.resources.num_actors} x {s.resources.num_cpus:g} CPU, {s.resources.num_gpus:g} GPU" for n, s in stages.items()
    ) + ")"
    if started_here:
        ray.shutdown()
        raise ValueError(f"resources: {detail}; lower the stages' resources or raise ray.num_cpus/num_gpus")
    log.warning("resources: %s; the run waits until the cluster has them", detail)


def run_synth(
    config: SynthConfig,
    *,
    force: bool = False,
    on_shard: Callable[[dict], None] | None = None,
) -> SynthResult:
    """Run (or resume) the synthesis described by `config`. Returns what this invocation did."""
    t0 = time.time()
    if config.recaption.backend == "vllm":
        from pipelines.recaption import require_vllm

        if config.order != "score_first":
            raise ValueError("recaption.backend 'vllm' runs after scoring: set order: score_first")
        require_vllm()
    # Everything that can fail on bad input fails here, before Ray starts.
    check_prompt_files(config.prompts)
    check_synth_models(config)
    out = prepare_output(config, force)

    done = complete_shards(out)
    removed = remove_incomplete(out, set(done))
    if removed:
        log.info("removed %d leftover file(s) of incomplete shards: %s", len(removed), ", ".join(removed[:8]))
    plan: PlanSummary = write_plan(
        read_prompts(config.prompts, config.generation.seed),
        handled_ids(out, done),
        set(done),
        config.output.shard_size,
        config.generation.batch_size,
        out / "_work" / "plan.parquet",
    )
    result = SynthResult(out_dir=str(out), shards_skipped=len(done), plan={k: v for k, v in asdict(plan).items() if k != "path"})
    if plan.shards == 0:
        result.seconds = time.time() - t0
        return result

    started_here = init_ray(config.ray)
    check_resources(config, started_here)
    metrics = SynthMetrics()
    metrics.count("prompts_read", plan.prompts, "prompts planned")
    if plan.reader_rejected:
        metrics.count("rejected", plan.reader_rejected, "samples rejected", reason="reader")
    meta = sample_meta(config)
    ext = config.output.image_format
    open_shards: dict[int, ShardWriter] = {}
    try:
        for sample in _samples(config, build_dataset(config, plan.path)):
            shard = sample["shard"]
            if shard not in open_shards:
                open_shards[shard] = ShardWriter(out, shard, sample["shard_total"], meta)
            writer = open_shards[shard]
            writer.add(sample, sample["image_bytes"], ext)
            if writer.done:
                stats = open_shards.pop(shard).close()
                metrics.count("written", stats["accepted"], "samples written to shards")
                result.shards_written += 1
                result.prompts += stats["total"]
                result.accepted += stats["accepted"]
                result.rejected += stats["rejected"]
                result.failed += stats["failed"]
                if on_shard:
                    on_shard(stats)
    finally:
        for writer in open_shards.values():
            writer.abort()  # an unfinished shard leaves no file behind; the next run redoes it
    result.seconds = time.time() - t0
    return result
