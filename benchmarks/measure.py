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


def run_command(argv: list[str]) -> dict:
    """`argv` in a subprocess (cwd: the repository): wall time, the peak RSS of its whole process
    tree (driver, raylet, actors), sampled every 0.1 s, and its output, each line stamped with the
    seconds since the start at which it was read (`lines`: [(seconds, line)]); `started_at` is the
    start as epoch seconds."""
    started_at, t0 = time.time(), time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    peak, root = 0, psutil.Process(proc.pid)

    def sample():
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, tree_rss(root))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = [(time.perf_counter() - t0, line) for line in proc.stdout]
    proc.wait()
    wall = time.perf_counter() - t0
    sampler.join()
    log = "".join(line for _, line in lines)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{log[-3000:]}")
    return {"wall": wall, "peak_rss": peak, "log": log, "lines": lines, "started_at": started_at}


def run_layton(*args: str) -> dict:
    """`layton ARGS` in a subprocess, measured as `run_command` does."""
    return run_command([sys.executable, "-m", "app.cli", *args])


def tiny_zoo(given: Path | None, tmp: Path) -> Path:
    """The zoo passed with --zoo, else a fresh one under `tmp`."""
    if given is not None:
        return given
    from layton.zoo import write_tiny_zoo

    write_tiny_zoo(tmp / "zoo")
    return tmp / "zoo"


def steady_rate(results: dict[int, dict], n: int) -> float:
    """Items/s at steady state from runs over 1x and 4x `n` items: start-up (Ray, the actors' model
    loading) is paid once per run, so the 4x run minus the 1x run leaves 3n items."""
    return 3 * n / (results[4]["wall"] - results[1]["wall"])


def print_scaling(results: dict[int, dict], n: int, what: str) -> None:
    """End-to-end rates and the peak RSS of the 1x and 4x runs."""
    w1, w4 = results[1]["wall"], results[4]["wall"]
    print(f"Ray end to end incl. start-up: 1x {n / w1:.3f} {what}/s ({w1:.1f}s), 4x {4 * n / w4:.3f} {what}/s ({w4:.1f}s)")
    r1, r4 = results[1]["peak_rss"], results[4]["peak_rss"]
    print(f"peak RSS of the run's process tree: 1x {r1 / 2**30:.2f} GiB, 4x {r4 / 2**30:.2f} GiB, ratio 4x/1x {r4 / r1:.3f}")
