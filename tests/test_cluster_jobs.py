"""`layton cluster` / `layton jobs` against a real local Ray head (no mocks).

One head for the module, on free ports with a private state file; its teardown checks that
`cluster_down` left nothing of it running.
"""

from __future__ import annotations

import argparse
import re
import socket
import time
import urllib.request

import psutil
import pytest

from app import jobs
from app.cli_cluster import add_cluster_commands
from app.cluster import ClusterError, _head_processes, cluster_down, cluster_status, cluster_up, free_port, port_in_use

WORKFLOW = "name: tiny\nsteps: [a, b]\n"

PRINT_SCRIPT = """\
import os
print("first line:", os.environ["LAYTON_WORKFLOW"].splitlines()[0])
"""

# A driver that records custom metrics, then keeps them fresh until the test has seen them and
# stops the job (the loop's bound is only a backstop).
METRICS_SCRIPT = """\
import time
import ray
from ray.util.metrics import Counter, Histogram

ray.init()
counter = Counter("layton_test_counter", description="test counter", tag_keys=("workflow",))
counter.set_default_tags({"workflow": "metrics"})
hist = Histogram("layton_test_seconds", description="test histogram", boundaries=[0.1, 1.0, 10.0],
                 tag_keys=("workflow",))
hist.set_default_tags({"workflow": "metrics"})
print("recording", flush=True)
for _ in range(90):
    counter.inc()
    hist.observe(0.5)
    time.sleep(1)
"""


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster") / "cluster.json"
    ports = [free_port() for _ in range(3)]
    info = cluster_up(*ports, num_cpus=1, state_file=state)
    recorded = cluster_status(state)
    try:
        yield {**info, "state": state, "ports": ports}
    finally:
        assert cluster_down(state)
        assert not state.exists()
        assert _head_processes(recorded["session_id"], recorded["temp_dir"], recorded["up_at"]) == []
        assert not any(port_in_use(p) for p in ports), "a port of the stopped head is still bound"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("wd")
    (d / "show.py").write_text(PRINT_SCRIPT)
    (d / "metrics_job.py").write_text(METRICS_SCRIPT)
    return d


@pytest.fixture(scope="module")
def finished_job(head, workdir):
    job_id = jobs.submit_workflow(head["dashboard_url"], "tiny", WORKFLOW, working_dir=workdir,
                                  entrypoint="python show.py")
    assert jobs.wait_for_job(head["dashboard_url"], job_id, timeout_s=120) == "SUCCEEDED", \
        jobs.job_logs(head["dashboard_url"], job_id)
    return job_id


def test_submit_runs_with_workflow_env(head, finished_job):
    url = head["dashboard_url"]
    assert re.fullmatch(r"layton-tiny-\d{8}-\d{6}", finished_job)
    assert "first line: name: tiny" in jobs.job_logs(url, finished_job)
    assert "first line: name: tiny" in "".join(jobs.job_logs(url, finished_job, follow=True))
    s = jobs.job_status(url, finished_job)
    assert s["status"] == "SUCCEEDED" and s["metadata"]["layton_workflow"] == "tiny"
    assert s["entrypoint"] == "python show.py" and s["end_time"] >= s["start_time"]


def test_second_submit_refused_while_running_then_stop(head, workdir):
    url = head["dashboard_url"]
    sleeper = jobs.submit_workflow(url, "sleepy", WORKFLOW, working_dir=workdir,
                                   entrypoint="python -c 'import time; time.sleep(300)'")
    try:
        with pytest.raises(jobs.WorkflowAlreadyRunning, match=re.escape(sleeper)) as e:
            jobs.submit_workflow(url, "sleepy", WORKFLOW, working_dir=workdir, entrypoint="true")
        assert e.value.submission_id == sleeper and "sleepy" in str(e.value)
    finally:
        jobs.stop_job(url, sleeper)
    assert jobs.wait_for_job(url, sleeper, timeout_s=60, poll_s=0.5) == "STOPPED"


def _metric_lines(url: str, needle: str) -> list[str]:
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    return [line for line in body.splitlines() if needle in line and not line.startswith("#")]


