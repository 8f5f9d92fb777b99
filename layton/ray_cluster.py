"""Connecting to Ray: the configured cluster, a Ray Job's cluster, or a local instance."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import ray


def is_local(ray_cfg) -> bool:
    """Whether `ray_cfg` means a local instance started by this process (no cluster address)."""
    return not (ray_cfg.address or os.environ.get("RAY_ADDRESS"))


class RayStartError(RuntimeError):
    """A local Ray instance could not be started (the CLI exits 3 with this message)."""


START_TIMEOUT_ENV = "LAYTON_RAY_START_TIMEOUT_S"  # total budget for starting a local instance


def start_local_ray(**init_kwargs) -> None:
    """`ray.init(**init_kwargs)` for a new local instance, bound to 127.0.0.1 and tied to this process.

    - Loopback only: Ray's single-machine mode (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, which Ray
      reads when it is imported, hence also set on its constant here) gives the node 127.0.0.1 as
      its address, so GCS, raylet, object manager and workers listen there instead of on every
      interface. A user who sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 keeps Ray's default.
    - Start-up: Ray gives a node 30 s to register; on a loaded machine that can pass, so the start
      is retried until `$LAYTON_RAY_START_TIMEOUT_S` (default 180) is spent; then, as for any other
      start-up failure, a RayStartError says what happened.
    - Fate sharing: a watchdog process kills the instance's processes (workers included, which sit in
      process groups of their own) as soon as this process dies, however it dies.
    """
    from ray._private import ray_constants

    if os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR) != "1":
        os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    budget = float(os.environ.get(START_TIMEOUT_ENV, "180"))
    deadline = time.monotonic() + budget
    while True:
        try:
            ray.init(**init_kwargs)
            break
        except Exception as e:  # noqa: BLE001 — ray.init raises bare Exception, OSError, ValueError, ...
            ray.shutdown()
            timed_out = "timed out during startup" in str(e)
            if timed_out and time.monotonic() < deadline:
                continue
            hint = f" (the machine may be overloaded: raise ${START_TIMEOUT_ENV}, now {budget:.0f} s)" if timed_out else ""
            raise RayStartError(f"could not start a local Ray instance: {type(e).__name__}: {e}{hint}") from None
    _start_watchdog()


def _start_watchdog() -> None:
    """A process that waits for EOF on a pipe only this process holds (it comes when this process
    exits or is killed) and then kills the local instance's daemons and everything below them."""
    import psutil

    node = ray._private.worker._global_node
    # pid:start time (a pid reused after a normal shutdown is left alone) of the daemons and what
    # runs below them now: the watchdog may not have looked yet when the driver dies.
    daemons = []
    for procs in node.all_processes.values():
        for p in procs:
            try:
                top = psutil.Process(p.process.pid)
                daemons += [f"{q.pid}:{q.create_time()}" for q in (top, *top.children(recursive=True))]
            except psutil.Error:
                pass
    read_end, write_end = os.pipe()
    subprocess.Popen([sys.executable, "-c", WATCHDOG, *daemons], stdin=read_end, start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
    os.close(read_end)
    os.set_inheritable(write_end, False)  # Ray's own children must not keep the pipe open
    _WATCHDOG_PIPES.append(write_end)


_WATCHDOG_PIPES: list[int] = []
WATCHDOG = """
import select, sys, psutil
seen = {}  # pid -> start time of the daemons and every process seen below them
for arg in sys.argv[1:]:
    pid, started = arg.split(":")
    seen[int(pid)] = float(started)

def alive():
    out = []
    for pid, started in list(seen.items()):
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - started) < 1e-3:
                out.append(p)
                continue
        except psutil.Error:
            pass
        del seen[pid]
    return out

def look():
    # Polled: when the driver dies Ray's raylet dies with it, and its children are orphans at once.
    for p in alive():
        try:
            for c in p.children(recursive=True):
                seen.setdefault(c.pid, c.create_time())
        except psutil.Error:
            pass

while not select.select([sys.stdin], [], [], 0.5)[0]:
    look()
sys.stdin.buffer.read()
look()
for p in alive():
    try:
        p.kill()
    except psutil.Error:
        pass
"""


def init_ray(ray_cfg) -> bool:
    """Connect as `ray_cfg` (a RayConfig) says. Returns True when this call started a local instance."""
    if ray.is_initialized():
        return False
    if not is_local(ray_cfg):
        ray.init(address=ray_cfg.address)  # None here means RAY_ADDRESS: a Ray Job's cluster
        return False
    # Local instance; the dashboard (and the metrics it shows) listens on 127.0.0.1 only.
    start_local_ray(num_cpus=ray_cfg.num_cpus, num_gpus=ray_cfg.num_gpus, include_dashboard=ray_cfg.dashboard,
                    dashboard_host="127.0.0.1")
    return True


@contextmanager
def ray_session(ray_cfg):
    """Ray for the duration of a block: connected as `init_ray` does; a local instance started here
    is shut down at the end. Inside a workflow (Ray already up) it neither starts nor stops anything."""
    started_here = init_ray(ray_cfg)
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()
            while _WATCHDOG_PIPES:  # the instance is gone: its watchdog may go too
                os.close(_WATCHDOG_PIPES.pop())


def check_shared_storage(locations) -> None:
    """On a cluster of more than one node, a local root must be storage that every node sees (NFS,
    a mounted bucket): a task on each node reads a probe file the driver wrote there, and the run
    is refused, naming the nodes and the path, when one does not see it. URIs need no check."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from layton.storage import Root, is_uri  # (storage loads pyarrow: not needed to connect)

    local = sorted({str(p) for p in locations if p is not None and not is_uri(p)})
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not local or len(nodes) < 2:
        return
    for path in local:
        d = Path(path).resolve()
        while not d.exists():  # the root may not exist yet: its nearest existing parent is probed
            d = d.parent
        root = Root(d)
        token = os.urandom(8).hex()
        probe = f".layton-shared-check-{token}"
        root.write(probe, token.encode())
        try:
            refs = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]: _read_probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(root.join(probe))
                for n in nodes}
            blind = [node for node, ref in refs.items() if ray.get(ref, timeout=300) != token]
        finally:
            root.delete(probe)
        if blind:
            raise RuntimeError(
                f"{path}: a local path is used as a root on a {len(nodes)}-node cluster, but node(s) "
                f"{', '.join(blind)} do not see it: use storage every node mounts at this path, or a URI "
                "root (s3://..., gs://...)")


@ray.remote(num_cpus=0)
def _read_probe(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None
