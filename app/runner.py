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
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import ray
import yaml
from ray.util.metrics import Gauge

from app.report import write_report
from app.workflow import Workflow, check_links, preflight
from layton.ray_cluster import check_shared_storage, ray_session
from layton.storage import Root, absolute, within
from layton.zoo import write_tiny_zoo, zoo_complete
from stages.base import Stage

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
        self._lock = threading.Lock()
        self.save()

    def set(self, stage: str, **fields) -> None:
        with self._lock:  # stages side by side report from their own threads
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


def _reads_from(a: tuple[Stage, object], b: tuple[Stage, object]) -> bool:
    """Whether stage `a` reads anything stage `b` writes."""
    (sa, ca), (sb, cb) = a, b
    return any(within(absolute(p), absolute(o)) for _, p in sa.inputs(ca) for o in sb.outputs(cb))


def independent(a: tuple[Stage, object], b: tuple[Stage, object]) -> bool:
    """Two stages that may run side by side: both allow it and neither reads what the other writes."""
    return a[0].side_by_side and b[0].side_by_side and not _reads_from(a, b) and not _reads_from(b, a)


def fits(demands: list[dict[str, float]], capacity: dict[str, float]) -> bool:
    keys = {k for d in demands for k in d}
    return all(sum(d.get(k, 0.0) for d in demands) <= capacity.get(k, 0.0) + 1e-9 for k in keys)


def next_runnable(pending: list, running: list, capacity: dict[str, float]) -> list:
    """The pending stages that may start now, in workflow order. A stage waits for every stage before
    it, except side-by-side ones independent of it; it starts beside the running ones only if all of
    them together fit the cluster. With nothing running, the next stage starts whatever its demand
    (alone, Ray queues what does not fit, as it always did)."""
    out = []
    for i, item in enumerate(pending):
        earlier = pending[:i] + running
        if any(not independent(item, e) for e in earlier):
            break  # neither it nor anything after it may overtake a stage it depends on
        busy = running + out
        if busy and not fits([s.demand(c) for s, c in busy + [item]], capacity):
            continue
        out.append(item)
    return out


def run_workflow(wf: Workflow, on_event=print) -> dict:
    """Run every stage of `wf` not yet complete; returns the final state. Stages run in order, except
    that evaluation stages independent of each other run side by side when the cluster holds them
    all (`side_by_side`, default on). A failing stage is recorded (status, error) and re-raised once
    the stages beside it have finished; the stages after it stay pending."""
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
        capacity = ray.cluster_resources() if wf.side_by_side else {}  # {}: nothing fits beside another
        _run_stages(wf.stages(), state, capacity, on_event)
    report = write_report(wf.root)
    on_event(f"report: {report}")
    return {"name": wf.name, "root": wf.root, "stages": state.stages, "report": str(report)}


def _run_stage(stage: Stage, cfg, state: WorkflowState, on_event) -> None:
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


def _run_stages(stages: list, state: WorkflowState, capacity: dict[str, float], on_event) -> None:
    """Start what `next_runnable` allows until all are done or one failed. A stage that runs alone
    runs in this thread; side-by-side ones each in a thread of this driver (Ray Data runs from any)."""
    pending, running, failure = list(stages), {}, None
    pool = ThreadPoolExecutor(max_workers=max(1, len(stages)), thread_name_prefix="stage")
    try:
        while pending and failure is None:
            starting = next_runnable(pending, list(running.values()), capacity)
            if not running and len(starting) == 1:
                pending.remove(starting[0])
                _run_stage(*starting[0], state, on_event)  # raises on failure: nothing runs beside it
                continue
            for item in starting:
                pending.remove(item)
                running[pool.submit(_run_stage, *item, state, on_event)] = item
            failure = _reap(running, wait(running, return_when=FIRST_COMPLETED)[0]) or failure
        while running:  # a failure stops new starts; the stages beside it finish their work
            failure = _reap(running, wait(running, return_when=FIRST_COMPLETED)[0]) or failure
    except BaseException:  # Ctrl-C, or a stage run in this thread: leaving `ray_session` ends the others' Ray
        for stage, _ in running.values():
            state.set(stage.name, status="failed", finished=time.time(), error="interrupted: the run stopped")
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if failure is not None:
        raise failure


def _reap(running: dict, finished) -> BaseException | None:
    first = None
    for f in finished:
        running.pop(f)
        first = first or f.exception()
    return first
