"""The local Ray instance the CLI starts: on 127.0.0.1 only, gone with its driver, and a start-up
failure reported as an error (exit 3), not a traceback. Each case is a process of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import yaml

from tests.conftest import ROOT, synth_config_dict, write_prompts

DRIVER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import ray
from layton.config import RayConfig
from layton.ray_cluster import init_ray

init_ray(RayConfig(num_cpus=2, dashboard=True))

@ray.remote
class Worker:
    def pid(self):
        return os.getpid()

w = Worker.remote()
print("ready", ray.get(w.pid.remote()), flush=True)
time.sleep(600)
"""


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_local_instance_listens_on_loopback_and_dies_with_its_driver():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(ROOT)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready"), line
        actor = psutil.Process(int(line.split()[1]))
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert actor in tree
        pids = {p.pid for p in tree} | {proc.pid}
        listening = {c.laddr.ip for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids}
        assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening  # GCS, raylet, workers, ...

        os.kill(proc.pid, signal.SIGKILL)  # the driver alone: its workers sit in process groups of their own
        proc.wait()
        deadline = time.monotonic() + 10
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(tree), [(p.pid, p.name()) for p in _alive(tree)]
    finally:
        for p in _alive([psutil.Process(proc.pid)] if psutil.pid_exists(proc.pid) else []):
            p.kill()


def test_ray_start_failure_is_a_clear_error(tiny_zoo, tmp_path):
    cfg = tmp_path / "synth.yaml"
    prompts = write_prompts(tmp_path / "p.parquet", ["a cat"])
    cfg.write_text(yaml.safe_dump(synth_config_dict(tiny_zoo, prompts, tmp_path / "out")))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(tmp_path / "no" / "such" / "dir")  # Ray cannot make its session there
    run = subprocess.run([sys.executable, "-m", "app.cli", "synth", str(cfg)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 3, run.stdout + run.stderr
    assert "layton: error: could not start a local Ray instance" in run.stderr and "Traceback" not in run.stderr, run.stderr