def test_custom_metrics_reach_the_export_endpoint(head, workdir):
    url = head["dashboard_url"]
    job_id = jobs.submit_workflow(url, "metrics", WORKFLOW, working_dir=workdir, entrypoint="python metrics_job.py")
    try:
        deadline = time.monotonic() + 60
        while "recording" not in jobs.job_logs(url, job_id):
            assert jobs.job_status(url, job_id)["status"] in jobs.ACTIVE and time.monotonic() < deadline
            time.sleep(0.5)
        recording = time.monotonic()
        # Ray's agent exports custom metrics every ~10 s (metrics_report_interval_ms), after the
        # worker has reported them to it: give it a few intervals.
        while not (lines := _metric_lines(head["metrics_url"], "layton_test_counter")):
            assert time.monotonic() - recording < 60, "layton_test_counter never reached the endpoint"
            time.sleep(1)
        print(f"custom metric exported {time.monotonic() - recording:.1f}s after the driver recorded it")
        hist = _metric_lines(head["metrics_url"], "layton_test_seconds")
        print("\n".join(lines + hist))
    finally:
        jobs.stop_job(url, job_id)
    names = {re.match(r"[^{ ]+", line).group(0) for line in lines + hist}
    assert "ray_layton_test_counter_total" in names or "ray_layton_test_counter" in names, names
    assert any(n.startswith("ray_layton_test_seconds_bucket") for n in names), names
    assert any('workflow="metrics"' in line for line in lines)


def test_connect_to_closed_port_fails_fast():
    address = f"http://127.0.0.1:{free_port()}"
    t = time.monotonic()
    with pytest.raises(ConnectionError, match=re.escape(address)) as e:
        jobs.connect(address)
    assert "layton cluster up" in str(e.value)
    assert time.monotonic() - t < 15


def test_unknown_job_id(head):
    with pytest.raises(jobs.UnknownJob, match="layton-nope-1"):
        jobs.job_status(head["dashboard_url"], "layton-nope-1")


def test_cluster_up_refuses_live_head_and_busy_port(head, tmp_path):
    with pytest.raises(ClusterError, match=re.escape(head["address"])):
        cluster_up(*(free_port() for _ in range(3)), state_file=head["state"])
    other = tmp_path / "other.json"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        dashboard_port = free_port()
        with pytest.raises(ClusterError, match=f"port {port}"):
            cluster_up(port=port, dashboard_port=dashboard_port, metrics_export_port=free_port(), state_file=other)
    assert not other.exists() and not port_in_use(dashboard_port)  # nothing was started


def test_cli_jobs_status(head, finished_job, capsys, monkeypatch):
    monkeypatch.setenv("LAYTON_CLUSTER_STATE", str(head["state"]))
    parser = argparse.ArgumentParser()
    add_cluster_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["jobs", "status", finished_job, "--address", head["dashboard_url"]])
    args.fn(args)
    out = capsys.readouterr().out
    assert f"{finished_job}: SUCCEEDED" in out and "workflow:   tiny" in out
    # without --address (and RAY_ADDRESS unset): the recorded local head
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    args = parser.parse_args(["jobs", "logs", finished_job])
    args.fn(args)
    assert "first line: name: tiny" in capsys.readouterr().out
    args = parser.parse_args(["cluster", "status"])
    args.fn(args)
    assert f"up: {head['address']}" in capsys.readouterr().out


def test_port_check_counts_listeners_not_outgoing_sockets():
    """A port that an outgoing connection holds as its local end is free to listen on."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert port_in_use(server.getsockname()[1])
        with socket.socket() as client:
            client.bind(("127.0.0.1", 0))
            client.connect(server.getsockname())
            assert not port_in_use(client.getsockname()[1])


def test_head_takes_no_fixed_default_port(head):
    """The autoscaler's and the dashboard's metrics ports (Ray's fixed 44217 and 44227) are free ports
    recorded with the others, on 127.0.0.1, so two local heads do not collide."""
    recorded = cluster_status(head["state"])
    pids = {p.pid for p in _head_processes(recorded["session_id"], recorded["temp_dir"], recorded["up_at"])}
    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids}
    ports = recorded["ports"]
    for name in ("autoscaler_metric_port", "dashboard_metric_port"):
        assert ports[name] not in (44217, 44227)
    assert ("127.0.0.1", ports["dashboard_metric_port"]) in listening, (ports, sorted(listening))
    assert not {p for _, p in listening} & {44217, 44227}, sorted(listening)
    assert {ip for ip, _ in listening} <= {"127.0.0.1", "::ffff:127.0.0.1"}, sorted(listening)
