"""Synthesis throughput: the Ray Data pipeline vs a plain single-process loop, side by side.

Both run the same tiny-zoo models (real architectures) on the same prompts and chunks; the image
size and step count are raised so that model compute, not Ray's start-up or bookkeeping,
dominates. Also reports the peak RSS of the whole process tree (driver, raylet, stage actors) for
a run over 1x and 4x the prompts: the pipeline streams, so memory must not grow with the input.

    .venv/bin/python benchmarks/synth_throughput.py [--prompts 32] [--size 256] [--steps 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import print_scaling, run_layton, steady_rate, tiny_zoo  # noqa: E402
from tests.conftest import synth_config_dict, write_prompts  # noqa: E402

WORDS = "red green blue golden small large old new cat dog house tree boat car bird flower".split()


def make_prompts(path: Path, n: int) -> Path:
    texts = [f"a photo of a {WORDS[i % 8]} {WORDS[8 + (i // 8) % 8]} number {i}" for i in range(n)]
    return write_prompts(path, texts)


def config(zoo: Path, prompts: Path, out: Path, args) -> dict:
    return synth_config_dict(
        zoo, prompts, out,
        generation__height=args.size, generation__width=args.size,
        generation__num_inference_steps=args.steps, generation__batch_size=args.batch,
        scoring__imagereward_threshold=-1e9, scoring__mps_threshold=-1e9,  # recaption everything
        output__shard_size=4 * args.batch,
        # Ray gives an actor as many torch threads as CPUs it reserves: the generation actor, the
        # bottleneck, gets both cores as the plain loop's torch does.
        generation__resources__num_cpus=args.gen_cpus,
        ray__num_cpus=int(args.gen_cpus) + 3,  # the two other stage actors and a task slot
    )


def plain_loop(cfg_dict: dict) -> tuple[int, float]:
    """The same stages as plain objects in this process, chunk by chunk, one after another."""
    from layton.config import SynthConfig
    from pipelines.chunks import pack
    from pipelines.plan import write_plan
    from pipelines.prompts import read_prompts
    from pipelines.stages import GenerateStage, RecaptionStage, ScoreStage, encode_chunks

    import pyarrow.parquet as pq

    cfg = SynthConfig.model_validate(cfg_dict)
    gen = GenerateStage(cfg.generation.model_dump())
    score = ScoreStage(cfg.scoring.model_dump())
    caption = RecaptionStage(cfg.recaption.model_dump())
    plan_path = Path(cfg.output.dir) / "plan.parquet"
    write_plan(read_prompts(cfg.prompts), set(), set(), cfg.output.shard_size, cfg.generation.batch_size, plan_path)
    chunks = pq.read_table(plan_path).to_pylist()
    t0 = time.perf_counter()
    n = 0
    for chunk in chunks:
        chunk = caption.process(score.process(gen.process(chunk)))
        encode_chunks(pack([chunk]), cfg.output.image_format, cfg.output.jpeg_quality)
        n += len(chunk["ids"])
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--gen-cpus", type=float, default=2.0, help="CPUs (= torch threads) of the generation actor")
    ap.add_argument("--zoo", type=Path, help="an existing tiny zoo (default: write one)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        zoo = tiny_zoo(args.zoo, tmp)
        results = {}
        for mult in (1, 4):
            prompts = make_prompts(tmp / f"p{mult}.parquet", args.prompts * mult)
            cfg_path = tmp / f"ray{mult}.yaml"
            cfg_path.write_text(yaml.safe_dump(config(zoo, prompts, tmp / f"ray{mult}", args)))
            results[mult] = run_layton("synth", str(cfg_path))
        n, plain_s = plain_loop(config(zoo, make_prompts(tmp / "plain.parquet", args.prompts), tmp / "plain", args))

    ray_ips = steady_rate(results, args.prompts)
    plain_ips = n / plain_s
    print(f"setup: {args.prompts} prompts, {args.size}x{args.size}, {args.steps} steps, batch {args.batch}, "
          f"generation actor {args.gen_cpus:g} CPUs, "
          f"{psutil.cpu_count()} CPUs; tiny zoo models (real architectures), every sample scored and recaptioned")
    print(f"plain loop, 1 process, model load excluded : {plain_ips:7.3f} images/s")
    print(f"Ray Data pipeline, (4x - 1x) prompts / time: {ray_ips:7.3f} images/s")
    print(f"ratio Ray / plain                          : {ray_ips / plain_ips:7.3f}")
    print_scaling(results, args.prompts, "images")


if __name__ == "__main__":
    main()
