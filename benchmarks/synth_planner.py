"""The synthesis driver's planner at scale: wall time and driver RSS at two input sizes.

Synthetic LAION-schema prompt files (several parquet files, about 1% repeated texts, some across
files) at each size; shards of 1000 prompts (2M prompts = 2000 shards). Each measurement runs in a
fresh subprocess, so its RSS is its own:

- (a) planning as `run_synth` does it on a fresh output: `make_plan` (the files' footers),
  `complete_shards` + `remove_incomplete` (one listing each) and the shards to do;
- (b) the dedup pre-pass `run_dedup` on a local Ray (`ray.init(num_cpus=2)`; start-up excluded
  from its time). Driver RSS is the driver's own: the map, reduce and write tasks run in Ray's
  worker processes (the process tree's peak, raylet and workers included, is shown besides);
- (c) a rerun of a complete run: every shard of the plan gets a valid tar, index and completion
  record (copies of one small shard written by `ShardWriter`; `complete_shards` checks that the
  tar has the recorded size) and the manifest `prepare_output` writes; then `run_synth(config)`
  must find nothing to do and return before Ray starts (goal: under 30 s at 2M prompts).

"base" is the measured process's RSS after its imports, just before the measured work; "peak" is
its RSS high-water mark during that work (Linux's VmHWM, reset when the work starts), so
peak − base is what the work added.

    .venv/bin/python benchmarks/synth_planner.py [--zoo DIR] [--sizes 500000,2000000]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import run_command, tiny_zoo  # noqa: E402

ADJ = "red green blue golden small large old new misty sunlit quiet busy".split()
NOUN = "cat dog house tree boat car bird flower bridge market mountain river".split()
PLACE = "beach street forest kitchen harbour garden desert station".split()
REPEAT_EVERY, REPEAT_BACK = 97, 50  # row i of a file (i % 97 == 0, i > 0) repeats its row i - 50


def write_inputs(folder: Path, n: int, file_rows: int, row_group: int | None) -> int:
    """`n` prompts in files of `file_rows` rows; returns how many rows repeat an earlier row's text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    first_text, dups = None, 0
    for k, start in enumerate(range(0, n, file_rows)):
        rows = min(file_rows, n - start)
        texts = [f"a {ADJ[p % 12]} {NOUN[(p // 12) % 12]} near a {PLACE[(p // 144) % 8]}, photo {p} "
                 f"by artist {p * 7919 % 100003}" for p in range(start, start + rows)]
        for i in range(REPEAT_EVERY, rows, REPEAT_EVERY):
            texts[i] = texts[i - REPEAT_BACK]
            dups += 1
        if k == 0:
            first_text = texts[1]
        else:
            texts[1] = first_text  # a repeat across files
            dups += 1
        urls = [f"https://example.com/{p}.jpg" for p in range(start, start + rows)]
        pq.write_table(pa.table({"TEXT": pa.array(texts, pa.string()), "URL": urls}), folder / f"part-{k:05d}.parquet",
                       row_group_size=row_group)
    return dups


def config(zoo: Path, inputs: Path, out: Path, shard_size: int):
    from stages.synth.config import SynthConfig
    from tests.conftest import synth_config_dict

    return SynthConfig.model_validate(synth_config_dict(zoo, str(inputs), out, output__shard_size=shard_size))


