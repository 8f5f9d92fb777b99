"""Synthesis throughput: the Ray Data pipeline vs a plain single-process loop, and 1 vs 2 generation actors.

Every run uses the same tiny-zoo models (real architectures) on the same kind of prompts; the image
size and step count are raised so that generation, not Ray's start-up or bookkeeping, dominates.
Every sample is scored and recaptioned (the thresholds accept everything), as in the real run.

- (a) a plain loop in this process (`make_plan`, then per shard `read_shards` → the stages'
  `process(row)` → `write_shard`: the same work without Ray; dedup is not run, the prompts are
  unique) vs `layton synth` with one generation actor;
- (b) `layton synth` with 1 and with 2 generation actors of 1 CPU each (one score and one
  recaption actor of 1 CPU each in both; Ray's logical CPUs = the actors' + 1 task slot):
  steady rate 2-actor / 1-actor, time to the first durable shard, the bytes the driver receives
  per image, and the peak RSS of the whole process tree (driver, raylet, actors) at 1x and 4x the
  prompts (the run streams: it must stay flat).

Ray's start-up and model loading are paid once per run, so a pipeline's rate is taken as
(4x − 1x prompts) / (4x − 1x wall time).

    .venv/bin/python benchmarks/synth_throughput.py [--zoo DIR] [--prompts 48] [--size 256] [--steps 48]
"""

from __future__ import annotations

import argparse
import json
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


def config(zoo: Path, prompts: Path, out: Path, args, gen_actors: int) -> dict:
    return synth_config_dict(
        zoo, prompts, out,
        generation__height=args.size, generation__width=args.size,
        generation__num_inference_steps=args.steps, generation__batch_size=args.batch,
        scoring__imagereward_threshold=-1e9, scoring__mps_threshold=-1e9,  # score and recaption everything
        output__shard_size=args.shard_size,
        # Ray gives an actor as many torch threads as CPUs it reserves: 1 per generation actor.
        generation__resources={"num_actors": gen_actors, "num_cpus": 1},
        ray__num_cpus=gen_actors + 3,  # + the score and recaption actors + a task slot (check_resources)
    )


def plain_loop(cfg_dict: dict, threads: list[int]) -> dict[int, tuple[int, float]]:
    """The same work as plain objects in this process, shard after shard, one stage after another:
    reading the shard's rows, generation, scoring, recaptioning, writing the shard. Model loading and
    one warm-up shard are excluded. Returns {torch threads: (images, seconds)}."""
    import numpy as np
    import torch

    from stages.synth.config import SynthConfig
    from layton.storage import Root
    from layton.completion import fingerprint
    from pipelines.plan import make_plan
    from pipelines.shard_rows import ACCEPTED, unpack
    from pipelines.shards import write_shard
    from pipelines.stages import GenerateStage, RecaptionStage, ScoreStage
    from pipelines.synth import read_shards, sample_meta

    cfg = SynthConfig.model_validate(cfg_dict)
    g, out = cfg.generation, cfg.output
    gen = GenerateStage(g.model_dump(), image_format=out.image_format, jpeg_quality=out.jpeg_quality)
    stages = [gen, ScoreStage(cfg.scoring.model_dump(), batch_size=g.batch_size),
              RecaptionStage(cfg.recaption.model_dump(), statuses=(ACCEPTED,), batch_size=g.batch_size)]
    plan = make_plan(cfg.prompts, out.shard_size)
    root = Root(out.dir)
    root.mkdir()  # no dedup pre-pass ran: read_shards finds no verdicts (the prompts are unique)
    meta = sample_meta(cfg)

    def read(shard: int) -> dict:
        return unpack(read_shards({"data": np.array([shard])}, plan, cfg, root))[0]

    results = {}
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        row = read(0)
        for stage in stages:  # warm-up: first calls allocate and pick kernels
            row = stage.process(row)
        t0, n = time.perf_counter(), 0
        for shard in range(plan.n_shards):
            row = read(shard)
            for stage in stages:
                row = stage.process(row)
            n += write_shard(root, row, meta, out.image_format, fingerprint(cfg))["total"]
        results[n_threads] = (n, time.perf_counter() - t0)
    return results


def first_shard(run: dict, out: Path) -> dict:
    """Seconds to the first durable shard: its `_stats.json`'s `writer.finished_at` from the process
    start, and the CLI's first "shard " line from its "synth: plan" line."""
    finished = min(json.loads(p.read_text())["writer"]["finished_at"] for p in out.glob("*_stats.json"))
    stamp = {}
    for t, line in run["lines"]:
        for key, prefix in (("plan", "synth: plan"), ("shard", "shard ")):
            if line.startswith(prefix):
                stamp.setdefault(key, t)
    return {"from_start": finished - run["started_at"], "plan_to_line": stamp["shard"] - stamp["plan"]}


