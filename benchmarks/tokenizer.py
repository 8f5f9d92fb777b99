"""Tokenizer figures, side by side in one run, on the tiny zoo (real architectures, tiny widths).

1. Decode time: token ids -> latents -> VAE pixels, with 1 and 2 consistency steps vs 25-step
   DDIM on the same LADD (the Hyper-SD LoRA fused into its UNet) and the same token ids, at --size
   (256) and --large-size (1024) px. The ratio DDIM-25 / consistency is the paper's point: one UNet
   pass instead of 25; the one VAE decode both pay caps it at (25 u + v) / (u + v) for a UNet step u
   and a VAE decode v (the "VAE decode" line shows v).
2. Training samples/s of the stage-1 step (make_batch + stage1_loss + backward + clip + Adam) on
   precomputed tokens + latents vs tokens and latents encoded on the fly from the shard's JPEG
   bytes. Same model, same batches, steps interleaved A B A B ... so a noisy machine slows both.
3. Ray Train (1 worker) vs the plain loop over the same step: `run_tokenizer_stage(config, 1)`
   with precomputed data cached in memory, its wall time (start-up included) and its steady-state
   samples/s, against the plain loop's precomputed samples/s measured right before and right after
   it (no Ray running then). Three rounds, plain Ray plain Ray plain Ray plain; the ratio printed is
   the median of the rounds' ratios, so that one slow spell of a shared machine does not decide it.

The photographs are scikit-image's sample images (real photos, JPEG-encoded into shards with
`write_image_shards`). Timings are printed, never asserted.

    .venv/bin/python benchmarks/tokenizer.py [--size 256] [--batch 2] [--train-steps 30] [--train-px 128] [--rounds 3]
    .venv/bin/python benchmarks/tokenizer.py --only decode [--large-size 1024]   # section 1 alone
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "camera")
LORA = "consistency/Hyper-SDXL-1step-lora.safetensors"
SEED = 0


class OtherLoad:
    """CPU used by processes outside this one's tree while a section runs: another job on a shared
    machine slows whatever runs then, so each figure says how busy the rest of the machine was."""

    def __init__(self, period: float = 1.0):
        self.period, self.cores = period, 0.0

    def _sample(self) -> None:
        me = os.getpid()
        for p in psutil.process_iter():
            try:
                t = sum(p.cpu_times()[:2])
                mine = p.pid == me or any(q.pid == me for q in p.parents())
            except psutil.Error:
                continue
            prev = self.seen.get(p.pid)
            self.seen[p.pid] = t
            if prev is not None and not mine:
                self.other += t - prev

    def _run(self) -> None:
        while not self.stop.wait(self.period):
            self._sample()

    def __enter__(self) -> OtherLoad:
        import threading

        self.seen, self.other, self.stop = {}, 0.0, threading.Event()
        self._sample()
        self.t0 = time.perf_counter()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._sample()
        self.cores = self.other / max(time.perf_counter() - self.t0, 1e-9)

    def __str__(self) -> str:
        return f"other processes kept {self.cores:.2f} of {psutil.cpu_count()} cores busy meanwhile"

    BUSY = 0.25  # cores: more than this, and torch's threads wait on each other's descheduled peers


def quiet() -> None:
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()


def photo(name: str) -> np.ndarray:
    from skimage import data

    a = getattr(data, name)()
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a[..., :3]


def jpeg(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def resolve_zoo(arg: Path | None, tmp: Path) -> Path:
    from layton.zoo import write_tiny_zoo, zoo_complete

    if arg is not None:
        return arg.resolve()
    demo = ROOT / "runs" / "demo" / "zoo"
    if zoo_complete(demo):
        return demo
    write_tiny_zoo(tmp / "zoo")
    return tmp / "zoo"


def n_params(m: torch.nn.Module) -> str:
    n = sum(p.numel() for p in m.parameters())
    return f"{n / 1e6:.2f}M"


def config_dict(zoo: Path, shards: Path, tmp: Path, args) -> dict:
    """workflows/tokenizer_demo.yaml, pointed at the zoo and the photo shards; one resolution."""
    stage = {
        "max_steps": args.train_steps,
        "batch_size": args.batch,
        "resolution_schedule": [[0, args.train_px]],
        "optim": {"name": "adam", "lr": 1.0e-4, "betas": [0.9, 0.99]},
        "checkpoint_every": args.train_steps,  # one checkpoint, at the end
        "log_every": args.log_every,
        "image_every": args.train_steps,
    }
    return {
        "model": {"vq": str(zoo / "llamagen_vq" / "vq_ds16_t2i.pt"), "sdxl": str(zoo / "sdxl"),
                  "encoder_sizes": [224, 256, 288], "inference_encoder_size": 256, "embedder_channels": [32]},
        "data": {"shards": [str(shards)], "precompute": True, "precompute_dir": str(tmp / "precompute"),
                 "cache_in_memory": True},
        "run": {"storage_path": str(tmp / "train"), "name": "bench", "num_workers": 1,
                "cpus_per_worker": args.threads},  # Ray gives the worker as many torch threads as CPUs
        "stage1": stage,
        "stage2": {**stage, "consistency": {"kind": "hypersd", "lora": str(zoo / LORA)},
                   "lpips": {"net": "alex", "backbone": str(zoo / "lpips" / "alexnet-owt-7be5be79.pth")}},
        "ray": {"num_cpus": args.threads + 2, "dashboard": False},
    }


# --- 1. decode ------------------------------------------------------------------------------------


def bench_decode(config, args, size: int, batch: int, repeats: int) -> tuple[dict, dict]:
    """Seconds per image of each mode at `size` px: latents (sampler) and total (+ VAE decode),
    each the median of `repeats` interleaved runs, under inference mode as `decode_tensor` runs."""
    from layton.tokenizer import LaytonTokenizer

    tok = LaytonTokenizer.build(config.model)
    tok.fuse_consistency(config.stage2.consistency)  # Hyper-SD: timesteps [999]; steps=2 -> [999, 499]
    tok.ladd.eval()
    sizes = {"VQ-16": n_params(tok.vq), "SDXL UNet": n_params(tok.ladd.unet),
             "ControlNet copy": n_params(tok.ladd.controlnet), "token embedder": n_params(tok.ladd.cond_embedder),
             "VAE": n_params(tok.vae)}
    images = [photo(PHOTOS[i % len(PHOTOS)]) for i in range(batch)]
    ids = tok.encode(images)  # 256 px -> 16x16 tokens
    modes = {"consistency 1 step": ("consistency", 1), "consistency 2 steps": ("consistency", 2),
             "DDIM 25 steps": ("ddim", 25)}

    def once(sampler, steps):
        with torch.inference_mode():
            t0 = time.perf_counter()
            z = tok.latents(tok.token_features(ids), size, steps=steps, sampler=sampler,
                            generator=torch.Generator("cpu").manual_seed(SEED))
            t1 = time.perf_counter()
            x = tok.vae_decode(z)
            t2 = time.perf_counter()
        assert x.shape == (batch, 3, size, size)
        return t1 - t0, t2 - t0

    for sampler, steps in modes.values():  # warm-up
        once(sampler, steps)
    times = {k: [] for k in modes}
    for _ in range(repeats):  # interleaved: a slow moment hits every mode
        for k, (sampler, steps) in modes.items():
            times[k].append(once(sampler, steps))
    out = {k: {"latents": statistics.median(t[0] for t in v) / batch,
               "total": statistics.median(t[1] for t in v) / batch} for k, v in times.items()}
    return out, sizes


def print_decode(decode: dict, size: int, batch: int, load: OtherLoad) -> None:
    print(f"\n== decode: {batch} photos -> 16x16 tokens -> {size}px, one LADD with the Hyper-SD LoRA fused ==")
    print(f"{'':22s} {'latents s/img':>14s} {'+VAE s/img':>12s} {'DDIM25/this, latents':>21s} {'with VAE':>9s}")
    ddim, ddim_lat = decode["DDIM 25 steps"]["total"], decode["DDIM 25 steps"]["latents"]
    for k, v in decode.items():
        print(f"{k:22s} {v['latents']:14.4f} {v['total']:12.4f} {ddim_lat / v['latents']:21.2f} {ddim / v['total']:9.2f}")
    c1 = decode["consistency 1 step"]
    print(f"VAE decode {c1['total'] - c1['latents']:.4f} s/img of the 1-step total; ({load})")


def decode_rows(decode: dict, size: int) -> list[tuple[str, str, str]]:
    ddim, ddim_lat = decode["DDIM 25 steps"]["total"], decode["DDIM 25 steps"]["latents"]
    c1, c2 = decode["consistency 1 step"]["total"], decode["consistency 2 steps"]["total"]
    return [
        (f"decode {size}px, consistency 1 step", f"{c1:.3f} s/img", f"DDIM25 / 1-step {ddim / c1:.2f}x"),
        (f"decode {size}px, consistency 2 steps", f"{c2:.3f} s/img", f"DDIM25 / 2-step {ddim / c2:.2f}x"),
        (f"decode {size}px, DDIM 25 steps", f"{ddim:.3f} s/img",
         f"latents only: DDIM25 / 1-step {ddim_lat / decode['consistency 1 step']['latents']:.2f}x, "
         f"/ 2-step {ddim_lat / decode['consistency 2 steps']['latents']:.2f}x"),
    ]


# --- 2. data: shards, the precompute pass, rows for both sources ----------------------------------


def prepare_data(config, shards: Path, args) -> tuple[list[dict], list[dict], dict, float]:
    import pyarrow.parquet as pq
    import ray

    from pipelines.shards import write_image_shards
    from pipelines.tokenizer_data import precompute, read_shard_images

    write_image_shards(shards, [(f"photo{i}", name, jpeg(photo(name)), "jpg") for i, name in enumerate(PHOTOS)],
                       shard_size=4)
    ray.init(num_cpus=args.threads + 2, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        t0 = time.perf_counter()
        marker = precompute(config)
        precompute_s = time.perf_counter() - t0
        fly = sorted(read_shard_images(config.data.shards).take_all(), key=lambda r: r["key"])
    finally:
        ray.shutdown()
    table = pq.read_table(config.precompute_path())
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    pre = [{name: cols[name][i] for name in cols} for i in range(table.num_rows)]
    pre.sort(key=lambda r: r["key"])
    assert [r["key"] for r in pre] == [r["key"] for r in fly], "precomputed and shard rows differ"
    return pre, fly, marker, precompute_s


def batches(rows: list[dict], batch: int, steps: int) -> list[dict]:
    """numpy batches like Ray Data's iter_batches gives, cycling over the rows."""
    out = []
    for s in range(steps):
        chunk = [rows[(s * batch + j) % len(rows)] for j in range(batch)]
        b = {}
        for name in chunk[0]:
            vals = [r[name] for r in chunk]
            if name.startswith("tokens_"):
                b[name] = np.stack([np.asarray(v, dtype=np.int16) for v in vals])
            else:
                arr = np.empty(len(vals), dtype=object)
                arr[:] = vals
                b[name] = arr
        out.append(b)
    return out


