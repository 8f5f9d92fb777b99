"""A local Ray head for `layton cluster up|down|status`.

The head is started with `ray start --head` in a fresh session (setsid) and a private temp dir, and
its processes are recorded in a state file. `cluster_down` stops only that head: `ray stop` would
kill every Ray process of the user on the machine, other people's local instances included.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import psutil

DEFAULT_STATE = Path("~/.layton/cluster.json")
HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0  # `ray start` plus the dashboard; slow on small shared machines


class ClusterError(RuntimeError):
    """A head could not be started or stopped."""


def state_path(state_file: str | Path | None = None) -> Path:
    """The state file: the argument, else $LAYTON_CLUSTER_STATE, else ~/.layton/cluster.json.
    Resolved per call so that the env var set after import still counts."""
    return Path(state_file or os.environ.get("LAYTON_CLUSTER_STATE") or DEFAULT_STATE).expanduser()


def port_in_use(port: int, host: str = HOST) -> bool:
    """True when something listens on `port` at `host` (a listener on 0.0.0.0 answers there too).
    A connection, not a bind(): an outgoing socket that happens to hold the port as its local end
    does not stop a server from listening on it."""
    with socket.socket() as s:
        s.settimeout(2.0)
        return s.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _http_answers(url: str, timeout: float = 2.0) -> bool:
    """Any HTTP answer counts: with Ray's token auth on (the default once ~/.ray/auth_token exists)
    the dashboard answers 401 to a request without the token."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # local: never via a proxy
    try:
        with opener.open(url, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # refused, reset, timeout, not HTTP
        return False


def _proc_alive(rec: dict) -> bool:
    """The recorded process still runs (same pid *and* start time, so a reused pid doesn't count)."""
    try:
        p = psutil.Process(rec["pid"])
        return abs(p.create_time() - rec["create_time"]) < 1.0 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _gone(p: psutil.Process) -> bool:
    # The daemons are orphans (`ray start` exits), so a dead one stays a zombie until PID 1 reaps
    # it, which some container inits do only after a while: it holds no ports, so it is stopped.
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _head_processes(sid: int | None, temp_dir: str | None, up_at: float | None = None) -> list[psutil.Process]:
    """This head's processes: its session (everything `ray start` spawned, workers included), anything
    naming its private temp dir, and all their descendants (job drivers run in sessions of their own).

    With `up_at` (when the head was up) the session counts only while a member started before then:
    Linux reuses a session id only once every process of the session is gone, so a session made
    solely of newer processes is someone else's that got the same number.
    """
    me = os.getuid()
    session: dict[int, psutil.Process] = {}
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline", "uids", "create_time"]):
        try:
            if p.info["uids"] is None or p.info["uids"].real != me or p.pid == os.getpid():
                continue
            if sid is not None and os.getsid(p.pid) == sid:
                session[p.pid] = p
            elif temp_dir and any(temp_dir in a for a in (p.info["cmdline"] or [])):
                found[p.pid] = p
        except (psutil.Error, OSError):
            continue
    if up_at is None or any((p.info["create_time"] or up_at + 2) <= up_at + 1 for p in session.values()):
        found.update(session)
    for p in list(found.values()):
        try:
            for c in p.children(recursive=True):
                found.setdefault(c.pid, c)
        except psutil.Error:
            pass
    found.pop(os.getpid(), None)
    return [p for p in found.values() if not _gone(p)]


def _stop_processes(procs: list[psutil.Process], grace_s: float = 5.0) -> list[psutil.Process]:
    """SIGTERM, then SIGKILL what is left after `grace_s` (what `ray stop` does too; gcs_server and the
    autoscaler monitor ignore SIGTERM for 30 s+, and a local head has no state worth a longer wait).
    Returns the processes still alive."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        deadline = time.monotonic() + wait_s
        while procs and time.monotonic() < deadline:
            procs = [p for p in procs if not _gone(p)]
            time.sleep(0.2)
        procs = [p for p in procs if not _gone(p)]
    return procs


def _token_auth_on() -> bool:
    """Whether `ray start` enables token auth: RAY_AUTH_MODE if set, else whether a token exists."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode:
        return mode.lower() == "token"
    try:
        from ray._raylet import AuthenticationTokenLoader

        return bool(AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True))
    except Exception:  # a Ray without token auth
        return False


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ClusterError(f"{path}: unreadable cluster state ({e}); remove it if no head runs") from None


def _is_alive(state: dict) -> bool:
    gcs = [r for r in state.get("processes", []) if r["name"] == "gcs_server"]
    return bool(gcs) and all(_proc_alive(r) for r in gcs)


