"""`layton shards stats DIR`: a summary of the complete shards of an output directory."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from layton.storage import Root
from pipelines.shards import complete_shards, read_index

PERCENTILES = (5, 25, 50, 75, 95)


def shard_summary(out_dir: str | Path) -> dict:
    """`out_dir`: a local path or a URI."""
    root = Root(out_dir)
    if not root.exists():
        raise FileNotFoundError(f"{out_dir}: no such output directory")
    shards = complete_shards(root)
    index = read_index(root, shards).to_pydict()
    status = Counter(index["status"])
    reasons = Counter(r for reason in index["reason"] if reason for r in reason.split(";"))
    total = len(index["key"])
    manifest = json.loads(root.read("manifest.json") or b"{}")
    summary = {
        "dir": str(out_dir),
        "shards": len(shards),
        "total": total,
        "accepted": status["accepted"],
        "rejected": status["rejected"],
        "failed": status["failed"],
        "accept_rate": status["accepted"] / total if total else 0.0,
        "reasons": {r: {"count": n, "rate": n / total} for r, n in sorted(reasons.items())},
        "thresholds": manifest.get("thresholds", {}),
        "tar_bytes": sum(s["tar_bytes"] for s in shards.values()),
    }
    for name in ("imagereward", "mps"):
        values = np.array([v for v in index[name] if v is not None], dtype=np.float64)
        summary[name] = (
            {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES} | {"mean": float(values.mean()), "n": int(values.size)}
            if values.size
            else None
        )
    summary["_scores"] = {name: [v for v in index[name] if v is not None] for name in ("imagereward", "mps")}
    return summary


def format_summary(s: dict) -> str:
    lines = [
        f"{s['dir']}: {s['shards']} complete shard(s), {s['total']} prompts handled, {s['tar_bytes'] / 1e6:.2f} MB of tars",
        f"  accepted {s['accepted']} ({100 * s['accept_rate']:.1f}%), rejected {s['rejected']}, failed {s['failed']}",
    ]
    for reason, v in s["reasons"].items():
        lines.append(f"  {reason:32s} {v['count']:7d}  ({100 * v['rate']:.1f}%)")
    for name in ("imagereward", "mps"):
        p = s[name]
        if p:
            pct = "  ".join(f"p{q}={p[f'p{q}']:.3f}" for q in PERCENTILES)
            lines.append(f"  {name:12s} n={p['n']}  mean={p['mean']:.3f}  {pct}  threshold={s['thresholds'].get(name)}")
    return "\n".join(lines)


def plot_histograms(s: dict, path: str | Path) -> Path:
    """ImageReward and MPS histograms with the thresholds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name, label in zip(axes, ("imagereward", "mps"), ("ImageReward", "MPS")):
        values = s["_scores"][name]
        if values:
            ax.hist(values, bins=30, color="#4c72b0")
        threshold = s["thresholds"].get(name)
        if threshold is not None:
            ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold}")
            ax.legend()
        ax.set_title(f"{label} (n={len(values)})")
        ax.set_xlabel("score")
        ax.set_ylabel("samples")
    fig.suptitle(f"{s['dir']}: {s['accepted']}/{s['total']} accepted")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