class PlainLoop:
    """The stage-1 step of workflows/train_tokenizer.train_loop, in this process, on one model."""

    def __init__(self, config, args):
        from diffusers import DDPMScheduler

        from layton.tokenizer import LaytonTokenizer

        self.config, self.args, self.st = config, args, config.stage1
        self.tok = LaytonTokenizer.build(config.model)
        self.tok.ladd.train()
        self.params = self.tok.ladd.trainable_parameters()
        self.opt = torch.optim.Adam(self.params, lr=self.st.optim.lr, betas=tuple(self.st.optim.betas))
        self.noise_scheduler = DDPMScheduler.from_config(self.tok.scheduler_config)

    def step(self, rows: dict, n: int) -> float:
        """make_batch + stage1_loss + backward + grad clip + Adam, as train_loop runs it; seconds."""
        from workflows.train_common import step_generator
        from workflows.train_tokenizer import make_batch, stage1_loss

        cfg = self.config
        t0 = time.perf_counter()
        enc_size = int(np.random.default_rng([cfg.run.seed, n]).choice(cfg.model.encoder_sizes))
        b = make_batch(rows, self.tok, self.args.train_px, enc_size, latents=True, pixels=False)
        gen = step_generator(cfg.run.seed, n, 0)
        loss = stage1_loss(self.tok.ladd, self.noise_scheduler, b, gen)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.st.optim.grad_clip)
        self.opt.step()
        loss.detach().item()
        assert b.features.shape[0] == self.args.batch and b.skipped == 0
        return time.perf_counter() - t0

    def interleaved(self, sources: dict[str, list[dict]]) -> dict[str, float]:
        """samples/s of each source over steps 1..N, the sources taking turns step by step."""
        for bs in sources.values():  # warm-up
            self.step(bs[0], 0)
        spent = dict.fromkeys(sources, 0.0)
        for n in range(1, self.args.train_steps + 1):
            for name, bs in sources.items():
                spent[name] += self.step(bs[n], n)
        return {name: self.args.train_steps * self.args.batch / s for name, s in spent.items()}


