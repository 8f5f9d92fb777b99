"""The synthesis run: prompts → FLUX images → scores → recaptions → shards, resumable.

Order of work: every check that can fail (config, prompt files, model files, manifest) runs
before Ray starts. The plan is a pure function of the input (`pipelines/plan.py`); the output is
listed once: complete shards are kept, anything a killed run left is removed, and the rest of the
plan's shards are the work. The dedup pre-pass runs in the cluster (once; its output is kept).
Then Ray Data streams one row per shard through reading, the stage actors and the writer, which
writes each shard where it runs; the driver receives small stats rows only.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import ray
import yaml

from layton.completion import fingerprint, settings_of
from layton.model_files import check_synth_models
from layton.ray_cluster import is_local, ray_session
from layton.storage import Root
from pipelines.dedup import run_dedup, shard_duplicates
from pipelines.metrics import SynthMetrics
from pipelines.plan import ShardPlan, make_plan
from pipelines.prompts import READER_REASONS, shard_prompts
from pipelines.recaption import ShardAssembler, build_vllm_recaptioner, vllm_rows
from pipelines.recaption import require_vllm
from pipelines.shard_rows import ACCEPTED, GENERATED, PENDING, REJECTED, pack
from pipelines.shards import complete_shards, remove_incomplete
from pipelines.shards import write_shards
from pipelines.stages import GenerateStage, RecaptionStage, ScoreStage
from stages.synth.config import SynthConfig

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
# Blocks the driver creates for the shard numbers; beyond that many shards, a streaming repartition
# splits them into one-shard blocks as the run goes (no per-shard object made up front).
INPUT_BLOCKS = 1024


class ResumeConflict(RuntimeError):
    """The output directory holds a run with different settings."""


@dataclass
class SynthResult:
    out_dir: str
    shards_written: int = 0
    shards_skipped: int = 0
    shards_planned: int = 0  # shards this invocation set out to write
    prompts: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    seconds: float = 0.0
    plan: dict = field(default_factory=dict)
    dedup: dict = field(default_factory=dict)


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


def prepare_output(config: SynthConfig, plan: ShardPlan, force: bool) -> Root:
    """Create the output directory, or check that it holds a run of the same settings and input."""
    root = Root(config.output.dir)
    old = root.read(MANIFEST)
    if old is not None:
        old = json.loads(old)
        changes = _diff(old.get("settings", {}), settings_of(config)) + _diff(old.get("plan", {}), plan.describe(), "input.")
        if changes and not force:
            raise ResumeConflict(
                f"{config.output.dir} holds a run with other settings or input; refusing to resume into it "
                f"(pass --force to continue with the new ones):\n  " + "\n  ".join(changes)
            )
    root.mkdir()
    manifest = {
        "settings": settings_of(config),
        "settings_hash": fingerprint(config),
        "plan": plan.describe(),
        "models": {
            "generation": config.generation.model,
            "imagereward": config.scoring.imagereward.checkpoint,
            "mps": config.scoring.mps.checkpoint,
            "recaption": config.recaption.model,
        },
        "thresholds": {"imagereward": config.scoring.imagereward_threshold, "mps": config.scoring.mps_threshold},
        "order": config.order,
        # The scorers and the recaptioner see the image as stored, not the generator's raw pixels.
        "scored_on": {"image_format": config.output.image_format, "jpeg_quality": config.output.jpeg_quality},
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    root.write(MANIFEST, json.dumps(manifest, indent=1).encode())
    root.write("config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).encode())
    return root


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


def read_shards(batch: dict[str, np.ndarray], plan: ShardPlan, config: SynthConfig, root: Root) -> dict:
    """Shard numbers → shard rows: each shard reads its own input rows and dedup verdicts."""
    rows = []
    for shard in batch["data"].tolist():
        i, start, stop = plan.spec(shard)
        dups = shard_duplicates(root, config.prompts, plan, shard)
        prompts = shard_prompts(config.prompts, config.generation.seed, plan.files[i], start, stop,
                                dups.get("id", set()), dups.get("text", set()))
        n = len(prompts)
        rows.append({
            "shard": shard,
            "ids": [p.id for p in prompts],
            "prompts": [p.text for p in prompts],
            "sources": [p.source for p in prompts],
            "rows": [p.row for p in prompts],
            "seeds": [p.seed for p in prompts],
            "status": [REJECTED if p.reject else PENDING for p in prompts],
            "reason": [p.reject for p in prompts],
            "recaption": [""] * n,
            "imagereward": [float("nan")] * n,
            "mps": [float("nan")] * n,
            "image": [b""] * n,
            "processed_by": "{}",
        })
    return pack(rows)


def _faults(config: SynthConfig, actors: bool) -> dict:
    """Ray's retry options (Ray 2.60 takes them only as ray_remote_args; it warns that they move)."""
    f = config.faults
    if actors:
        return {"max_restarts": f.max_actor_restarts, "max_task_retries": f.max_task_retries}
    return {"max_retries": f.max_task_retries}


def _stage(ds, config: SynthConfig, cls, res, **kwargs):
    return ds.map_batches(
        cls,
        fn_constructor_kwargs=kwargs,
        batch_size=1,  # one shard row; the stage cuts it into model batches itself
        # A shard is long work: one running and one queued per actor keeps the actor busy (the next
        # shard's input arrives during this one) without holding shards an idle actor could take.
        compute=ray.data.ActorPoolStrategy(size=res.num_actors, max_tasks_in_flight_per_actor=2),
        num_gpus=res.num_gpus,
        num_cpus=res.num_cpus,
        **_faults(config, actors=True),
    )


