#!/usr/bin/env bash
# One-GPU figures at the real models' sizes (FLUX.1-dev generation, LADD training step, LaytonGen GPT-XL
# sampling, Qwen2-VL-2B vLLM recaption), side by side in one run; see benchmarks/gpu.py.
#   bash benchmarks/gpu.sh            # one CUDA GPU, <= 8 minutes
#   bash benchmarks/gpu.sh --smoke    # every piece on CPU at tiny sizes
# PYTHON picks the interpreter (default: the repository's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
exec "$PYTHON" benchmarks/gpu.py "$@"
