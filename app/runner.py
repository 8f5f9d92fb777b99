"""`layton workflow run`: a workflow's stages in order on one Ray (the configured cluster or a local one).

Every stage goes through the Stage contract (`stages/base.py`): a stage complete for its settings
is skipped; otherwise its own code decides what is left to do (synthesis keeps complete shards,
training resumes from its last checkpoint), so a rerun after a kill picks up where the run stopped.
`<root>/workflow_state.json` records every stage's status, times, summary and error (the report and
`layton jobs` read it); the Ray dashboard's metrics view shows the same as `ray_layton_workflow_*`.
The root is a local path or a URI alike: every stage, the state and the report are written to it
directly (`layton.storage.Root`), so a run resumes on any machine that reaches the root.
"""

from __future__ import annotations

import json
import time

import ray
import yaml
from ray.util.metrics import Gauge

from app.report import write_report
from app.workflow import Workflow, check_links, preflight
from layton.ray_cluster import check_shared_storage, ray_session
from layton.storage import Root
from layton.zoo import write_tiny_zoo, zoo_complete

STATE = "workflow_state.json"
STATUS_CODE = {"pending": 0, "running": 1, "complete": 2, "failed": 3}


class WorkflowState:
    """workflow_state.json, rewritten atomically after every change."""

    def __init__(self, wf: Workflow):
        self.root = Root(wf.root)
        try:
            old = json.loads(self.root.read(STATE) or b"{}").get("stages", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            old = {}
        self.name = wf.name
        self.stages = {s: {**{"status": "pending", "started": None, "finished": None, "seconds": None, "summary": {},
                              "error": None}, **old.get(s, {})} for s in wf.stage_names()}
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
        self.root.write(STATE, json.dumps({"name": self.name, "updated": time.time(), "stages": self.stages},
                                          indent=1, default=str).encode())

    def _export(self, stage: str) -> None:
        if not ray.is_initialized():
            return
        if self._gauge is None:
            self._gauge = Gauge("layton_workflow_stage_status", description="0 pending, 1 running, 2 complete, 3 failed",
                                tag_keys=("workflow", "stage"))
        self._gauge.set(STATUS_CODE[self.stages[stage]["status"]], tags={"workflow": self.name, "stage": stage})


def run_workflow(wf: Workflow, on_event=print) -> dict:
    """Run every stage of `wf` not yet complete; returns the final state. A failing stage is recorded
    (status, error) and re-raised; the stages after it stay pending."""
    check_links(wf)
    root = Root(wf.root)
    root.write("workflow.yaml", yaml.safe_dump(wf.raw, sort_keys=False).encode())
    if wf.tiny_zoo and not zoo_complete(wf.tiny_zoo):
        on_event(f"tiny zoo: writing {wf.tiny_zoo}")
        write_tiny_zoo(wf.tiny_zoo)
    preflight(wf)
    state = WorkflowState(wf)
    with ray_session(wf.ray):
        check_shared_storage([wf.root, wf.tiny_zoo])
        for stage, cfg in wf.stages():
            stage.on_event = on_event
            t0 = time.time()
            state.set(stage.name, status="running", started=t0, finished=None, error=None)
            on_event(f"{stage.name}: running")
            try:
                result = stage.execute(cfg)
            except BaseException as e:
                state.set(stage.name, status="failed", finished=time.time(), seconds=time.time() - t0,
                          error=f"{type(e).__name__}: {e}"[:2000])
                raise
            state.set(stage.name, status="complete", finished=time.time(), seconds=time.time() - t0,
                      summary=result.summary, skipped=result.skipped)
            on_event(f"{stage.name}: {'already complete' if result.skipped else 'complete'} ({time.time() - t0:.1f}s) "
                     f"{result.summary}")
    report = write_report(wf.root)
    on_event(f"report: {report}")
    return {"name": wf.name, "root": wf.root, "stages": state.stages, "report": str(report)}
