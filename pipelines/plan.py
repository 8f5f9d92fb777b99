"""The work plan of a run: which prompts go to which shard and chunk.

Prompts already recorded by a complete shard are left out; the rest, in input order, are cut
into shards of `shard_size` prompts, and each shard into chunks of `batch_size` prompts to
generate. Shards take the lowest numbers no complete shard uses. After a kill, the complete
shards are whole groups of the original cut, so the remaining prompts fall into exactly the same
groups, numbers and chunks again: the resumed run writes what the uninterrupted one would have.

The plan is streamed to a parquet file of chunk rows that Ray Data reads, so neither the driver
nor the object store holds the whole prompt list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.chunks import PENDING, REJECTED
from pipelines.prompts import Prompt

PLAN_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("shard_total", pa.int32()),
        ("chunk", pa.int32()),
        ("ids", pa.list_(pa.string())),
        ("prompts", pa.list_(pa.string())),
        ("sources", pa.list_(pa.string())),
        ("rows", pa.list_(pa.int64())),
        ("seeds", pa.list_(pa.int64())),
        ("status", pa.list_(pa.string())),
        ("reason", pa.list_(pa.string())),
        ("recaption", pa.list_(pa.string())),
        ("imagereward", pa.list_(pa.float64())),
        ("mps", pa.list_(pa.float64())),
    ]
)


@dataclass
class PlanSummary:
    path: Path
    shards: int = 0
    chunks: int = 0
    prompts: int = 0  # prompts still to handle
    reader_rejected: int = 0
    skipped_done: int = 0  # prompts already in complete shards


def _chunk_row(shard: int, total: int, chunk: int, prompts: list[Prompt]) -> dict:
    n = len(prompts)
    return {
        "shard": shard,
        "shard_total": total,
        "chunk": chunk,
        "ids": [p.id for p in prompts],
        "prompts": [p.text for p in prompts],
        "sources": [p.source for p in prompts],
        "rows": [p.row for p in prompts],
        "seeds": [p.seed for p in prompts],
        "status": [REJECTED if p.reject else PENDING for p in prompts],
        "reason": [p.reject for p in prompts],
        "recaption": [""] * n,
        "imagereward": [math.nan] * n,
        "mps": [math.nan] * n,
    }


def shard_chunks(shard: int, group: list[Prompt], batch_size: int) -> Iterator[dict]:
    """A shard's chunk rows. Reader-rejected prompts ride in the chunk of the prompts after them
    but do not count towards its batch, so the batches the models see do not depend on them."""
    chunk, current, valid = 0, [], 0
    for p in group:
        current.append(p)
        valid += not p.reject
        if valid == batch_size:
            yield _chunk_row(shard, len(group), chunk, current)
            chunk, current, valid = chunk + 1, [], 0
    if current:
        yield _chunk_row(shard, len(group), chunk, current)


def write_plan(
    prompts: Iterable[Prompt],
    done_ids: set[str],
    used_shards: set[int],
    shard_size: int,
    batch_size: int,
    path: Path,
    rows_per_group: int = 256,
) -> PlanSummary:
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = PlanSummary(path=path)
    free_numbers = (n for n in count() if n not in used_shards)
    buffered: list[dict] = []
    with pq.ParquetWriter(path, PLAN_SCHEMA) as writer:

        def flush():
            if buffered:
                writer.write_table(pa.Table.from_pylist(buffered, schema=PLAN_SCHEMA))
                buffered.clear()

        def emit(group: list[Prompt]):
            shard = next(free_numbers)
            summary.shards += 1
            for row in shard_chunks(shard, group, batch_size):
                buffered.append(row)
                summary.chunks += 1
                if len(buffered) >= rows_per_group:
                    flush()

        group: list[Prompt] = []
        for p in prompts:
            if p.id in done_ids:
                summary.skipped_done += 1
                continue
            group.append(p)
            summary.prompts += 1
            summary.reader_rejected += bool(p.reject)
            if len(group) == shard_size:
                emit(group)
                group = []
        if group:
            emit(group)
        flush()
    return summary