def build_dataset(config: SynthConfig, plan: ShardPlan, root: Root, todo: np.ndarray):
    """The Ray Data pipeline over the shards still to do; yields one stats row per written shard."""
    ray.data.DataContext.get_current().execution_options.preserve_order = False  # order lives inside a shard
    blocks = min(len(todo), INPUT_BLOCKS)
    ds = ray.data.from_numpy(np.array_split(todo, blocks))
    if blocks < len(todo):
        ds = ds.repartition(target_num_rows_per_block=1)  # streaming: one block (= one task) per shard
    ds = ds.map_batches(read_shards, fn_kwargs=dict(plan=plan, config=config, root=root), batch_size=1,
                        **_faults(config, actors=False))
    g, s, r = config.generation, config.scoring, config.recaption
    out = config.output
    ds = _stage(ds, config, GenerateStage, g.resources, cfg=g.model_dump(), image_format=out.image_format,
                jpeg_quality=out.jpeg_quality)
    score = dict(cfg=s.model_dump(), batch_size=g.batch_size)
    caption = dict(cfg=r.model_dump(), batch_size=g.batch_size)
    writer = dict(out=root.location, meta=sample_meta(config), image_ext=out.image_format, fingerprint=fingerprint(config))
    if r.backend == "vllm":
        ds = _stage(ds, config, ScoreStage, s.resources, **score)
        processor = build_vllm_recaptioner(
            r.model,
            instruction=r.instruction,
            max_new_tokens=r.max_new_tokens,
            concurrency=r.resources.num_actors,
            batch_size=r.vllm_batch_size,
            engine_kwargs=r.engine_kwargs,
            num_gpus_per_instance=max(1, int(r.resources.num_gpus)),
        )
        ds = processor(ds.flat_map(vllm_rows))
        return ds.map_batches(ShardAssembler, fn_constructor_kwargs=writer, batch_size=None,
                              compute=ray.data.ActorPoolStrategy(size=1), **_faults(config, actors=True))
    if config.order == "score_first":
        ds = _stage(ds, config, ScoreStage, s.resources, **score)
        ds = _stage(ds, config, RecaptionStage, r.resources, **caption, statuses=(ACCEPTED,))
    else:
        ds = _stage(ds, config, RecaptionStage, r.resources, **caption, statuses=(GENERATED,))
        ds = _stage(ds, config, ScoreStage, s.resources, **score)  # a sample whose caption failed is not scored
    return ds.map_batches(write_shards, fn_kwargs=writer, batch_size=1, **_faults(config, actors=False))


def check_resources(config: SynthConfig) -> None:
    """The stage actors must fit with room for Ray Data's read and write tasks, or the run hangs.

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
    if is_local(config.ray):
        raise ValueError(f"resources: {detail}; lower the stages' resources or raise ray.num_cpus/num_gpus")
    log.warning("resources: %s; the run waits until the cluster has them", detail)


def _count(metrics: SynthMetrics, stats: dict) -> None:
    metrics.count("prompts_read", stats["total"], "prompts handled")
    metrics.count("written", stats["accepted"], "samples written to shards")
    metrics.count("shards_written", 1, "shards written")
    reader = sum(n for reason, n in stats["reasons"].items() if reason in READER_REASONS)
    metrics.count("rejected", reader, "samples rejected", reason="reader")


def run_synth(
    config: SynthConfig,
    *,
    force: bool = False,
    on_plan: Callable[[SynthResult], None] | None = None,
    on_shard: Callable[[dict, SynthResult], None] | None = None,
) -> SynthResult:
    """Run (or resume) the synthesis described by `config`. Returns what this invocation did.

    `on_plan(result)` is called once the work is known; `on_shard(stats, result)` as each shard
    is written, with the running totals."""
    t0 = time.time()
    if config.recaption.backend == "vllm":
        if config.order != "score_first":
            raise ValueError("recaption.backend 'vllm' runs after scoring: set order: score_first")
        require_vllm()
    # Everything that can fail on bad input fails here, before Ray starts.
    plan = make_plan(config.prompts, config.output.shard_size, check=True)
    check_synth_models(config)
    root = prepare_output(config, plan, force)

    files = root.list()  # one listing of the output serves both
    done = complete_shards(root, files)
    removed = remove_incomplete(root, set(done), files)
    if removed:
        log.info("removed %d leftover file(s) of incomplete shards: %s", len(removed), ", ".join(removed[:8]))
    todo = np.setdiff1d(np.arange(plan.n_shards, dtype=np.int64), np.fromiter(done, np.int64, len(done)))
    result = SynthResult(out_dir=config.output.dir, shards_skipped=len(done), shards_planned=len(todo),
                         plan={"shards": plan.n_shards, "rows": plan.n_rows, "rows_per_shard": plan.rows_per_shard,
                               "inputs": len(plan.files)})
    if on_plan:
        on_plan(result)
    if len(todo) == 0:
        result.seconds = time.time() - t0
        return result

    with ray_session(config.ray):
        check_resources(config)
        result.dedup = run_dedup(plan, config.prompts, root)
        metrics = SynthMetrics()
        for row in build_dataset(config, plan, root, todo).iter_rows():
            stats = json.loads(row["stats"])
            _count(metrics, stats)
            result.shards_written += 1
            result.prompts += stats["total"]
            result.accepted += stats["accepted"]
            result.rejected += stats["rejected"]
            result.failed += stats["failed"]
            if on_shard:
                on_shard(stats, result)
    result.seconds = time.time() - t0
    if result.shards_written < len(todo):
        missing = len(todo) - result.shards_written
        raise RuntimeError(f"synth: {missing} of {len(todo)} shard(s) were not written (a lost assembler or "
                           f"writer); {config.output.dir} keeps the {result.shards_written} written: rerun to finish")
    return result
