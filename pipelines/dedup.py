"""The dedup pre-pass: which rows repeat an earlier row's id or prompt text, found in the cluster.

A map-reduce over plain Ray tasks, with its own output under `<out>/_dedup/<kind>/`:

- map: each task reads a group of shards (their row ranges) and hashes every candidate row to a
  16-byte digest; rows are hash-partitioned by digest;
- reduce: each partition sorts its rows by (digest, position) and keeps every row after the first
  of its digest: the duplicates, split by shard group;
- write: each shard group's duplicate positions go to one parquet file, which every shard of the
  group reads (filtered to its own rows).

`_complete.json` marks a finished pass; a rerun reuses it. Ids are deduplicated first (when the
input has an id column); the text pass then skips rows with a repeated id, so the first row with
a valid id and a valid text keeps that text, as reading the input in order would.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from layton.completion import fingerprint, is_complete, mark_complete
from layton.storage import Root
from pipelines.plan import ShardPlan, groups_of
from pipelines.prompts import id_digest, selected_rows, text_digest
from stages.synth.config import PromptsConfig

log = logging.getLogger(__name__)

DEDUP_DIR = "_dedup"
_ROW = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("pos", "<i8")])


def kinds(cfg: PromptsConfig) -> list[str]:
    return (["id"] if cfg.id_column else []) + (["text"] if cfg.dedup else [])


def _group_file(group: int) -> str:
    return f"{group:06d}.parquet"


def read_duplicates(root: Root, kind: str, group: int, lo: int, hi: int) -> set[int]:
    """Global positions in [lo, hi) that the `kind` pass found to repeat an earlier row."""
    sub = root.sub(f"{DEDUP_DIR}/{kind}")
    try:  # row-group statistics prune the read to the few groups that hold [lo, hi)
        table = pq.read_table(sub.join(_group_file(group)), filesystem=sub.fs, filters=[("pos", ">=", lo), ("pos", "<", hi)])
    except FileNotFoundError:
        return set()
    except Exception as e:  # a damaged file of the pass's own output: name it (rerun with it removed)
        raise OSError(f"dedup: {sub.join(_group_file(group))}: rows {lo}-{hi}: {type(e).__name__}: {e}") from None
    return set(table.column("pos").to_pylist())


def shard_duplicates(root: Root, cfg: PromptsConfig, plan: ShardPlan, shard: int) -> dict[str, set[int]]:
    """Row numbers (within the shard's file) of the shard's duplicates, per kind."""
    i, start, stop = plan.spec(shard)
    base = int(plan.row_offsets[i])
    group = shard // groups_of(plan)
    return {k: {p - base for p in read_duplicates(root, k, group, base + start, base + stop)} for k in kinds(cfg)}


def _returns(values: list):
    """A task's return values as Ray expects them for `num_returns=len(values)`."""
    return values if len(values) > 1 else values[0]


def _call(fn, n: int, *args) -> list:
    """`fn(*args)` as a task with `n` return values; always a list of `n` references."""
    refs = ray.remote(num_returns=n)(fn).remote(*args)
    return refs if n > 1 else [refs]


def _map(plan: ShardPlan, cfg: PromptsConfig, root: Root, kind: str, group: int, partitions: int):
    per = groups_of(plan)
    # The group's shards as one row range per file: each file's row groups are read once.
    ranges: dict[int, list[int]] = {}
    for shard in range(group * per, min((group + 1) * per, plan.n_shards)):
        i, start, stop = plan.spec(shard)
        lo, hi = ranges.get(i, (start, stop))
        ranges[i] = [min(lo, start), max(hi, stop)]
    rows = []
    for i, (start, stop) in ranges.items():
        base = int(plan.row_offsets[i])
        dup_ids = ({p - base for p in read_duplicates(root, "id", group, base + start, base + stop)}
                   if kind == "text" and cfg.id_column else set())
        for row, pid, text, reason in selected_rows(cfg, plan.files[i], start, stop):
            if kind == "id":
                rows.append((id_digest(pid), base + row))
            elif not reason and row not in dup_ids:
                rows.append((text_digest(text), base + row))
    arr = np.empty(len(rows), _ROW)
    if rows:
        digests = np.frombuffer(b"".join(d for d, _ in rows), dtype="<u8").reshape(-1, 2)
        arr["hi"], arr["lo"], arr["pos"] = digests[:, 0], digests[:, 1], [p for _, p in rows]
    part = arr["hi"] % partitions
    return _returns([arr[part == p] for p in range(partitions)])


def _reduce(plan: ShardPlan, n_groups: int, *parts: np.ndarray):
    arr = np.concatenate(parts) if parts else np.empty(0, _ROW)
    arr = arr[np.lexsort((arr["pos"], arr["lo"], arr["hi"]))]
    repeat = (arr["hi"][1:] == arr["hi"][:-1]) & (arr["lo"][1:] == arr["lo"][:-1])
    dups = arr["pos"][1:][repeat]
    group = plan.shard_of(dups) // groups_of(plan) if dups.size else np.empty(0, np.int64)
    return _returns([dups[group == g] for g in range(n_groups)])


def _write(root: Root, group: int, *parts: np.ndarray) -> int:
    pos = np.sort(np.concatenate(parts)) if parts else np.empty(0, np.int64)
    if pos.size:
        buf = io.BytesIO()
        pq.write_table(pa.table({"pos": pa.array(pos, pa.int64())}), buf, row_group_size=4096)
        root.write(_group_file(group), buf.getvalue())
    return int(pos.size)


def run_dedup(plan: ShardPlan, cfg: PromptsConfig, root: Root, max_partitions: int = 64) -> dict[str, int]:
    """Run the passes not yet complete; returns the number of duplicates per kind."""
    found = {}
    n_groups = -(-plan.n_shards // groups_of(plan))
    settings = fingerprint({"plan": plan.describe(), "prompts": cfg})
    for kind in kinds(cfg):
        sub = root.sub(f"{DEDUP_DIR}/{kind}")
        done = is_complete(sub, settings)
        if done is not None:
            found[kind] = done["duplicates"]
            continue
        if n_groups == 0:
            found[kind] = 0
            mark_complete(sub, settings, duplicates=0, groups=0)
            continue
        partitions = max(1, min(max_partitions, n_groups))
        maps = [_call(_map, partitions, plan, cfg, root, kind, g, partitions) for g in range(n_groups)]
        reds = [_call(_reduce, n_groups, plan, n_groups, *[m[p] for m in maps]) for p in range(partitions)]
        counts = ray.get([ray.remote(_write).remote(sub, g, *[r[g] for r in reds]) for g in range(n_groups)])
        found[kind] = int(sum(counts))
        mark_complete(sub, settings, duplicates=found[kind], groups=n_groups)
        log.info("dedup %s: %d repeated row(s) over %d row(s)", kind, found[kind], plan.n_rows)
    return found
