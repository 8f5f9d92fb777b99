"""`layton synth` on a real 2-node Ray cluster writing to an S3-compatible object store (no mocks).

One cluster and one object store for the module (DESIGN.md §8): `ray start --head` (2 CPUs) and a
second node joined with `ray start --address` (3 CPUs, resource `node_b`), each with its own temp
dir, working directory and free ports, and moto's S3 server on 127.0.0.1. The stage actors (2
generation, 1 scoring, 1 recaption: 4 CPUs, + 1 for Ray Data's tasks) cannot all fit on one node,
so shards are worked on both. The nodes are started with the object store's endpoint and dummy
credentials in their environment, as a real cluster's nodes have theirs; each fixture stops
exactly the processes it started. The runs are `layton synth` processes joined by RAY_ADDRESS.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from app.cluster import HOST, _head_processes, _http_answers, _stop_processes, _token_auth_on, free_port, port_in_use
from pipelines.shards import STATS_SUFFIX, complete_shards, read_index, shard_name
from tests.conftest import ROOT, synth_config_dict, write_prompts

HEAD_CPUS, NODE_B_CPUS = 2, 3
BUCKET = f"layton-test-{uuid.uuid4().hex[:8]}"  # unique, so a stray local copy would be found by name
S3_OUT = f"s3://{BUCKET}/run1/shards"
PROMPTS = [f"a {c} {o} at dawn" for c in ("red", "green", "blue", "black", "white", "golden")
           for o in ("cat", "car", "house", "boat")][:22]  # 6 shards of 4 (the last one 2)
N_SHARDS = 6
SETTINGS = dict(output__shard_size=4, generation__batch_size=2,
                generation__resources={"num_actors": 2, "num_cpus": 1},
                # thresholds that split the tiny models' scores (as in test_synth.py)
                scoring__imagereward_threshold=-1.6, scoring__mps_threshold=-8.0)
START_WAIT_S = "180"  # RAY_raylet_start_wait_time_s: the machine is shared and loaded
NODE_START_TIMEOUT_S = 240
RUN_TIMEOUT_S = 600
BIN = Path(sys.executable).parent
# The nodes' address: a loopback address that Ray does not rewrite. For "127.0.0.1" (and
# "localhost") a multi-node Ray substitutes the machine's routable IP; every byte of this test
# must stay on the loopback range.
NODE_HOST = "127.0.0.2"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free port, a bucket on it, and the AWS env that points at it (set in
    this process for the module, so that `Root("s3://…")` here reaches it as well)."""
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
        fs.create_dir(BUCKET)
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            yield SimpleNamespace(url=url, env=env, fs=fs, port=port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert not port_in_use(port)


def _short_temp_dir(tmp_path_factory, name: str) -> str:
    """A temp dir for a Ray node: under pytest's basetemp when that is short enough for Ray's unix
    sockets (`<dir>/session_<40 chars>/sockets/plasma_store` must stay under ~107 bytes)."""
    d = tmp_path_factory.mktemp(name)
    return str(d) if len(str(d)) <= 40 else tempfile.mkdtemp(prefix="lr-", dir="/tmp")


def _state_client(dashboard_url: str):
    from ray.util.state import StateApiClient

    from app.jobs import _local_token_headers

    return StateApiClient(dashboard_url, headers=_local_token_headers(HOST) or None)


def _alive_nodes(dashboard_url: str) -> list:
    from ray.util.state.common import ListApiOptions, StateResource

    nodes = _state_client(dashboard_url).list(StateResource.NODES, options=ListApiOptions(detail=True),
                                              raise_on_missing_output=False)
    return [n for n in nodes if n.state == "ALIVE"]


def _jobs(dashboard_url: str) -> list[str]:
    """Every job the cluster has seen, driver runs included."""
    from ray.util.state.common import ListApiOptions, StateResource

    jobs = _state_client(dashboard_url).list(StateResource.JOBS, options=ListApiOptions(),
                                             raise_on_missing_output=False)
    return sorted(str(j.job_id) for j in jobs)


def _ray_start(args: list[str], temp_dir: str, cwd: Path, env: dict) -> tuple[int, float]:
    """`ray start ARGS` in a session of its own (its daemons and their workers keep its id), from
    `cwd` (the workers' working directory). Returns (session id, when it was up)."""
    log = Path(temp_dir) / "ray_start.log"
    with open(log, "wb") as out:
        starter = subprocess.Popen([str(BIN / "ray"), "start", *args, f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                                   cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    try:
        rc = starter.wait(timeout=NODE_START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        rc = None
    if rc != 0:
        _stop_processes(_head_processes(starter.pid, temp_dir))
        pytest.fail(f"ray start {' '.join(args)}: {'timed out' if rc is None else f'exited {rc}'}:\n"
                    + log.read_text(errors="replace")[-3000:])
    return starter.pid, time.time()


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    """A 2-node Ray cluster on this machine: `ray start --head`, then `ray start --address` with the
    resource `node_b`; each node with its own temp dir, free ports and working directory.

    Not `layton cluster up`: that head runs in Ray's single-machine mode (everything on 127.0.0.1),
    which `ray start --address` refuses to join. In multi-node mode Ray turns 127.0.0.1 into the
    machine's routable IP, so the nodes (and the drivers) meet on NODE_HOST, another loopback address
    (the dashboard stays on 127.0.0.1).
    """
    env = {**os.environ, **s3.env, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_raylet_start_wait_time_s": START_WAIT_S}
    for name in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(name, None)
    if _token_auth_on():
        env["RAY_AUTH_MODE"] = "token"  # both nodes and every driver
    port, dashboard_port = free_port(), free_port()
    extra = lambda *names: [f"--{n}={free_port()}" for n in names]  # noqa: E731 — ports Ray defaults to fixed ones
    agent_ports = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                   "metrics-export-port")
    nodes = []
    try:
        head_temp, head_cwd = _short_temp_dir(tmp_path_factory, "head"), tmp_path_factory.mktemp("head_cwd")
        nodes.append((*_ray_start(
            ["--head", f"--node-ip-address={NODE_HOST}", f"--port={port}", f"--num-cpus={HEAD_CPUS}", "--num-gpus=0",
             "--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={dashboard_port}",
             *extra("ray-client-server-port", *agent_ports)], head_temp, head_cwd, env), head_temp))
        dashboard_url = f"http://{HOST}:{dashboard_port}"
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while not _http_answers(f"{dashboard_url}/api/version"):
            assert time.monotonic() < deadline, f"the dashboard did not answer at {dashboard_url}"
            time.sleep(0.5)
        b_temp, b_cwd = _short_temp_dir(tmp_path_factory, "nodeb"), tmp_path_factory.mktemp("nodeb_cwd")
        nodes.append((*_ray_start(
            [f"--address={NODE_HOST}:{port}", f"--node-ip-address={NODE_HOST}", f"--num-cpus={NODE_B_CPUS}", "--num-gpus=0",
             '--resources={"node_b": 1}', f"--object-store-memory={512 << 20}",
             "--min-worker-port=0", "--max-worker-port=0",  # any free port, not the head's range
             *extra("node-manager-port", "object-manager-port", *agent_ports)], b_temp, b_cwd, env), b_temp))
        while len(alive := _alive_nodes(dashboard_url)) < 2:
            assert time.monotonic() < deadline, f"node_b did not join: {alive}"
            time.sleep(1)
        head_node = [n.node_id for n in alive if n.is_head_node]
        node_b = [n.node_id for n in alive if "node_b" in (n.resources_total or {})]
        assert len(alive) == 2 and len(head_node) == len(node_b) == 1 and head_node != node_b, alive
        assert {n.node_ip for n in alive} == {NODE_HOST}, alive  # both nodes on the loopback range
        yield SimpleNamespace(
            address=f"{NODE_HOST}:{port}", dashboard_url=dashboard_url, head_node=head_node[0], node_b=node_b[0],
            local_dirs=[head_temp, head_cwd, b_temp, b_cwd],  # where the nodes' processes write
            # What a driver needs to join (its RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER must not be 0), plus the store.
            driver_env={"RAY_ADDRESS": f"{NODE_HOST}:{port}", "RAY_raylet_start_wait_time_s": START_WAIT_S, **s3.env,
                        **({"RAY_AUTH_MODE": "token"} if "RAY_AUTH_MODE" in env else {})},
        )
    finally:
        left = []
        for sid, up_at, temp_dir in reversed(nodes):  # node_b first; only what each `ray start` started
            left += _stop_processes(_head_processes(sid, temp_dir, up_at))
        left += [p for sid, up_at, temp_dir in nodes for p in _head_processes(sid, temp_dir, up_at)]
        assert not left, f"Ray processes still alive: {[p.pid for p in left]}"
        for _, _, temp_dir in nodes:
            shutil.rmtree(temp_dir, ignore_errors=True)
    assert not port_in_use(port) and not port_in_use(dashboard_port)


def _run_synth(cfg: Path, env: dict, cwd: Path) -> tuple[int, str]:
    """`layton synth CFG` as its own process (and session), in `cwd`, joined to the cluster by `env`."""
    full = {**os.environ, **env}
    full.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # single-machine mode would not find the nodes
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "synth", str(cfg)], cwd=cwd, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"layton synth {cfg} did not finish within {RUN_TIMEOUT_S}s:\n{out[-6000:]}")
    return proc.returncode, out


@pytest.fixture(scope="module")
def inputs(tiny_zoo, tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    prompts = write_prompts(d / "prompts.parquet", PROMPTS)

    def config(name: str, out: str) -> Path:
        path = d / f"{name}.yaml"
        path.write_text(yaml.safe_dump(synth_config_dict(tiny_zoo, prompts, out, **SETTINGS)))
        return path

    return SimpleNamespace(s3=config("s3", S3_OUT), local=config("local", str(d / "local_out")),
                           local_out=d / "local_out", dir=d)


@pytest.fixture(scope="module")
def s3_run(cluster, inputs, tmp_path_factory):
    """The run to the bucket, from an empty working directory (so a local copy would show there)."""
    cwd = tmp_path_factory.mktemp("s3_cwd")
    staging = tmp_path_factory.mktemp("staging")
    rc, log = _run_synth(inputs.s3, {**cluster.driver_env, "LAYTON_STAGING": str(staging)}, cwd)
    return SimpleNamespace(rc=rc, log=log, cwd=cwd, staging=staging)


@pytest.fixture(scope="module")
def local_run(cluster, inputs, s3_run, tmp_path_factory):
    """The same config to a local directory, on the same cluster (after the S3 run)."""
    rc, log = _run_synth(inputs.local, cluster.driver_env, tmp_path_factory.mktemp("local_cwd"))
    assert rc == 0, log[-6000:]
    return log


def _bucket_files(s3) -> dict[str, pafs.FileInfo]:
    """Relative name -> info of every object under the S3 output (recursively)."""
    base = f"{BUCKET}/run1/shards"
    infos = s3.fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return {i.path[len(base) + 1:]: i for i in infos if i.type == pafs.FileType.File}


def _s3_bytes(s3, name: str) -> bytes:
    with s3.fs.open_input_stream(f"{BUCKET}/run1/shards/{name}") as f:
        return f.read()


def _paths_naming(base: Path, needle: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        found += [os.path.join(dirpath, n) for n in dirnames + filenames if needle in n]
    return found


def test_synth_to_s3_on_two_nodes(s3_run, s3, cluster):
    assert s3_run.rc == 0, s3_run.log[-6000:]
    assert f"wrote {N_SHARDS} shard(s), kept 0 complete" in s3_run.log, s3_run.log[-6000:]

    files = _bucket_files(s3)
    for shard in range(N_SHARDS):
        for suffix in (".tar", ".parquet", STATS_SUFFIX):
            assert f"{shard_name(shard)}{suffix}" in files, sorted(files)
    assert "manifest.json" in files and not [n for n in files if ".tmp" in n]
    done = complete_shards(S3_OUT)
    assert sorted(done) == list(range(N_SHARDS))
    for shard, stats in done.items():
        assert files[f"{shard_name(shard)}.tar"].size == stats["tar_bytes"]

    index = read_index(S3_OUT).to_pylist()
    assert sorted(r["prompt"] for r in index) == sorted(PROMPTS)  # every prompt, once
    assert len({r["key"] for r in index}) == len(PROMPTS)
    assert sum(s["accepted"] for s in done.values()) > 0  # the tars hold samples, not only headers

    # Shards were worked on (and written) on both nodes. Not left to chance: node_b holds at most 3
    # of the 4 actors and the head at most 2, and when the scorer, the recaptioner and the one
    # generation actor that got work (the first up takes all shards of so small a run) share node_b,
    # it is full and the writer tasks run on the head.
    seen, name = set(), {cluster.head_node: "head", cluster.node_b: "node_b"}
    for shard, stats in sorted(done.items()):
        writer = stats["writer"]
        assert set(writer["stages"]) == {"generate", "score", "recaption"}, writer
        seen |= {writer["node_id"], *(s["node_id"] for s in writer["stages"].values())}
        print(f"shard {shard}: " + ", ".join(f"{stage} on {name.get(s['node_id'], s['node_id'])} (pid {s['pid']})"
                                            for stage, s in writer["stages"].items())
              + f", written on {name.get(writer['node_id'], writer['node_id'])} (pid {writer['pid']})")
    assert seen == {cluster.head_node, cluster.node_b}, (seen, cluster.head_node, cluster.node_b)

    # No local copy of the output anywhere: not in the driver's working dir (left empty), not in a
    # staging dir, the repository, the nodes' temp dirs (the workers' own files) or at /BUCKET.
    assert list(s3_run.cwd.iterdir()) == [] and list(s3_run.staging.iterdir()) == []
    assert not Path("/", BUCKET).exists() and not (ROOT / "s3:").exists()
    assert not [p for p in ROOT.iterdir() if BUCKET in p.name]
    for d in cluster.local_dirs:
        assert _paths_naming(Path(d), BUCKET) == [] and not list(Path(d).rglob("0000[0-9].tar")), d


def _without_writer(data: bytes) -> dict:
    """A shard's completion record without who wrote it and when."""
    stats = json.loads(data)
    stats.pop("writer")
    stats.pop("completed_at")
    return stats


def test_s3_output_equals_local_run(s3_run, local_run, s3, inputs):
    assert s3_run.rc == 0, s3_run.log[-6000:]
    local = inputs.local_out
    s3_files = {n for n in _bucket_files(s3) if n[:5].isdigit()}
    local_files = {p.name for p in local.iterdir() if p.name[:5].isdigit()}
    assert s3_files == local_files and len(s3_files) == 3 * N_SHARDS
    for shard in range(N_SHARDS):
        name = shard_name(shard)
        assert _s3_bytes(s3, f"{name}.tar") == (local / f"{name}.tar").read_bytes(), name
        assert _without_writer(_s3_bytes(s3, f"{name}{STATS_SUFFIX}")) == \
            _without_writer((local / f"{name}{STATS_SUFFIX}").read_bytes()), name
        local_index = pq.read_table(local / f"{name}.parquet").to_pylist()
        assert read_index(S3_OUT, {shard: {}}).to_pylist() == local_index, name
    assert read_index(S3_OUT).to_pylist() == read_index(local).to_pylist()


def test_rerun_on_s3_writes_nothing(s3_run, s3, cluster, inputs, tmp_path):
    assert s3_run.rc == 0, s3_run.log[-6000:]
    shard_files = lambda: {n: (i.size, i.mtime_ns) for n, i in _bucket_files(s3).items()  # noqa: E731
                           if n not in ("manifest.json", "config.yaml")}  # a run rewrites these two
    before, records, jobs_before = shard_files(), complete_shards(S3_OUT), _jobs(cluster.dashboard_url)
    rc, log = _run_synth(inputs.s3, cluster.driver_env, tmp_path)
    assert rc == 0, log[-6000:]
    assert f"synth: already complete: {S3_OUT}" in log, log  # the run's completion record, read before Ray
    assert "shard 0" not in log  # no shard progress lines
    assert shard_files() == before and complete_shards(S3_OUT) == records  # nothing rewritten or removed
    assert _jobs(cluster.dashboard_url) == jobs_before  # the rerun never joined the cluster



def test_shard_stats_read_the_bucket(s3_run, s3):
    from pipelines.stats import shard_summary

    assert s3_run.rc == 0, s3_run.log[-6000:]
    summary = shard_summary(S3_OUT)
    index = read_index(S3_OUT).to_pylist()
    assert summary["shards"] == N_SHARDS and summary["total"] == len(PROMPTS) == len(index)
    assert summary["accepted"] == sum(r["status"] == "accepted" for r in index)
    assert summary["thresholds"]["mps"] == SETTINGS["scoring__mps_threshold"]  # the manifest, read from S3
