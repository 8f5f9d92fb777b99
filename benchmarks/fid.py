"""Fréchet distance at rFID size: pytorch-fid's `calculate_frechet_distance` vs `layton.fid.frechet_distance`.

Both get the same statistics: the mean and covariance (`FeatureStats.mean_cov`, as the rFID job
computes them) of two seeded sets of `--samples` feature vectors of `--dim` values shaped like
Inception pool3 features (non-negative, mean ~0.3, correlated through a decaying low-rank mixing plus
noise; the second set shifted a little, FID ~ 100). pytorch-fid takes `scipy.linalg.sqrtm` of Σ1Σ2;
ours takes a pivoted Cholesky of Σ1 and the eigenvalues of the symmetric LᵀΣ2L. The two are timed in
turn, repeat after repeat (A B A B ...), so that a slow spell of the machine hits both; printed: each
one's times, the ratio of the medians and |Δ| of the two values. `--samples` below `--dim` gives
singular covariances, where pytorch-fid's value carries its sqrtm's rounding noise (~1e-5..1e-4).

On a shared machine, BLAS threads slow down badly when another process takes a core, so the output
says how many cores other processes kept busy meanwhile. Timings are printed, never asserted.

    .venv/bin/python benchmarks/fid.py [--dim 2048] [--samples 10000] [--repeats 3]
    .venv/bin/python benchmarks/fid.py --smoke                    # small sizes, seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.tokenizer import OtherLoad  # noqa: E402
from layton.fid import FeatureStats, frechet_distance  # noqa: E402


def inception_like(rng: np.random.Generator, n: int, d: int, shift: float = 0.0, batch: int = 2000) -> FeatureStats:
    """FeatureStats of n seeded Inception-like feature vectors, added batch by batch as the rFID job does."""
    k = min(256, d)
    mix = rng.standard_normal((k, d)) / np.sqrt(k)
    scale = np.linspace(1, 0.05, k)
    stats = FeatureStats.empty(d)
    for start in range(0, n, batch):
        b = min(batch, n - start)
        stats.update(np.maximum((rng.standard_normal((b, k)) * scale) @ mix * 0.5 + 0.2 + shift
                                + 0.1 * rng.standard_normal((b, d)), 0))
    return stats


def pytorch_fid(mu1, sigma1, mu2, sigma2) -> float:
    from pytorch_fid.fid_score import calculate_frechet_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm's `disp` deprecation; LinAlgWarning on singular products
        return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=2048, help="feature dimension (Inception pool3: 2048)")
    ap.add_argument("--samples", type=int, default=10000, help="feature vectors per set")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each function")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="small sizes (dim 256, 600 samples, 2 repeats)")
    args = ap.parse_args()
    if args.smoke:
        args.dim, args.samples, args.repeats = 256, 600, 2
    if args.samples < 2 or args.repeats < 1:
        ap.error("--samples must be at least 2 and --repeats at least 1")

    rng = np.random.default_rng(args.seed)
    a, b = inception_like(rng, args.samples, args.dim), inception_like(rng, args.samples, args.dim, shift=0.02)
    stats = (*a.mean_cov(), *b.mean_cov())
    funcs = {"pytorch-fid (scipy sqrtm)": pytorch_fid, "layton (pivoted Cholesky + eigvalsh)": frechet_distance}
    times: dict[str, list[float]] = {name: [] for name in funcs}
    values: dict[str, float] = {}
    with OtherLoad() as load:
        for _ in range(args.repeats):
            for name, f in funcs.items():
                t0 = time.perf_counter()
                values[name] = f(*stats)
                times[name].append(time.perf_counter() - t0)

    rank = "full rank" if args.samples > args.dim else f"singular covariances (rank ≤ {args.samples - 1})"
    print(f"Fréchet distance, d = {args.dim}, {args.samples} samples per set ({rank}), {args.repeats} repeats")
    med = {}
    for name, ts in times.items():
        med[name] = statistics.median(ts)
        print(f"  {name:38s} median {med[name]:8.3f} s  (runs: {', '.join(f'{t:.3f}' for t in ts)})  "
              f"FID {values[name]:.9f}")
    theirs, ours = funcs
    print(f"  ratio pytorch-fid / layton (medians): {med[theirs] / med[ours]:.1f}x   "
          f"|Δ| = {abs(values[theirs] - values[ours]):.2e}")
    print(f"  {load}")
    if load.cores > OtherLoad.BUSY:
        print(f"WARNING: other processes used over {OtherLoad.BUSY} cores meanwhile; the times are inflated")


if __name__ == "__main__":
    main()
