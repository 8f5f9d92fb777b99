"""The README's main command end to end (`pytest -m slow`): the bundled tiny workflow from prompts to
evaluation tables and the report, killed during tokenizer stage 1 and resumed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, kill_after_first_checkpoint

pytestmark = pytest.mark.slow


def _workflow(cwd, *args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "app.cli", "workflow", "run", "workflows/demo.yaml", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env, **kw)


def test_demo_workflow_end_to_end_resumes_after_kill(tmp_path):
    shutil.copytree(ROOT / "workflows", tmp_path / "workflows")
    run = tmp_path / "runs/demo"
    kill_after_first_checkpoint(_workflow(tmp_path), run / "train/tokenizer-stage1")
    state = json.loads((run / "workflow_state.json").read_text())["stages"]
    assert state["synth"]["status"] == "complete" and state["tokenizer_stage1"]["status"] == "running"
    shards = {p.name: p.stat().st_mtime_ns for p in (run / "shards").glob("0000*")}
    assert len(shards) == 15  # 5 shards: .tar, .parquet, _stats.json

    proc = _workflow(tmp_path)
    log = proc.communicate(timeout=2400)[0]
    assert proc.returncode == 0, log[-5000:]
    lines = [line for line in log.splitlines() if line.startswith(("synth:", "tokenizer_stage", "laytongen:", "eval_"))]
    assert any(line.startswith("synth: already complete") for line in lines), lines
    assert {p.name: p.stat().st_mtime_ns for p in (run / "shards").glob("0000*")} == shards  # synthesis not redone
    history = [json.loads(x) for x in (run / "train/tokenizer-stage1/history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 30 and history[-1]["resumed_from"] >= 15  # continued from its checkpoint

    state = json.loads((run / "workflow_state.json").read_text())["stages"]
    assert list(state) == ["synth", "tokenizer_stage1", "tokenizer_stage2", "laytongen", "eval_recon", "eval_geneval",
                           "eval_coco"]
    assert all(s["status"] == "complete" for s in state.values()), state
    assert "| Layton (demo) |" in (run / "eval/recon/results.md").read_text()
    assert "| Single Obj. |" in (run / "eval/geneval/results.md").read_text()
    coco = json.loads((run / "eval/coco/results.json").read_text())
    assert coco["images"] == 6 and coco["summary"]["imagereward"]["n"] == 6
    report = (run / "report.html").read_text()
    for stage in state:
        assert stage in report
    assert report.count("data:image/png;base64,") >= 5 and "https://" not in report

    # A third run finds everything complete: no stage does any work.
    proc = _workflow(tmp_path)
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log[-3000:]
    assert sum("already complete" in line for line in log.splitlines()) == 7, log[-3000:]
