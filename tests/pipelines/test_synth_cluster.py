"""`layton synth` and a submitted workflow on a real 2-node Ray cluster writing to an S3-compatible
object store (no mocks).

One cluster and one object store for the module (DESIGN.md §8): `ray start --head` (2 CPUs) and a
second node joined with `ray start --address` (3 CPUs, resource `node_b`), each with its own temp
dir, working directory and free ports, and moto's S3 server on 127.0.0.1. The stage actors (2
generation, 1 scoring, 1 recaption: 4 CPUs, + 1 for Ray Data's tasks) cannot all fit on one node,
so shards are worked on both. The nodes are started with the object store's endpoint and dummy
credentials in their environment, as a real cluster's nodes have theirs; each fixture stops
exactly the processes it started. The runs are `layton synth` processes joined by RAY_ADDRESS, and
one workflow submitted as a Ray Job. Where the machine allows it (root, `unshare`), node_b runs in
a mount namespace of its own with a tmpfs over one directory: a local root there is what a node
without the shared disk sees.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from app.cluster import HOST, _head_processes, _http_answers, _stop_processes, _token_auth_on, free_port, port_in_use
from layton.storage import Root
from pipelines.shards import STATS_SUFFIX, complete_shards, read_index, shard_name
from tests.conftest import BIN, ROOT, synth_config_dict, write_prompts
from tests.conftest import S3_BUCKET as BUCKET  # unique, so a stray local copy would be found by name

HEAD_CPUS, NODE_B_CPUS = 2, 3
S3_OUT = f"s3://{BUCKET}/run1/shards"
PROMPTS = [f"a {c} {o} at dawn" for c in ("red", "green", "blue", "black", "white", "golden")
           for o in ("cat", "car", "house", "boat")][:22]  # 6 shards of 4 (the last one 2)
N_SHARDS = 6
SETTINGS = dict(output__shard_size=4, generation__batch_size=2,
                generation__resources={"num_actors": 2, "num_cpus": 1},
                # thresholds that split the tiny models' scores (as in test_synth.py)
                scoring__imagereward_threshold=-1.6, scoring__mps_threshold=-8.0)
# RAY_raylet_start_wait_time_s: the machine is shared and loaded; a slower CI raises both.
START_WAIT_S = os.environ.get("LAYTON_RAY_START_TIMEOUT_S", "180")
NODE_START_TIMEOUT_S = float(START_WAIT_S) + 60
RUN_TIMEOUT_S = 600
# The nodes' address: a loopback address that Ray does not rewrite. For "127.0.0.1" (and
# "localhost") a multi-node Ray substitutes the machine's routable IP; every byte of this test
# must stay on the loopback range.
NODE_HOST = "127.0.0.2"


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


def _private_mount(directory: Path) -> list[str]:
    """A command prefix that runs the command with a tmpfs over `directory` that only it (and its
    children) see; [] where this machine does not allow mount namespaces."""
    prefix = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"',
              str(directory)]
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        return []
    return prefix


def _ray_start(args: list[str], temp_dir: str, cwd: Path, env: dict, prefix: list[str] = ()) -> tuple[int, float]:
    """`ray start ARGS` in a session of its own (its daemons and their workers keep its id), from
    `cwd` (the workers' working directory), after `prefix`. Returns (session id, when it was up)."""
    log = Path(temp_dir) / "ray_start.log"
    with open(log, "wb") as out:
        starter = subprocess.Popen([*prefix, str(BIN / "ray"), "start", *args, f"--temp-dir={temp_dir}",
                                    "--disable-usage-stats"],
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
        private = tmp_path_factory.mktemp("not_on_node_b")  # node_b sees an empty tmpfs here
        prefix = _private_mount(private)
        b_cwd = tmp_path_factory.mktemp("nodeb_cwd")

        def start_node_b() -> str:
            """Start (or restart, after a test killed it) node_b; returns its node id once it is alive."""
            before = {n.node_id for n in _alive_nodes(dashboard_url)}
            b_temp = _short_temp_dir(tmp_path_factory, "nodeb")
            nodes.append((*_ray_start(
                [f"--address={NODE_HOST}:{port}", f"--node-ip-address={NODE_HOST}", f"--num-cpus={NODE_B_CPUS}",
                 "--num-gpus=0", '--resources={"node_b": 1}', f"--object-store-memory={512 << 20}",
                 "--min-worker-port=0", "--max-worker-port=0",  # any free port, not the head's range
                 *extra("node-manager-port", "object-manager-port", *agent_ports)], b_temp, b_cwd, env, prefix), b_temp))
            deadline = time.monotonic() + NODE_START_TIMEOUT_S
            while not (new := [n for n in _alive_nodes(dashboard_url) if n.node_id not in before
                               and "node_b" in (n.resources_total or {})]):
                assert time.monotonic() < deadline, f"node_b did not join: {_alive_nodes(dashboard_url)}"
                time.sleep(1)
            return new[0].node_id

        start_node_b()
        alive = _alive_nodes(dashboard_url)
        head_node = [n.node_id for n in alive if n.is_head_node]
        node_b = [n.node_id for n in alive if "node_b" in (n.resources_total or {})]
        assert len(alive) == 2 and len(head_node) == len(node_b) == 1 and head_node != node_b, alive
        assert {n.node_ip for n in alive} == {NODE_HOST}, alive  # both nodes on the loopback range
        yield SimpleNamespace(
            address=f"{NODE_HOST}:{port}", dashboard_url=dashboard_url, head_node=head_node[0], node_b=node_b[0],
            local_dirs=[head_temp, head_cwd, nodes[1][2], b_cwd],  # where the nodes' processes write
            node_b_processes=lambda: _head_processes(nodes[-1][0], nodes[-1][2], nodes[-1][1]),  # the latest node_b's
            start_node_b=start_node_b,
            private=private if prefix else None,  # a directory node_b does not see (None: no namespaces here)
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
    assert not port_in_use(port, NODE_HOST) and not port_in_use(dashboard_port)


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
    rc, log = _run_synth(inputs.s3, cluster.driver_env, cwd)
    return SimpleNamespace(rc=rc, log=log, cwd=cwd)


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

    # No local copy of the output anywhere: not in the driver's working dir (left empty), the
    # repository, the nodes' temp dirs (the workers' own files) or at /BUCKET.
    assert list(s3_run.cwd.iterdir()) == []
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


def test_local_root_unseen_by_a_node_is_refused(cluster, inputs, tiny_zoo, tmp_path):
    """A local output directory that node_b does not see (its own tmpfs there) is refused before any
    shard is worked on, naming the path and the node; nothing is left in the directory."""
    if cluster.private is None:
        pytest.skip("this machine allows no mount namespace (unshare): every node sees every local path")
    out = cluster.private / "out"
    cfg = tmp_path / "private.yaml"
    cfg.write_text(yaml.safe_dump(synth_config_dict(tiny_zoo, inputs.dir / "prompts.parquet", str(out), **SETTINGS)))
    rc, log = _run_synth(cfg, cluster.driver_env, tmp_path)
    assert rc != 0 and "do not see it" in log and str(cluster.private) in log, log[-3000:]
    assert cluster.node_b[:8] in log and cluster.head_node[:8] not in log.split("do not see it")[0][-200:], log[-3000:]
    assert not list(cluster.private.rglob("*")), list(cluster.private.rglob("*"))


@pytest.mark.slow
def test_workflow_submitted_to_two_nodes_on_s3(cluster, s3, tiny_zoo, tmp_path):
    """`layton workflow submit` of synthesis (2 generation actors) + the tokenizer (stage 1 on 2 Ray
    Train workers spread over the nodes) + reconstruction metrics and COCO scoring side by side, with
    `root: s3://…`: the job succeeds, the shards were worked on both nodes, the training ranks ran on
    both nodes, the two evaluations ran at once, and every output is in the bucket."""
    from ray.util.state.common import ListApiOptions, StateResource

    from app.jobs import job_logs, wait_for_job

    demo = yaml.safe_load((ROOT / "workflows/demo.yaml").read_text().replace("runs/demo/zoo", str(tiny_zoo)))
    prompts = write_prompts(tmp_path / "prompts.parquet", PROMPTS[:12])
    synth = demo["stages"]["synth"]
    synth["prompts"]["paths"] = [str(prompts)]
    synth["output"]["shard_size"] = 4
    synth["generation"]["resources"] = {"num_actors": 2, "num_cpus": 1}
    tok = demo["stages"]["tokenizer"]
    tok["run"] = {"num_workers": 2, "cpus_per_worker": 1, "placement_strategy": "SPREAD"}
    tok["stage1"].update(max_steps=4, checkpoint_every=2, log_every=2, image_every=4, batch_size=2,
                         resolution_schedule=[[0, 64]])
    tok["stage2"].update(max_steps=2, checkpoint_every=2, log_every=2, image_every=2, batch_size=2,
                         resolution_schedule=[[0, 64]])
    root = f"s3://{BUCKET}/wf-2node"
    # Two evaluations of 1 actor + 1 task CPU each fit the 5 CPUs together: they start side by side.
    recon = {**demo["stages"]["eval_recon"], "size": 64}  # the synthesis shards, the stage-2 tokenizer
    recon["models"] = recon["models"][:1]
    coco = {**demo["stages"]["eval_coco"], "captions": str(ROOT / "workflows/data/coco_captions_demo.json"),
            "limit": 2, "images": f"{root}-coco-images", "scorers": {"hpsv2": demo["stages"]["eval_coco"]["scorers"]["hpsv2"]}}
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 90, 30)).save(buf, format="PNG")
    for i in (139, 285):
        Root(coco["images"]).write(f"{i}.png", buf.getvalue())
    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump({"name": "two-node", "root": root, "ray": {"dashboard": True},
                                  "stages": {"synth": synth, "tokenizer": tok, "eval_recon": recon, "eval_coco": coco}}))
    env = {**os.environ, **cluster.driver_env}
    env.pop("RAY_ADDRESS")
    sub = subprocess.run([sys.executable, "-m", "app.cli", "workflow", "submit", str(wf), "--address",
                          cluster.dashboard_url], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    sid = sub.stdout.split()[0]
    assert wait_for_job(cluster.dashboard_url, sid, timeout_s=RUN_TIMEOUT_S) == "SUCCEEDED", \
        job_logs(cluster.dashboard_url, sid)[-5000:]

    shards = complete_shards(f"{root}/shards")
    assert sorted(shards) == [0, 1, 2]
    seen = {n for st in shards.values() for n in (st["writer"]["node_id"], *(s["node_id"] for s in
                                                                             st["writer"]["stages"].values()))}
    assert seen == {cluster.head_node, cluster.node_b}, seen
    actors = _state_client(cluster.dashboard_url).list(StateResource.ACTORS, options=ListApiOptions(detail=True, limit=10000),
                                                       raise_on_missing_output=False)
    trainers = {a.node_id for a in actors if "TrainWorker" in (a.class_name or "")}
    assert trainers == {cluster.head_node, cluster.node_b}, [(a.class_name, a.node_id) for a in actors]
    files = Root(root).list(recursive=True)
    for name in ("workflow_state.json", "report.html", "train/tokenizer-stage1/history.jsonl",
                 "train/tokenizer-stage1/tokenizer/model_index.json", "train/tokenizer-stage2/tokenizer/model_index.json"):
        assert name in files, sorted(files)
    state = json.loads(Root(root).read("workflow_state.json"))["stages"]
    assert all(s["status"] == "complete" for s in state.values()), state
    r, c = state["eval_recon"], state["eval_coco"]
    assert r["started"] < c["finished"] and c["started"] < r["finished"], state  # side by side
    assert {"eval/recon/results.json", "eval/coco/results.json"} <= set(files), sorted(files)
    for d in cluster.local_dirs:  # the nodes kept no copy of the run's files
        assert not list(Path(d).rglob("history.jsonl")) and not list(Path(d).rglob("0000[0-9].tar")), d


@pytest.mark.slow
def test_worker_node_killed_during_synthesis_resumes_exactly_once(cluster, inputs, s3, tiny_zoo, tmp_path):
    """node_b's raylet is SIGKILLed while a synthesis to S3 runs. The run either completes on the
    head or is stopped and, after node_b is back, rerun: the bucket then holds every prompt exactly
    once (complete shards kept, partial ones redone, no torn objects). Runs last: it replaces node_b."""
    out = f"s3://{BUCKET}/run-kill/shards"
    cfg = tmp_path / "kill.yaml"
    cfg.write_text(yaml.safe_dump(synth_config_dict(tiny_zoo, inputs.dir / "prompts.parquet", out, **SETTINGS)))
    env = {**os.environ, **cluster.driver_env}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "synth", str(cfg)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not complete_shards(out):  # some work is done (and durable) before the node goes
        assert proc.poll() is None, proc.stdout.read()[-5000:]
        assert time.monotonic() < deadline, "no shard completed"
        time.sleep(0.5)
    raylets = [p for p in cluster.node_b_processes() if "raylet" in " ".join(p.cmdline())]
    assert len(raylets) == 1, raylets
    raylets[0].kill()
    try:  # the head alone may or may not finish (the stage actors do not all fit there)
        log, _ = proc.communicate(timeout=150)
        finished = proc.returncode == 0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        finished = False
    print(f"after the raylet kill: {'completed on the head' if finished else 'stopped; resumed below'}")
    if not finished:
        cluster.start_node_b()
        rc, log = _run_synth(cfg, cluster.driver_env, tmp_path)
        assert rc == 0, log[-6000:]
    done = complete_shards(out)
    assert sorted(done) == list(range(N_SHARDS)), sorted(done)
    index = read_index(out).to_pylist()
    assert sorted(r["prompt"] for r in index) == sorted(PROMPTS) and len({r["key"] for r in index}) == len(PROMPTS)
    files = Root(out).list(recursive=True)
    assert not [n for n in files if ".tmp" in n], sorted(files)
    for shard, stats in done.items():
        assert files[f"{shard_name(shard)}.tar"] == stats["tar_bytes"], shard