def driver_bytes(out: Path) -> dict:
    """What the driver receives: one stats row per shard from `iter_rows`. `json` counts the JSON
    text of those rows (`write_shards`' `json.dumps(stats)`, which the stored `_stats.json`
    reproduces); `arrow` the Arrow IPC stream of a one-row table of that text, the form of the
    block the driver fetches (Ray's own framing and control messages are not counted). `tar` is
    the shard bytes per image that stay in the cluster, for scale."""
    import pyarrow as pa

    json_b = arrow_b = tar_b = images = 0
    for p in out.glob("*_stats.json"):
        stats = json.loads(p.read_text())
        text = json.dumps(stats)
        json_b += len(text.encode())
        sink = pa.BufferOutputStream()
        table = pa.table({"stats": pa.array([text], pa.string())})
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        arrow_b += sink.getvalue().size
        tar_b += stats["tar_bytes"]
        images += stats["total"]
    return {"json": json_b / images, "arrow": arrow_b / images, "tar": tar_b / images, "images": images}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=48, help="prompts of the 1x run (the 4x run has 4 times as many)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--plain-threads", default="1,2", help="torch threads of the plain loop, comma-separated")
    ap.add_argument("--zoo", type=Path, help="an existing tiny zoo (default: write one)")
    args = ap.parse_args()
    threads = [int(t) for t in args.plain_threads.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        zoo = tiny_zoo(args.zoo, tmp)
        runs: dict[int, dict[int, dict]] = {}
        firsts: dict[int, dict[int, dict]] = {}
        sent: dict[int, dict[int, dict]] = {}
        for actors in (1, 2):
            for mult in (1, 4):
                prompts = make_prompts(tmp / f"p{mult}.parquet", args.prompts * mult)
                out = tmp / f"ray{actors}x{mult}"
                cfg_path = tmp / f"ray{actors}x{mult}.yaml"
                cfg_path.write_text(yaml.safe_dump(config(zoo, prompts, out, args, actors)))
                run = runs.setdefault(actors, {})[mult] = run_layton("synth", str(cfg_path))
                firsts.setdefault(actors, {})[mult] = first_shard(run, out)
                sent.setdefault(actors, {})[mult] = driver_bytes(out)
                print(f"ran {actors} generation actor(s), {args.prompts * mult} prompts: {run['wall']:.1f}s", flush=True)
        plain = plain_loop(config(zoo, make_prompts(tmp / "plain.parquet", args.prompts), tmp / "plain", args, 1), threads)

    rate = {actors: steady_rate(runs[actors], args.prompts) for actors in (1, 2)}
    print(f"\nsetup: {args.prompts}/{4 * args.prompts} prompts (1x/4x), {args.size}x{args.size}, {args.steps} steps, "
          f"batch {args.batch}, shards of {args.shard_size}, {psutil.cpu_count()} CPUs; tiny zoo models "
          f"(real architectures), every sample scored and recaptioned; stage actors 1 CPU (= 1 torch thread) each")
    print("\n(a) plain loop vs Ray Data with one generation actor")
    for n_threads, (n, secs) in plain.items():
        print(f"plain loop, 1 process, {n_threads} torch thread(s), model load excluded: {n / secs:7.3f} images/s "
              f"({n} in {secs:.1f}s); ratio Ray 1 actor / this {rate[1] / (n / secs):.3f}")
    print(f"Ray Data, 1 generation actor, (4x - 1x) prompts / time      : {rate[1]:7.3f} images/s")
    print("\n(b) 1 vs 2 generation actors (1 CPU each)")
    print(f"{'':34s}{'1 actor':>12s}{'2 actors':>12s}{'ratio 2/1':>11s}")

    def line(label: str, a: float, b: float, fmt: str) -> None:
        print(f"{label:34s}{a:>12{fmt}}{b:>12{fmt}}{b / a:>11.3f}")

    line("steady images/s", rate[1], rate[2], ".3f")
    for mult in (1, 4):
        line(f"end to end images/s, {mult}x", args.prompts * mult / runs[1][mult]["wall"],
             args.prompts * mult / runs[2][mult]["wall"], ".3f")
    for mult in (1, 4):
        line(f"first durable shard s, {mult}x", firsts[1][mult]["from_start"], firsts[2][mult]["from_start"], ".1f")
    for mult in (1, 4):
        line(f"  plan line -> 1st shard line, {mult}x", firsts[1][mult]["plan_to_line"], firsts[2][mult]["plan_to_line"], ".1f")
    for mult in (1, 4):
        line(f"driver bytes/image (JSON), {mult}x", sent[1][mult]["json"], sent[2][mult]["json"], ".0f")
    for mult in (1, 4):
        line(f"driver bytes/image (Arrow), {mult}x", sent[1][mult]["arrow"], sent[2][mult]["arrow"], ".0f")
    for mult in (1, 4):
        line(f"peak RSS GiB, {mult}x", runs[1][mult]["peak_rss"] / 2**30, runs[2][mult]["peak_rss"] / 2**30, ".2f")
    print(f"(first durable shard: the earliest _stats.json writer.finished_at minus the process start; the plan line is "
          f"printed before Ray starts. Driver bytes: the stats rows iter_rows returns, one per shard of "
          f"{args.shard_size} images, as JSON text and as the Arrow IPC of a one-row block; Ray's framing not "
          f"counted. For scale, the shard tar bytes/image that stay in the cluster: {sent[1][4]['tar']:.0f}.)")
    for actors in (1, 2):
        print(f"\n{actors} generation actor(s):")
        print_scaling(runs[actors], args.prompts, "images")


if __name__ == "__main__":
    main()
