"""benchmarks/gpu.sh: every piece prints its figure (or why it was skipped), and the run exits 0.

The default suite runs `--smoke` (every piece on CPU at tiny sizes); `-m gpu` runs the real thing."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PIECES = ("flux", "ladd", "gpt", "vllm")


def run_script(*args: str, timeout: float) -> str:
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return proc.stdout


def outcomes(out: str) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {p: set() for p in PIECES}
    for kind, piece in re.findall(r"^(RESULT|SKIP|FAIL) (\w+):", out, re.M):
        seen[piece].add(kind)
    return seen


def test_smoke_prints_every_piece(tmp_path):
    out = run_script("--smoke", "--zoo", str(tmp_path), timeout=200)
    seen = outcomes(out)
    assert all(s and "FAIL" not in s for s in seen.values()), (seen, out[-4000:])
    for piece in ("flux", "ladd", "gpt"):  # the CPU pieces run; vLLM is skipped on CPU, saying why
        assert seen[piece] == {"RESULT"}, (piece, out[-4000:])
    assert re.search(r"^RESULT flux: eager, 64x64, 2 steps.* stage/diffusers [\d.]+x images/s", out, re.M)
    assert re.search(r"^RESULT flux: compiled \(", out, re.M)
    assert len(re.findall(r"^RESULT ladd: stage [12] .*median step [\d.]+ s", out, re.M)) == 2
    assert len(re.findall(r"^RESULT gpt: .*batch (1|16),.*KV cache [\d.]+ tokens/s vs recompute", out, re.M)) == 2
    assert re.search(r"^(SKIP vllm: skipped: (vLLM not installed \(pip install '\.\[gpu\]'\)|vLLM needs a CUDA GPU)"
                     r"|RESULT vllm: )", out, re.M)
    assert "Qwen2-VL-2B-size config" in out and "2.21B parameters" in out  # the 2B config, built on meta
    assert all(line.endswith("CUDA " + (torch.version.cuda or "none") + "]")
               for line in out.splitlines() if line.startswith("RESULT"))
    assert "summary: flux ok, ladd ok, gpt ok, vllm " in out


@pytest.mark.gpu
def test_gpu_run_prints_every_figure():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    out = run_script(timeout=600)
    seen = outcomes(out)
    for piece in ("flux", "ladd", "gpt"):
        assert seen[piece] == {"RESULT"}, (piece, out[-6000:])
    assert seen["vllm"] in ({"RESULT"}, {"SKIP"}), out[-6000:]
    assert len(re.findall(r"^RESULT flux: (eager|compiled)", out, re.M)) == 2
