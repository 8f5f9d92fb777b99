"""Shard output: webdataset tars, a parquet index per shard, `_stats.json` last.

Layout of an output directory (a local path or any URI pyarrow/fsspec opens):

    manifest.json          config, model ids, thresholds, the plan's inputs (written when a run starts)
    config.yaml            the resolved config
    00000.tar              accepted samples: KEY.jpg|png|webp, KEY.txt (recaption), KEY.json
    00000.parquet          every prompt the shard handled, accepted or not, with scores and reason
    00000_stats.json       counts, score summaries and who wrote it; written last: the completion record
    _dedup/                the dedup pre-pass's output

Shards are written where the pipeline runs (a Ray Data task per shard), each file atomically
(`Root.write`); `_stats.json` also records the tar's size, so a tar truncated after the fact is
not taken as complete either.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from layton.completion import fingerprint, mark_complete, read_complete
from layton.storage import Root
from pipelines.shard_rows import ACCEPTED, FAILED, REJECTED, unpack

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
STATS_SUFFIX = "_stats.json"


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def _root(out: Root | str | Path) -> Root:
    return out if isinstance(out, Root) else Root(out)


def shard_number(name: str) -> int | None:
    """The shard a file of the output belongs to (00012.tar, 00012_stats.json, 00012.tar.tmp-...)."""
    stem = name.split(".")[0].split("_")[0]
    return int(stem) if stem.isdigit() and len(stem) >= 5 else None


def complete_shards(out: Root | str | Path, files: dict[str, int] | None = None) -> dict[int, dict]:
    """Shard number → stats for every complete shard: a completion record whose tar and index
    exist, the tar of the recorded size. One listing (or `files`, the output's listing), then one
    read per completion record."""
    root = _root(out)
    files = root.list() if files is None else files
    found = {}
    for name in sorted(files):
        if not name.endswith(STATS_SUFFIX) or (shard := shard_number(name)) is None:
            continue
        stats = read_complete(root, name)
        if stats is None:
            continue
        base = name[: -len(STATS_SUFFIX)]
        if f"{base}.parquet" in files and files.get(f"{base}.tar") == stats.get("tar_bytes"):
            found[shard] = stats
    return found


def remove_incomplete(out: Root | str | Path, complete: set[int], files: dict[str, int] | None = None) -> list[str]:
    """Delete what a killed run left: temp files and the pieces of shards without a valid record."""
    root = _root(out)
    removed = []
    for name in sorted(root.list() if files is None else files):
        shard = shard_number(name)
        if shard is not None and (".tmp" in name or shard not in complete):
            root.delete(name)
            removed.append(name)
    return removed


def read_index(out: Root | str | Path, shards: dict[int, dict] | None = None) -> pa.Table:
    """The concatenated index of the complete shards."""
    root = _root(out)
    shards = complete_shards(root) if shards is None else shards
    tables = [pq.read_table(io.BytesIO(root.read(f"{shard_name(s)}.parquet"))) for s in sorted(shards)]
    return pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()


def _summary(values: list[float]) -> dict | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None
    return {"min": min(vals), "mean": float(np.mean(vals)), "max": max(vals), "n": len(vals)}


def writer_identity() -> dict:
    """Where a shard was written: the Ray node, host and process."""
    node = None
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 — identity is informative only
        pass
    return {"node_id": node, "host": socket.gethostname(), "pid": os.getpid()}


class ShardWriter:
    """Writes one shard: samples are added in order; close writes tar, index, then `_stats.json`.

    The tar is built in memory (a shard's encoded images), so nothing partial ever reaches the
    output: each file lands whole, and the completion record last.
    """

    def __init__(self, out: Root | str | Path, shard: int, total: int, sample_meta: dict[str, Any], fingerprint: str):
        self.root, self.shard, self.total = _root(out), shard, total
        self.fingerprint = fingerprint  # of the run's settings: the completion record carries it
        self.sample_meta = sample_meta  # generator settings and model ids for every KEY.json
        self._buf = io.BytesIO()
        # mtime fixed so a regenerated shard is byte-identical.
        self._tar = wds.TarWriter(self._buf, mtime=0.0)
        self.rows: list[dict] = []

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

    def close(self, processed_by: dict | None = None) -> dict:
        """Finish the shard: tar, index, then `_stats.json`, each written whole. Returns the stats."""
        self._tar.close()
        tar = self._buf.getvalue()
        name = shard_name(self.shard)
        self.root.write(f"{name}.tar", tar)
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(self.rows, schema=INDEX_SCHEMA), buf)
        self.root.write(f"{name}.parquet", buf.getvalue())
        status = Counter(r["status"] for r in self.rows)
        reasons = Counter(reason for r in self.rows if r["reason"] for reason in r["reason"].split(";"))
        stats = {  # the completion record's body
            "shard": self.shard,
            "total": len(self.rows),
            "accepted": status[ACCEPTED],
            "rejected": status[REJECTED],
            "failed": status[FAILED],
            "reasons": dict(sorted(reasons.items())),
            "imagereward": _summary([r["imagereward"] for r in self.rows]),
            "mps": _summary([r["mps"] for r in self.rows]),
            "tar_bytes": len(tar),
            # Who and when: the only fields that differ between two writes of one shard.
            "writer": {**writer_identity(), "finished_at": round(time.time(), 3), "stages": processed_by or {}},
        }
        return mark_complete(self.root, self.fingerprint, f"{name}{STATS_SUFFIX}", **stats)


# --- synthesis shard rows (pipelines/shard_rows.py) → shards -----------------------------------------


def _none_for_nan(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def samples(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A shard row → one dict per sample, the form the shard writer takes."""
    return [
        {
            "key": key,
            "prompt": row["prompts"][i],
            "seed": row["seeds"][i],
            "source": row["sources"][i],
            "row": row["rows"][i],
            "status": row["status"][i],
            "reason": row["reason"][i],
            "imagereward": _none_for_nan(row["imagereward"][i]),
            "mps": _none_for_nan(row["mps"][i]),
            "recaption": row["recaption"][i],
            "image": row["image"][i],
        }
        for i, key in enumerate(row["ids"])
    ]


def write_shard(root: Root, row: dict[str, Any], meta: dict, image_ext: str, fingerprint: str) -> dict:
    """One finished shard row → tar, index and completion record. Returns the stats."""
    writer = ShardWriter(root, row["shard"], len(row["ids"]), meta, fingerprint)
    for s in samples(row):
        writer.add(s, s["image"], image_ext)
    return writer.close(processed_by=json.loads(row.get("processed_by") or "{}"))


def write_shards(batch: dict[str, np.ndarray], out: str, meta: dict, image_ext: str, fingerprint: str) -> dict[str, Any]:
    """The last Ray Data stage: writes each shard where it runs; only a stats row goes on."""
    root = Root(out)
    return {"stats": np.array([json.dumps(write_shard(root, row, meta, image_ext, fingerprint)) for row in unpack(batch)],
                              dtype=object)}


def write_image_shards(out_dir: Root | str | Path, samples: list[tuple[str, str, bytes, str]], shard_size: int = 1000) -> dict[int, dict]:
    """Shards of images made elsewhere: (key, caption, encoded image, extension) per sample.

    Every sample is recorded as accepted, without scores; the result reads like a synthesis output
    (tests and benchmarks train on real photographs through it).
    """
    out_dir = _root(out_dir)
    out_dir.mkdir()
    stats = {}
    for shard, start in enumerate(range(0, len(samples), shard_size)):
        chunk = samples[start : start + shard_size]
        writer = ShardWriter(out_dir, shard, len(chunk), {"generator": None}, fingerprint({"imported": len(samples)}))
        for key, caption, data, ext in chunk:
            sample = {"key": key, "prompt": caption, "recaption": caption, "seed": 0, "source": "import", "row": 0,
                      "status": ACCEPTED, "reason": None, "imagereward": None, "mps": None}
            writer.add(sample, data, ext)
        stats[shard] = writer.close()
    return stats