def cluster_up(port: int = 6379, dashboard_port: int = 8265, metrics_export_port: int = 8080,
               num_cpus: int | None = None, num_gpus: int | None = None,
               state_file: str | Path | None = None) -> dict:
    """Start a local Ray head bound to 127.0.0.1 and record it; returns address/dashboard_url/metrics_url."""
    path = state_path(state_file)
    old = _read_state(path)
    if old and _is_alive(old):
        raise ClusterError(f"a Ray head recorded in {path} is already up at {old['address']} "
                           f"(dashboard {old['dashboard_url']}); `layton cluster down` stops it")
    if old:  # a head that died: stop whatever is left of it and forget it
        cluster_down(path)
    ports = {"port": port, "dashboard_port": dashboard_port, "metrics_export_port": metrics_export_port}
    for flag, p in ports.items():
        if port_in_use(p):
            raise ClusterError(f"port {p} (--{flag.replace('_', '-')}) is already in use; pick another")
    # Ports Ray would otherwise take from fixed defaults (client server 10001, agent 52365, and the
    # autoscaler's and the dashboard's own metrics, 44217 and 44227, which only the environment
    # sets) and so collide with any other local Ray on the machine.
    ports.update(ray_client_server_port=free_port(), dashboard_agent_listen_port=free_port(),
                 dashboard_agent_grpc_port=free_port(), runtime_env_agent_port=free_port())
    env_ports = {"AUTOSCALER_METRIC_PORT": free_port(), "DASHBOARD_METRIC_PORT": free_port()}

    # A private, short temp dir: Ray writes `ray_current_cluster` there rather than in /tmp/ray, so a
    # plain ray.init() elsewhere on the machine does not silently attach to this head; short because
    # unix socket paths under it are limited to ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="lr-", dir="/tmp")
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "ray"), "start", "--head", f"--node-ip-address={HOST}", f"--port={port}",
           "--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={dashboard_port}",
           f"--metrics-export-port={metrics_export_port}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           *(f"--{k.replace('_', '-')}={v}" for k, v in ports.items()
             if k not in ("port", "dashboard_port", "metrics_export_port"))]
    ports.update({k.lower(): v for k, v in env_ports.items()})
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    # Job entrypoints run `python ...` with the raylet's PATH: put this interpreter's bin dir first.
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)  # `ray start --head` must not try to join another cluster
    # `ray start` turns --node-ip-address=127.0.0.1 into the machine's routable IP on Linux (its
    # multi-node default). Ray's single-machine mode (the macOS/Windows default) keeps the node, its
    # Prometheus exporter and the addresses it hands out on the loopback interface.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env.update({k: str(v) for k, v in env_ports.items()})
    log = Path(temp_dir) / "ray_start.log"
    with open(log, "wb") as out:
        # New session: every daemon `ray start` spawns (and the workers they spawn) share its sid,
        # which is how `cluster_down` finds them. Output to a file: the daemons outlive `ray start`.
        starter = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    sid = starter.pid
    dashboard_url = f"http://{HOST}:{dashboard_port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        try:
            rc = starter.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            raise ClusterError(f"`ray start --head` {'timed out' if rc is None else f'exited {rc}'}:\n"
                               + log.read_text(errors="replace")[-3000:])
        while not _http_answers(f"{dashboard_url}/api/version"):
            if time.monotonic() > deadline:
                raise ClusterError(f"the Ray dashboard did not answer at {dashboard_url} within "
                                   f"{START_TIMEOUT_S:.0f}s; logs under {temp_dir}/session_latest/logs")
            time.sleep(0.5)
    except BaseException:
        _stop_processes(_head_processes(sid, temp_dir))
        raise

    procs = []  # a snapshot for `status`; `down` finds workers started later by session id
    for p in _head_processes(sid, temp_dir):
        try:
            procs.append({"pid": p.pid, "name": p.name(), "create_time": p.create_time()})
        except psutil.Error:
            pass
    state = {
        "address": f"{HOST}:{port}",
        "dashboard_url": dashboard_url,
        "metrics_url": f"http://{HOST}:{metrics_export_port}/metrics",
        "ports": ports,
        "session_id": sid,
        "temp_dir": temp_dir,
        "processes": procs,
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        # What a driver run outside Ray Jobs needs to join this head (jobs' drivers inherit it).
        "driver_env": {"RAY_ADDRESS": f"{HOST}:{port}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                       **({"RAY_AUTH_MODE": "token"} if _token_auth_on() else {})},
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "up_at": time.time(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)
    return {k: state[k] for k in ("address", "dashboard_url", "metrics_url")}


def cluster_down(state_file: str | Path | None = None) -> bool:
    """Stop the recorded head's processes (only those) and forget it. False when none is recorded."""
    path = state_path(state_file)
    state = _read_state(path)
    if state is None:
        print(f"no Ray head recorded in {path}", file=sys.stderr)
        return False
    temp_dir = state.get("temp_dir")
    procs = _head_processes(state.get("session_id"), temp_dir, state.get("up_at", 0.0))
    # Recorded pids whose start time no longer matches belong to someone else now: never touch those.
    for r in state.get("processes", []):
        if r["pid"] not in {p.pid for p in procs} and _proc_alive(r):
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(r["pid"]))
    left = _stop_processes(procs)
    if left:
        raise ClusterError(f"could not stop Ray process(es) {[p.pid for p in left]} of the head at "
                           f"{state['address']}; {path} kept")
    if temp_dir and Path(temp_dir).name.startswith("lr-"):
        shutil.rmtree(temp_dir, ignore_errors=True)
    path.unlink(missing_ok=True)
    return True


def cluster_status(state_file: str | Path | None = None) -> dict | None:
    """The recorded head (None when none is) plus `alive`."""
    state = _read_state(state_path(state_file))
    return None if state is None else {**state, "alive": _is_alive(state)}