# --- 3. Ray Train ---------------------------------------------------------------------------------


def bench_ray_train(config, args) -> dict:
    import ray
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from workflows.train_tokenizer import run_tokenizer_stage

    assert not Path(config.stage_dir(1)).exists(), "a fresh storage dir: the run must not resume"
    # Started here rather than by run_tokenizer_stage (same settings as config.ray) only to keep the
    # workers' logs off this table; its start-up is timed and added to the wall time.
    t0 = time.perf_counter()
    ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    t1 = time.perf_counter()
    try:
        result = run_tokenizer_stage(config, 1)
    finally:
        ray.shutdown()
    t2 = time.perf_counter()
    assert not result.skipped and result.step == args.train_steps, result
    # Every logging window's samples/s, from the run's TensorBoard (result.metrics holds only the last).
    ea = EventAccumulator(str(Path(config.stage_dir(1)) / "tensorboard"))
    ea.Reload()
    windows = [(e.step, e.value) for e in ea.Scalars("stage1/samples_per_s")]
    return {"ray_init": t1 - t0, "call": result.seconds, "wall": t2 - t0, "final": result.metrics.get("samples_per_s"),
            "final_step": result.metrics.get("step"), "windows": windows, "metric_keys": sorted(result.metrics)}


def ray_rounds(config, args, plain: PlainLoop, rows: list[dict]) -> list[dict]:
    """`args.rounds` Ray Train runs (each a fresh run name), the plain loop before, between and after
    them: each round's ratio is its steady state over the mean of the plain loop on either side."""
    def plain_once() -> tuple[float, OtherLoad]:
        with OtherLoad() as load:
            ips = plain.interleaved({"precomputed": rows})["precomputed"]
        return ips, load

    plains, out = [plain_once()], []
    for r in range(args.rounds):
        cfg = config.model_copy(update={"run": config.run.model_copy(update={"name": f"bench{r}"})})
        with OtherLoad() as load:
            res = bench_ray_train(cfg, args)
        plains.append(plain_once())
        ips, span = steady(res["windows"], args.log_every, args.batch)
        (before, load_before), (after, load_after) = plains[-2], plains[-1]
        out.append({**res, "steady": ips, "span": span, "plain_before": before, "plain_after": after,
                    "plain": (before + after) / 2, "ratio": ips / ((before + after) / 2) if ips else None,
                    "load": load, "load_plain": max(load_before.cores, load_after.cores)})
    return out


