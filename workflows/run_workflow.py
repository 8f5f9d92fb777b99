"""`layton workflow run`: a workflow's stages in order on one Ray (the configured cluster or a local one).

Each stage's own code decides what is left to do — synthesis keeps complete shards, training resumes
from its last checkpoint and skips a complete export — so a rerun after a kill picks up where the
run stopped. Evaluation stages are complete when their `results.json` exists for the same settings.
`<root>/workflow_state.json` records every stage's status, times, summary and error (the report and
`layton jobs` read it); the Ray dashboard's metrics view shows the same as `ray_layton_workflow_*`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import yaml

from layton.workflow import Workflow, check_links

STATE = "workflow_state.json"
STATUS_CODE = {"pending": 0, "running": 1, "complete": 2, "failed": 3}


class WorkflowState:
    """workflow_state.json, rewritten atomically after every change."""

    def __init__(self, wf: Workflow):
        self.path = wf.root / STATE
        old = {}
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text()).get("stages", {})
            except (json.JSONDecodeError, AttributeError):
                old = {}
        self.name = wf.name
        self.stages = {s: {**{"status": "pending", "started": None, "finished": None, "seconds": None, "summary": {},
                              "error": None}, **old.get(s, {})} for s in wf.stages()}
        for s in self.stages.values():  # a run killed mid-stage left it "running"
            if s["status"] == "running":
                s["status"] = "pending"
        self._gauge = None
        self.save()

    def set(self, stage: str, **fields) -> None:
        self.stages[stage].update(fields)
        self.save()
        self._export(stage)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"name": self.name, "updated": time.time(), "stages": self.stages}, indent=1, default=str))
        tmp.replace(self.path)

    def _export(self, stage: str) -> None:
        import ray

        if not ray.is_initialized():
            return
        if self._gauge is None:
            from ray.util.metrics import Gauge

            self._gauge = Gauge("layton_workflow_stage_status", description="0 pending, 1 running, 2 complete, 3 failed",
                                tag_keys=("workflow", "stage"))
        self._gauge.set(STATUS_CODE[self.stages[stage]["status"]], tags={"workflow": self.name, "stage": stage})


def fingerprint(cfg, root: Path) -> str:
    """The settings that decide a stage's outputs. Where it runs does not: neither `ray` nor the
    run's root (a URI root's staging copy lies elsewhere on each machine)."""
    data = cfg.model_dump(mode="json")
    data.pop("ray", None)
    text = json.dumps(data, sort_keys=True).replace(str(root), "<root>")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def preflight(wf: Workflow) -> None:
    """The model files and inputs of every stage that do not come from an earlier stage, checked
    before any stage starts; errors name the file, the stage and the field."""
    from layton.coco import read_captions
    from layton.model_files import ModelFileError, check_file, check_model_dir, check_synth_models
    from layton.tokenizer import check_tokenizer_models
    from pipelines.prompts import list_inputs

    for section, cfg in wf.configs.items():
        try:
            if section == "synth":
                list_inputs(cfg.prompts)
                check_synth_models(cfg)
            elif section == "tokenizer":
                check_tokenizer_models(cfg.model, cfg.stage2.consistency, cfg.stage2.lpips)
            elif section == "laytongen":
                check_model_dir(cfg.model.text_encoder, "model.text_encoder")
                if cfg.model.init_from and not Path(cfg.model.init_from).exists():
                    raise FileNotFoundError(f"model.init_from: {cfg.model.init_from} does not exist")
            elif section == "eval_recon":
                check_file(cfg.metrics.inception, "metrics.inception")
                check_file(cfg.metrics.lpips.backbone, "metrics.lpips.backbone")
                for i, m in enumerate(cfg.models):
                    if m.kind != "layton" and not Path(m.path).exists():
                        raise FileNotFoundError(f"models[{i}].path: {m.path} does not exist")
            elif section == "eval_geneval":
                from workflows.eval_geneval import check_geneval_models

                check_geneval_models(cfg)
            elif section == "eval_coco":
                from workflows.eval_coco import check_scorer_files

                read_captions(cfg.captions, cfg.limit)
                check_scorer_files(cfg.scorers)
        except (FileNotFoundError, ModelFileError, ValueError) as e:
            raise type(e)(f"{wf.source}: stages.{section}: {e}") from None


def _eval_done(cfg, root: Path, state: dict) -> bool:
    return (Path(cfg.output) / "results.json").is_file() and state.get("fingerprint") == fingerprint(cfg, root)


def run_stage(wf: Workflow, stage: str, state: dict) -> tuple[dict, bool]:
    """Run one stage; returns (summary, skipped: nothing was left to do)."""
    if stage == "synth":
        from pipelines.synth import run_synth

        r = run_synth(wf.configs["synth"])
        return ({k: getattr(r, k) for k in ("shards_written", "shards_skipped", "accepted", "rejected", "failed")},
                r.shards_planned == 0)
    if stage.startswith("tokenizer_stage"):
        from workflows.train_tokenizer import run_tokenizer_stage

        r = run_tokenizer_stage(wf.configs["tokenizer"], int(stage[-1]))
        return {"step": r.step, "loss": r.metrics.get("loss"), "export": r.tokenizer_dir}, r.skipped
    if stage == "laytongen":
        from workflows.train_gen import run_gen_training

        r = run_gen_training(wf.configs["laytongen"])
        return {"step": r.step, "loss": r.metrics.get("loss"), "export": r.directory}, r.skipped
    cfg = wf.configs[stage]
    if _eval_done(cfg, wf.root, state):
        return state.get("summary", {}), True
    if stage == "eval_recon":
        from workflows.eval_recon import run_recon_eval

        body = run_recon_eval(cfg)
        summary = {f"{name}.{k}": r.get(k) for name, r in body["results"].items() for k in ("rfid", "psnr", "ssim", "lpips")}
    elif stage == "eval_geneval":
        from workflows.eval_geneval import run_geneval

        body = run_geneval(cfg)
        summary = {"overall": body["summary"].get("overall"), "images": body["images"]}
    else:
        from workflows.eval_coco import run_coco_eval

        body = run_coco_eval(cfg)
        summary = {**{m: v["mean"] for m, v in body["summary"].items()}, "images": body["images"]}
    return summary, False


def _push(wf: Workflow, on_event) -> None:
    if wf.remote:
        from layton.storage import push

        on_event(f"storage: {push(wf.root, wf.remote)} file(s) pushed to {wf.remote}")


def run_workflow(wf: Workflow, on_event=print) -> dict:
    """Run every stage of `wf` not yet complete; returns the final state. A failing stage is recorded
    (status, error) and re-raised; the stages after it stay pending."""
    import ray

    from layton.ray_cluster import init_ray
    from layton.report import write_report

    check_links(wf)
    wf.root.mkdir(parents=True, exist_ok=True)
    if wf.remote:
        from layton.storage import pull

        on_event(f"storage: {pull(wf.remote, wf.root)} file(s) pulled from {wf.remote} into {wf.root}")
    (wf.root / "workflow.yaml").write_text(yaml.safe_dump(wf.raw, sort_keys=False))
    if wf.tiny_zoo:
        from layton.zoo import write_tiny_zoo, zoo_complete

        if not zoo_complete(wf.tiny_zoo):
            on_event(f"tiny zoo: writing {wf.tiny_zoo}")
            write_tiny_zoo(wf.tiny_zoo)
    preflight(wf)
    state = WorkflowState(wf)
    started_here = init_ray(wf.ray)
    try:
        for stage in wf.stages():
            t0 = time.time()
            state.set(stage, status="running", started=t0, finished=None, error=None)
            on_event(f"{stage}: running")
            try:
                summary, skipped = run_stage(wf, stage, state.stages[stage])
            except BaseException as e:
                state.set(stage, status="failed", finished=time.time(), seconds=time.time() - t0,
                          error=f"{type(e).__name__}: {e}"[:2000])
                _push(wf, on_event)
                raise
            cfg = wf.configs["tokenizer" if stage.startswith("tokenizer") else stage]
            if skipped:
                summary = {**state.stages[stage].get("summary", {}), **summary}
            state.set(stage, status="complete", finished=time.time(), seconds=time.time() - t0, summary=summary,
                      skipped=skipped, fingerprint=fingerprint(cfg, wf.root))
            on_event(f"{stage}: {'already complete' if skipped else 'complete'} ({time.time() - t0:.1f}s) {summary}")
            _push(wf, on_event)
    finally:
        if started_here:
            ray.shutdown()
    report = write_report(wf.root)
    on_event(f"report: {report}")
    _push(wf, on_event)
    return {"name": wf.name, "root": str(wf.root), "stages": state.stages, "report": str(report)}
