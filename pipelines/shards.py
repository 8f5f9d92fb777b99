"""Shard output: webdataset tars, a parquet index per shard, `_stats.json` last.

Layout of an output directory:

    manifest.json          config, model ids, thresholds (written when a run starts)
    config.yaml            the resolved config
    00000.tar              accepted samples: KEY.jpg|png|webp, KEY.txt (recaption), KEY.json
    00000.parquet          every prompt the shard handled, accepted or not, with scores and reason
    00000_stats.json       counts and score summaries; written last: the completion marker

A shard is written to `*.tmp` names and renamed when whole; `_stats.json` also records the tar's
size, so a tar truncated after the fact is not taken as complete either.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from pipelines.chunks import ACCEPTED, FAILED, REJECTED

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("source", pa.string()),
        ("row", pa.int64()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("imagereward", pa.float64()),
        ("mps", pa.float64()),
        ("recaption", pa.string()),
    ]
)


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_stats(out_dir: Path, shard: int) -> dict | None:
    """The shard's stats if the shard is complete and its tar intact, else None."""
    stats_path = out_dir / f"{shard_name(shard)}_stats.json"
    tar = out_dir / f"{shard_name(shard)}.tar"
    index = out_dir / f"{shard_name(shard)}.parquet"
    try:
        stats = json.loads(stats_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not index.is_file() or not tar.is_file() or tar.stat().st_size != stats.get("tar_bytes"):
        return None
    return stats


def complete_shards(out_dir: Path) -> dict[int, dict]:
    """Shard number → stats for every complete shard."""
    found = {}
    for p in sorted(Path(out_dir).glob("*_stats.json")):
        name = p.name[: -len("_stats.json")]
        if name.isdigit() and (stats := read_stats(out_dir, int(name))) is not None:
            found[int(name)] = stats
    return found


def remove_incomplete(out_dir: Path, complete: set[int]) -> list[str]:
    """Delete what a killed run left: temp files and the pieces of shards without a valid marker."""
    removed = []
    for p in sorted(Path(out_dir).iterdir()):
        stem = p.name.split(".")[0].split("_")[0]
        if p.name.endswith(".tmp") or (stem.isdigit() and len(stem) == 5 and int(stem) not in complete):
            p.unlink()
            removed.append(p.name)
    return removed


def handled_ids(out_dir: Path, shards: dict[int, dict]) -> set[str]:
    """Prompt keys already recorded (accepted or not) by complete shards."""
    ids: set[str] = set()
    for shard in shards:
        table = pq.read_table(Path(out_dir) / f"{shard_name(shard)}.parquet", columns=["key"])
        ids.update(table.column("key").to_pylist())
    return ids


def read_index(out_dir: Path, shards: dict[int, dict] | None = None) -> pa.Table:
    """The concatenated index of the complete shards."""
    out_dir = Path(out_dir)
    shards = complete_shards(out_dir) if shards is None else shards
    tables = [pq.read_table(out_dir / f"{shard_name(s)}.parquet") for s in sorted(shards)]
    return pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()


def _summary(values: list[float]) -> dict | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None
    return {"min": min(vals), "mean": float(np.mean(vals)), "max": max(vals), "n": len(vals)}


class ShardWriter:
    """Writes one shard: samples stream into a temp tar; index and stats are written on close."""

    def __init__(self, out_dir: Path, shard: int, total: int, sample_meta: dict[str, Any]):
        self.out_dir, self.shard, self.total = Path(out_dir), shard, total
        self.sample_meta = sample_meta  # generator settings and model ids for every KEY.json
        self.tar_path = self.out_dir / f"{shard_name(shard)}.tar"
        self._tmp = self.tar_path.with_name(self.tar_path.name + ".tmp")
        self._file = open(self._tmp, "wb")
        # mtime fixed so a regenerated shard is byte-identical.
        self._tar = wds.TarWriter(self._file, mtime=0.0)
        self.rows: list[dict] = []
        self.started = time.time()

    @property
    def done(self) -> bool:
        return len(self.rows) >= self.total

    def add(self, sample: dict[str, Any], image_bytes: bytes, image_ext: str) -> None:
        """One handled prompt. Only accepted samples enter the tar; every one enters the index."""
        if sample["status"] == ACCEPTED:
            meta = {
                "key": sample["key"],
                "prompt": sample["prompt"],
                "recaption": sample["recaption"],
                "seed": sample["seed"],
                "scores": {"imagereward": sample["imagereward"], "mps": sample["mps"]},
                "source": {"file": sample["source"], "row": sample["row"]},
                **self.sample_meta,
            }
            self._tar.write(
                {
                    "__key__": sample["key"],
                    image_ext: image_bytes,
                    "txt": sample["recaption"].encode(),
                    "json": json.dumps(meta, sort_keys=True).encode(),
                }
            )
        self.rows.append({name: sample.get(name) for name in INDEX_SCHEMA.names})

    def close(self) -> dict:
        """Finish the shard: tar renamed, index written, `_stats.json` last. Returns the stats."""
        self._tar.close()  # closes the file too
        os.replace(self._tmp, self.tar_path)
        name = shard_name(self.shard)
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(self.rows, schema=INDEX_SCHEMA), buf)
        _atomic_write(self.out_dir / f"{name}.parquet", buf.getvalue())
        status = Counter(r["status"] for r in self.rows)
        reasons = Counter(reason for r in self.rows if r["reason"] for reason in r["reason"].split(";"))
        stats = {
            "shard": self.shard,
            "total": len(self.rows),
            "accepted": status[ACCEPTED],
            "rejected": status[REJECTED],
            "failed": status[FAILED],
            "reasons": dict(sorted(reasons.items())),
            "imagereward": _summary([r["imagereward"] for r in self.rows]),
            "mps": _summary([r["mps"] for r in self.rows]),
            "tar_bytes": self.tar_path.stat().st_size,
            "seconds": round(time.time() - self.started, 3),
        }
        _atomic_write(self.out_dir / f"{name}_stats.json", json.dumps(stats, indent=1).encode())
        return stats

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def write_image_shards(out_dir: Path, samples: list[tuple[str, str, bytes, str]], shard_size: int = 1000) -> dict[int, dict]:
    """Shards of images made elsewhere: (key, caption, encoded image, extension) per sample.

    Every sample is recorded as accepted, without scores; the result reads like a synthesis output
    (tests and benchmarks train on real photographs through it).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for shard, start in enumerate(range(0, len(samples), shard_size)):
        chunk = samples[start : start + shard_size]
        writer = ShardWriter(out_dir, shard, len(chunk), {"generator": None})
        for key, caption, data, ext in chunk:
            sample = {"key": key, "prompt": caption, "recaption": caption, "seed": 0, "source": "import", "row": 0,
                      "status": ACCEPTED, "reason": None, "imagereward": None, "mps": None}
            writer.add(sample, data, ext)
        stats[shard] = writer.close()
    return stats
