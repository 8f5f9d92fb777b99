"""A workflow as a Ray Job: a real local head from `layton cluster up`, `layton workflow submit`, the
job followed to SUCCEEDED with its logs, and the custom metrics on the head's Prometheus export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import yaml

from app.cluster import free_port
from app.jobs import job_logs, job_status, wait_for_job
from tests.conftest import ROOT


def _layton(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _metrics(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()
    except OSError:
        return ""


def test_workflow_submitted_to_a_local_head(tiny_zoo, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["LAYTON_CLUSTER_STATE"] = str(tmp_path / "cluster.json")
    port, dash, metrics_port = free_port(), free_port(), free_port()
    up = _layton("cluster", "up", "--port", port, "--dashboard-port", dash, "--metrics-export-port", metrics_port,
                 "--num-cpus", 4, env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    address, metrics_url = f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{metrics_port}/metrics"
    assert address in up.stdout and metrics_url in up.stdout
    try:
        demo = yaml.safe_load((ROOT / "workflows/demo.yaml").read_text())
        synth = json.loads(json.dumps(demo["stages"]["synth"]).replace("runs/demo/zoo", str(tiny_zoo)))
        synth["prompts"]["limit"] = 24
        wf = {"name": "job-test", "root": str(tmp_path / "run"), "stages": {"synth": synth}}
        path = tmp_path / "job_test.yaml"
        path.write_text(yaml.safe_dump(wf))

        sub = _layton("workflow", "submit", path, "--address", address, env=env)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        sid = sub.stdout.split()[0]
        assert sid.startswith("layton-job-test-")
        again = _layton("workflow", "submit", path, "--address", address, env=env)  # while it runs
        assert again.returncode == 3 and "job-test" in again.stderr and sid in again.stderr

        # The synthesis counters reach the head's export while the job runs.
        seen, deadline = "", time.monotonic() + 600
        while "ray_layton_synth_prompts_read" not in seen and time.monotonic() < deadline:
            if job_status(address, sid)["status"] in ("FAILED", "STOPPED"):
                break
            time.sleep(2)
            seen = _metrics(metrics_url)
        assert "ray_layton_synth_prompts_read" in seen, job_logs(address, sid)[-3000:]

        assert wait_for_job(address, sid, timeout_s=600) == "SUCCEEDED", job_logs(address, sid)[-3000:]
        logs = job_logs(address, sid)
        assert "synth: complete" in logs and "all 1 stage(s) complete" in logs
        status = _layton("jobs", "status", sid, "--address", address, env=env)
        assert status.returncode == 0 and "SUCCEEDED" in status.stdout
        state = json.loads((tmp_path / "run/workflow_state.json").read_text())["stages"]
        assert state["synth"]["status"] == "complete" and state["synth"]["summary"]["shards_written"] >= 1
        assert "ray_layton_workflow_stage_status" in _metrics(metrics_url)
    finally:
        down = _layton("cluster", "down", env=env)
        assert down.returncode == 0, down.stdout + down.stderr


def test_unreachable_address_is_refused_naming_it(tmp_path):
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "root": str(tmp_path / "run"), "stages": {"eval_coco": {
        "captions": str(ROOT / "workflows/data/coco_captions_demo.json"), "images": str(tmp_path),
        "scorers": {"hpsv2": {"checkpoint": "hps.pt"}}}}}))
    closed = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    r = _layton("workflow", "submit", path, "--address", closed, env=dict(os.environ))
    assert r.returncode != 0 and closed in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "run").exists()
