"""The synthesis stage: LAION prompts → FLUX images → ImageReward/MPS → Qwen2-VL captions → shards.

Its work is done by `pipelines/synth.py`; shards are the unit of resume inside a run, and the
stage's completion record (in the output directory) marks the whole plan done for these settings
and these inputs (the input files' names and row counts are part of the fingerprint).
"""

from __future__ import annotations

import time
from typing import Callable

from stages.base import Stage, StageResult, setdefault_dotted
from stages.synth.config import SynthConfig


class SynthStage(Stage):
    name = section = "synth"
    config = SynthConfig
    command, help = ("synth",), "run or resume a synthesis config"

    def __init__(self, on_event: Callable[[str], None] | None = None, force: bool = False):
        super().__init__(on_event)
        self.force = force  # resume into an output written with other settings

    def with_defaults(self, raw: dict, root: str, earlier: dict) -> dict:
        setdefault_dotted(raw, "output.dir", f"{root}/shards")
        return raw

    def outputs(self, cfg: SynthConfig) -> list[str]:
        return [cfg.output.dir]

    def check(self, cfg: SynthConfig) -> None:
        from layton.model_files import check_synth_models
        from pipelines.plan import make_plan

        make_plan(cfg.prompts, cfg.output.shard_size, check=True)  # footers, and every used row group decodes
        check_synth_models(cfg)

    def record_dir(self, cfg: SynthConfig) -> str:
        return cfg.output.dir

    def settings(self, cfg: SynthConfig):
        from pipelines.plan import make_plan

        return {"config": cfg, "inputs": make_plan(cfg.prompts, cfg.output.shard_size).describe()}

    def run(self, cfg: SynthConfig) -> StageResult:
        from pipelines.synth import run_synth

        start = time.time()

        def planned(r) -> None:
            p = r.plan
            self.on_event(f"synth: plan {p['shards']} shard(s) over {p['rows']} input row(s) of {p['inputs']} file(s): "
                          f"{r.shards_skipped} complete, {r.shards_planned} to do")

        def progress(stats: dict, so_far) -> None:
            elapsed = time.time() - start
            n, todo = so_far.shards_written, so_far.shards_planned
            eta = f", ~{elapsed / n * (todo - n):.0f}s left" if n < todo else ""
            self.on_event(f"shard {stats['shard']:05d}: {stats['accepted']}/{stats['total']} accepted, {stats['rejected']} "
                          f"rejected, {stats['failed']} failed | {n}/{todo} shards, {so_far.accepted} accepted / "
                          f"{so_far.rejected} rejected so far, {elapsed:.0f}s{eta}")

        r = run_synth(cfg, force=self.force, on_plan=planned, on_shard=progress)
        summary = {k: getattr(r, k) for k in ("shards_written", "shards_skipped", "accepted", "rejected", "failed")}
        return StageResult(self.name, False, summary, {"shards": cfg.output.dir}, [
            f"synth: wrote {r.shards_written} shard(s), kept {r.shards_skipped} complete one(s); {r.accepted} accepted / "
            f"{r.rejected} rejected / {r.failed} failed in {r.seconds:.1f}s",
            f"summary: layton shards stats {cfg.output.dir}"])
