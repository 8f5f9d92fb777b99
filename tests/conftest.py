"""Shared fixtures: the tiny model zoo (written once per session) and a small local Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest

from app.cluster import HOST, _http_answers, free_port, port_in_use

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
S3_BUCKET = f"layton-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    from layton.zoo import write_tiny_zoo

    out = tmp_path_factory.mktemp("zoo")
    write_tiny_zoo(out)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny models are per-op-overhead bound; with a second thread they only lose time, badly so
    when another process holds the other core (threads wait on each other at every op)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)




@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 (one for the session), the bucket S3_BUCKET on it, and the AWS
    env that points at it (set in this process, so that `Root("s3://…")` here reaches it as well;
    a process started by a test inherits it)."""
    port = free_port()
    url = f"http://{HOST}:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", HOST, "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _http_answers(url):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"moto did not answer at {url}:\n{log.read_text()}"
            time.sleep(0.3)
        env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
        # pyarrow's S3FileSystem() takes the endpoint from AWS_ENDPOINT_URL only through from_uri:
        # here it is given explicitly.
        fs = pafs.S3FileSystem(endpoint_override=url, access_key="testing", secret_key="testing",
                               region="us-east-1", allow_bucket_creation=True)
        fs.create_dir(S3_BUCKET)
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            yield SimpleNamespace(url=url, env=env, fs=fs, port=port, bucket=S3_BUCKET)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert not port_in_use(port)


@pytest.fixture(scope="session")
def ray_local(s3):
    """A real local Ray for the session; `ray_local.metrics_url` is its Prometheus export. Its
    workers get the object store's environment (workers keep the one Ray started with)."""
    import ray

    from layton.ray_cluster import start_local_ray  # on 127.0.0.1; start-up budget from the environment

    port = free_port()
    if not ray.is_initialized():
        start_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=port,
                        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), **s3.env}})
    ray.metrics_url = f"http://127.0.0.1:{port}/metrics"
    yield ray
    ray.shutdown()


def scrape(url: str, name: str, timeout: float = 30.0) -> dict[str, float]:
    """Samples of metric `name` on a Prometheus endpoint (label string -> value), once it shows."""
    import re
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        found = {m.group(1): float(m.group(2)) for m in re.finditer(rf"^{name}\{{(.*)\}} (\S+)$", body, re.M)}
        if found or time.time() > deadline:
            return found
        time.sleep(1)


def synth_config_dict(zoo: Path, prompts: list[str] | str, out_dir: Path, **overrides) -> dict:
    """The demo config, pointed at a zoo, a prompt file and an output directory."""
    import yaml

    cfg = yaml.safe_load((ROOT / "workflows" / "synth_demo.yaml").read_text())
    cfg["prompts"]["paths"] = [str(p) for p in ([prompts] if isinstance(prompts, (str, Path)) else prompts)]
    cfg["generation"]["model"] = str(zoo / "flux")
    cfg["scoring"]["imagereward"] = {
        "checkpoint": str(zoo / "imagereward" / "ImageReward.pt"),
        "med_config": str(zoo / "imagereward" / "med_config.json"),
        "tokenizer": str(zoo / "imagereward" / "tokenizer"),
    }
    cfg["scoring"]["mps"] = {
        "checkpoint": str(zoo / "mps" / "MPS_overall_checkpoint.pth"),
        "processor": str(zoo / "mps" / "processor"),
    }
    cfg["recaption"]["model"] = str(zoo / "qwen2vl")
    cfg["output"]["dir"] = str(out_dir)
    cfg["ray"]["dashboard"] = False  # faster start-up for the many short runs of the tests
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: dict, overrides: dict) -> dict:
    """`section__field=value` keyword overrides applied to a config dict."""
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def write_prompts(path: Path, texts: list, column: str = "TEXT", **extra_columns) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: pa.array(texts, pa.string()), **extra_columns}), path)
    return path


def cli(*args) -> subprocess.Popen:
    """`layton ARGS` in its own session (so a test can SIGKILL it together with the Ray it starts)."""
    return subprocess.Popen([sys.executable, "-m", "app.cli", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_after_first_checkpoint(proc: subprocess.Popen, job_dir: Path | str) -> None:
    """Wait until Ray Train has recorded a checkpoint of `job_dir` (a local path or a URI), then
    SIGKILL the run's process group.

    Ray lists a checkpoint in its snapshot only once the whole directory is persisted. A run that
    never checkpoints finishes and exits, which ends the wait as a failure.
    """
    from layton.storage import Root

    job = Root(job_dir)

    def recorded() -> bool:
        try:
            return bool(json.loads(job.read("checkpoint_manager_snapshot.json") or b"{}").get("latest_checkpoint_result"))
        except json.JSONDecodeError:  # (a local snapshot is rewritten in place)
            return False

    while not recorded():
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
