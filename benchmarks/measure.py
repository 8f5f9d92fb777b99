"""What the benchmarks share: a `layton` command in a subprocess, timed, with its process tree's peak RSS."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(root: psutil.Process) -> int:
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:  # the command just ended
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_layton(*args: str) -> dict:
    """`layton ARGS` in a subprocess: wall time and the peak RSS of its whole process tree (driver,
    raylet, actors), sampled every 0.1 s."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "layton.cli", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, root = 0, psutil.Process(proc.pid)

    def sample():
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, tree_rss(root))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log = proc.communicate()[0]
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"layton {' '.join(args)} failed:\n{log[-3000:]}")
    return {"wall": time.perf_counter() - t0, "peak_rss": peak, "log": log}


def tiny_zoo(given: Path | None, tmp: Path) -> Path:
    """The zoo passed with --zoo, else a fresh one under `tmp`."""
    if given is not None:
        return given
    from layton.zoo import write_tiny_zoo

    write_tiny_zoo(tmp / "zoo")
    return tmp / "zoo"