def steady(windows: list[tuple[int, float]], log_every: int, batch: int) -> tuple[float | None, str]:
    """samples/s over the windows between the first (Ray Data's first epoch, the first step) and the
    last (which also pays for the final reconstruction grid): total samples / total time."""
    mid = windows[1:-1]
    if not mid:
        return None, "n/a (needs train-steps >= 3 x log-every)"
    n = log_every * batch
    return len(mid) * n / sum(n / v for _, v in mid), f"steps {mid[0][0] - log_every + 1}-{mid[-1][0]}"


# --- main -----------------------------------------------------------------------------------------


def print_summary(rows: list[tuple[str, str, str]], loads: dict, seconds: float) -> None:
    print("\n== summary ==")
    busy = [name for name, l in loads.items() if l.cores > OtherLoad.BUSY]
    if busy:
        print(f"WARNING: other processes used over {OtherLoad.BUSY} cores during: {', '.join(busy)}; "
              "those figures are not comparable with a quiet run (rerun when the machine is idle)")
    for a, b, c in rows:
        print(f"{a:32s} {b:>18s}   {c}")
    print(f"benchmark run time {seconds:.0f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", type=Path, help="a tiny zoo (default: runs/demo/zoo if complete, else write one)")
    ap.add_argument("--size", type=int, default=256, help="decode px")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="decode timings per mode (the median is shown)")
    ap.add_argument("--large-size", type=int, default=1024, help="a second decode px (0: none)")
    ap.add_argument("--large-batch", type=int, default=1, help="images per decode at --large-size")
    ap.add_argument("--large-repeats", type=int, default=1, help="decode timings per mode at --large-size")
    ap.add_argument("--only", choices=("all", "decode"), default="all", help="'decode': only section 1")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--train-px", type=int, default=128)
    ap.add_argument("--log-every", type=int, default=5, help="the Ray Train run's logging window (steps)")
    ap.add_argument("--rounds", type=int, default=3, help="Ray Train runs, each between two plain-loop runs (the median ratio is shown)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the Ray Train worker gets as many CPUs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quiet()
    from stages.tokenizer.config import TokenizerTrainConfig

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="layton-bench-") as tmp:
        tmp = Path(tmp)
        zoo = resolve_zoo(args.zoo, tmp)
        shards = tmp / "shards"
        config = TokenizerTrainConfig.model_validate(config_dict(zoo, shards, tmp, args))

        with OtherLoad() as load_decode:
            decode, sizes = bench_decode(config, args, args.size, args.batch, args.repeats)
        large, load_large = None, OtherLoad()
        if args.large_size:
            with load_large:
                large, _ = bench_decode(config, args, args.large_size, args.large_batch, args.large_repeats)
        print(f"tiny zoo {zoo}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + " params (real architectures)")
        print(f"torch threads {args.threads}, {psutil.cpu_count()} CPUs; decode {args.size}px, batch {args.batch}, "
              f"median of {args.repeats}"
              + (f" and {args.large_size}px, batch {args.large_batch}, median of {args.large_repeats}" if large else "")
              + f"; training {args.train_px}px, batch {args.batch}, {args.train_steps} steps, "
              f"encoder sizes {config.model.encoder_sizes}")

        print_decode(decode, args.size, args.batch, load_decode)
        decode_loads = {"decode": load_decode}
        decode_summary = decode_rows(decode, args.size)
        if large:
            print_decode(large, args.large_size, args.large_batch, load_large)
            decode_loads[f"decode {args.large_size}px"] = load_large
            decode_summary += decode_rows(large, args.large_size)
        if args.only == "decode":
            print_summary(decode_summary, decode_loads, time.perf_counter() - t_start)
            return

        pre, fly, marker, precompute_s = prepare_data(config, shards, args)
        print(f"\n== stage-1 step, precomputed vs on the fly: {len(pre)} photos in JPEG shards, steps A B A B ... ==")
        print(f"precompute pass (Ray Data, actor start-up included, run once): {precompute_s:.1f}s for "
              f"{marker['usable']} images (tokens at {config.model.encoder_sizes} px, latents at {config.resolutions()} px)")
        plain = PlainLoop(config, args)
        n = args.train_steps + 1
        sources = {"precomputed": batches(pre, args.batch, n), "on the fly": batches(fly, args.batch, n)}
        with OtherLoad() as load_train:
            train = plain.interleaved(sources)
        for k, v in train.items():
            print(f"{k:22s} {v:8.2f} samples/s")
        print(f"{'ratio pre / fly':22s} {train['precomputed'] / train['on the fly']:8.2f}")
        print(f"({load_train})")

        print(f"\n== Ray Train, 1 worker with {args.threads} CPUs, vs the plain loop; precomputed, cached in memory ==")
        rounds = ray_rounds(config, args, plain, sources["precomputed"])
        ray_res, plain_ips = rounds[0], rounds[0]["plain"]  # the first round's run, in detail
        print(f"round 1: wall {ray_res['wall']:.1f}s = ray.init {ray_res['ray_init']:.1f}s + run_tokenizer_stage "
              f"{ray_res['call']:.1f}s (precompute check, worker start, model build, {args.train_steps} steps, "
              f"checkpoint, export); the steps alone at the plain loop's rate: {args.train_steps * args.batch / plain_ips:.1f}s")
        in_windows = sum(args.log_every * args.batch / v for _, v in ray_res["windows"])
        print("  samples/s per logging window (the run's TensorBoard): "
              + ", ".join(f"step {s}: {v:.2f}" for s, v in ray_res["windows"]))
        print(f"  the windows span {in_windows:.1f}s (the first holds Ray Data's first epoch); the other "
              f"{ray_res['call'] - in_windows:.1f}s of the call are start-up (worker, model build) and the end "
              "(checkpoint, export, shutdown)")
        print(f"  StageResult.metrics: {', '.join(ray_res['metric_keys'])}")
        print(f"  final metrics samples_per_s (steps {ray_res['final_step'] - args.log_every + 1}-{ray_res['final_step']}, "
              f"includes the final reconstruction grid): {ray_res['final']:.2f}")
        for i, r in enumerate(rounds, 1):
            print(f"round {i}: Ray steady ({r['span']}) " + (f"{r['steady']:.2f}" if r["steady"] else "n/a")
                  + f" samples/s; plain {r['plain_before']:.2f} before, {r['plain_after']:.2f} after"
                  + (f"; ratio {r['ratio']:.2f}" if r["ratio"] else "")
                  + f" (other load: {r['load'].cores:.2f} cores in the Ray run, up to {r['load_plain']:.2f} in the plain loop)")
        ratios = [r["ratio"] for r in rounds if r["ratio"]]
        ratio = statistics.median(ratios) if ratios else None
        steady_ips = statistics.median(r["steady"] for r in rounds if r["steady"]) if ratios else None
        final_ratio = statistics.median(r["final"] / r["plain"] for r in rounds)
        if ratio:
            print(f"ratio Ray steady / plain, median of {len(ratios)}: {ratio:.2f} "
                  f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
        loads = {**decode_loads, "precomputed vs on the fly": load_train,
                 **{f"Ray Train round {i}": r["load"] for i, r in enumerate(rounds, 1)}}

    total = time.perf_counter() - t_start
    rows = [
        *decode_summary,
        ("precompute pass (Ray Data, once)", f"{precompute_s:.1f} s", f"{marker['usable']} images"),
        ("train, precomputed (plain)", f"{train['precomputed']:.2f} samples/s",
         f"pre / fly {train['precomputed'] / train['on the fly']:.2f}x"),
        ("train, on the fly (plain)", f"{train['on the fly']:.2f} samples/s", ""),
        ("train, Ray Train steady state", f"{steady_ips:.2f} samples/s" if steady_ips else "n/a",
         f"Ray / plain {ratio:.2f}x (median of {len(ratios)} rounds)" if ratio else ""),
        ("train, Ray Train final metric", f"{ray_res['final']:.2f} samples/s",
         f"Ray / plain {final_ratio:.2f}x (median of {len(rounds)})"),
        ("train, Ray Train whole run", f"{ray_res['wall']:.1f} s",
         f"{args.train_steps * args.batch / ray_res['wall']:.2f} samples/s end to end"),
    ]
    print_summary(rows, loads, total)


if __name__ == "__main__":
    main()