def fabricate_complete(cfg) -> int:
    """A complete output of `cfg`'s plan: the manifest, and per shard a tar, an index and a
    completion record (copies of shard 0, written by ShardWriter). Returns the number of shards."""
    import os
    import socket

    from layton.completion import fingerprint
    from pipelines.plan import make_plan
    from pipelines.shards import STATS_SUFFIX, ShardWriter, shard_name
    from pipelines.synth import prepare_output, sample_meta

    plan = make_plan(cfg.prompts, cfg.output.shard_size)
    root = prepare_output(cfg, plan, force=False)
    writer = ShardWriter(root, 0, 4, sample_meta(cfg), fingerprint(cfg))
    for i, (status, reason) in enumerate([("accepted", ""), ("accepted", ""), ("rejected", "mps_below_threshold"),
                                          ("rejected", "duplicate_prompt")]):
        sample = {"key": f"k{i}", "prompt": f"prompt {i}", "seed": i, "source": "part-00000.parquet", "row": i,
                  "status": status, "reason": reason, "imagereward": 0.5, "mps": 13.0, "recaption": f"caption {i}"}
        writer.add(sample, b"\xff\xd8tiny-jpeg\xff\xd9", "jpg")
    identity = {"node_id": "0" * 56, "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}
    stats = writer.close(processed_by={s: identity for s in ("generate", "score", "recaption")})
    out = Path(root.path)
    tar, index = (out / f"{shard_name(0)}.tar").read_bytes(), (out / f"{shard_name(0)}.parquet").read_bytes()
    for shard in range(1, plan.n_shards):
        name = shard_name(shard)
        (out / f"{name}.tar").write_bytes(tar)
        (out / f"{name}.parquet").write_bytes(index)
        (out / f"{name}{STATS_SUFFIX}").write_text(json.dumps({**stats, "shard": shard}, indent=1))
    return plan.n_shards


# --- the measured work, one kind per subprocess ------------------------------------------------

def start_peak() -> int:
    """This process's RSS now; its high-water mark restarts from here (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def child(kind: str, spec: dict) -> dict:
    import numpy as np

    from pipelines.plan import make_plan
    from pipelines.shards import complete_shards, remove_incomplete
    from pipelines.synth import run_synth  # the driver's imports, in every kind's baseline
    from layton.storage import Root

    cfg = config(Path(spec["zoo"]), Path(spec["inputs"]), Path(spec["out"]), spec["shard_size"])
    res: dict = {}
    if kind == "plan":
        base = start_peak()
        t0 = time.perf_counter()
        plan = make_plan(cfg.prompts, cfg.output.shard_size)
        root = Root(cfg.output.dir)
        done = complete_shards(root)
        remove_incomplete(root, set(done))
        todo = np.setdiff1d(np.arange(plan.n_shards, dtype=np.int64), np.fromiter(done, np.int64, len(done)))
        res.update(shards=plan.n_shards, rows=plan.n_rows, todo=len(todo))
    elif kind == "dedup":
        import ray

        from pipelines.dedup import run_dedup

        plan = make_plan(cfg.prompts, cfg.output.shard_size)
        root = Root(cfg.output.dir)
        root.mkdir()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        base = start_peak()
        t0 = time.perf_counter()
        res["found"] = run_dedup(plan, cfg.prompts, root)
    elif kind == "rerun":
        import ray

        base = start_peak()
        t0 = time.perf_counter()
        result = run_synth(cfg)
        res.update(skipped=result.shards_skipped, todo=result.shards_planned, ray_started=ray.is_initialized())
    else:
        raise ValueError(kind)
    res.update(seconds=time.perf_counter() - t0, base_rss=base, peak_rss=peak_rss())
    return res


def measure(kind: str, spec: dict, tmp: Path) -> dict:
    path = tmp / f"spec-{kind}.json"
    path.write_text(json.dumps(spec))
    run = run_command([sys.executable, str(Path(__file__).resolve()), "--child", kind, str(path)])
    line = next(line for line in reversed(run["lines"]) if line[1].startswith("RESULT "))[1]
    return {**json.loads(line[len("RESULT "):]), "process_wall": run["wall"], "tree_peak_rss": run["peak_rss"]}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(child(sys.argv[2], json.loads(Path(sys.argv[3]).read_text()))), flush=True)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="500000,2000000", help="prompt counts, comma-separated (ratios: last / first)")
    ap.add_argument("--file-rows", type=int, default=250_000, help="rows per input parquet file")
    ap.add_argument("--row-group", type=int, default=None, help="parquet row group size (default: pyarrow's)")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--zoo", type=Path, help="an existing tiny zoo (default: write one); the rerun checks its files")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        zoo = tiny_zoo(args.zoo, tmp)
        for n in sizes:
            inputs, out = tmp / f"in{n}", tmp / f"out{n}"
            t0 = time.perf_counter()
            dups = write_inputs(inputs, n, args.file_rows, args.row_group)
            files = len(list(inputs.glob("*.parquet")))
            print(f"{n} prompts: {files} file(s), {dups} repeated texts written in {time.perf_counter() - t0:.1f}s", flush=True)
            spec = {"zoo": str(zoo), "inputs": str(inputs), "out": str(out), "shard_size": args.shard_size}
            r = {"files": files, "dups": dups, "plan": measure("plan", spec, tmp)}
            print(f"  plan: {r['plan']['seconds']:.2f}s", flush=True)
            r["dedup"] = measure("dedup", spec, tmp)
            print(f"  dedup: {r['dedup']['seconds']:.1f}s, found {r['dedup']['found']}", flush=True)
            t0 = time.perf_counter()
            shutil.rmtree(out)  # the dedup pass's output goes with it: a complete run leaves its own
            shards = fabricate_complete(config(zoo, inputs, out, args.shard_size))
            print(f"  complete output of {shards} shards fabricated in {time.perf_counter() - t0:.1f}s", flush=True)
            r["rerun"] = measure("rerun", spec, tmp)
            print(f"  rerun: {r['rerun']['seconds']:.2f}s", flush=True)
            rows[n] = r
            shutil.rmtree(inputs)
            shutil.rmtree(out)

    gib = 2**30
    lo, hi = sizes[0], sizes[-1]
    print(f"\nsetup: shards of {args.shard_size} prompts, files of {args.file_rows} rows "
          f"(row groups: {args.row_group or 'pyarrow default'}), {psutil.cpu_count()} CPUs; "
          f"RSS in GiB unless marked: base = the measured process's RSS before the work, "
          f"peak = its high-water mark during the work")
    head = f"{'':48s}" + "".join(f"{n:>16,d}" for n in sizes) + f"{'ratio':>9s}"
    print(head)
    added = {kind: [(rows[n][kind]["peak_rss"] - rows[n][kind]["base_rss"]) / 2**20 for n in sizes]
             for kind in ("plan", "dedup", "rerun")}  # MiB the measured work added

    def line(label: str, values: list[float], fmt: str) -> None:
        ratio = values[-1] / values[0] if values[0] else float("nan")
        print(f"{label:48s}" + "".join(f"{v:>16{fmt}}" for v in values) + f"{ratio:>9.3f}")

    def text(label: str, cell) -> None:
        print(f"{label:48s}" + "".join(f"{cell(rows[n]):>16s}" for n in sizes))

    text("input files / shards", lambda r: f"{r['files']} / {r['plan']['shards']}")
    line("(a) plan: wall s", [rows[n]["plan"]["seconds"] for n in sizes], ".3f")
    line("(a) plan: driver peak RSS", [rows[n]["plan"]["peak_rss"] / gib for n in sizes], ".3f")
    line("(a) plan: driver peak - base, MiB", added["plan"], ".1f")
    line("(b) dedup: wall s (Ray start-up excluded)", [rows[n]["dedup"]["seconds"] for n in sizes], ".1f")
    line("(b) dedup: driver peak RSS", [rows[n]["dedup"]["peak_rss"] / gib for n in sizes], ".3f")
    line("(b) dedup: driver peak - base (after init), MiB", added["dedup"], ".1f")
    line("(b) dedup: process tree peak (Ray, workers)", [rows[n]["dedup"]["tree_peak_rss"] / gib for n in sizes], ".3f")
    text("(b) dedup: repeated texts written / found", lambda r: f"{r['dups']} / {r['dedup']['found'].get('text')}")
    line("(c) rerun of a complete run: run_synth s", [rows[n]["rerun"]["seconds"] for n in sizes], ".3f")
    line("(c) rerun: whole process wall s", [rows[n]["rerun"]["process_wall"] for n in sizes], ".3f")
    line("(c) rerun: driver peak RSS", [rows[n]["rerun"]["peak_rss"] / gib for n in sizes], ".3f")
    line("(c) rerun: driver peak - base, MiB", added["rerun"], ".1f")
    text("(c) rerun: shards kept / to do / Ray started",
         lambda r: f"{r['rerun']['skipped']} / {r['rerun']['todo']} / {'yes' if r['rerun']['ray_started'] else 'no'}")
    verdict = "under" if rows[hi]["rerun"]["seconds"] < 30 else "OVER"
    print(f"rerun at {hi:,d} prompts: {rows[hi]['rerun']['seconds']:.2f}s, {verdict} the 30 s goal; "
          f"ratios are {hi:,d} / {lo:,d}")


if __name__ == "__main__":
    main()
