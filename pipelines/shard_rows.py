"""The unit that flows through the synthesis pipeline: one row per shard.

A shard row holds per-sample lists, in the shard's fixed order:

    shard                                              int
    ids, prompts, sources, status, reason, recaption   list<str>
    seeds, rows                                        list<int64>
    imagereward, mps                                   list<float64>   (NaN until scored)
    image                                              list<binary>    the stored format (jpg/png/webp)

Ray Data moves whole shard rows, one per block, so a task is one shard and a retried task redoes
one shard. Inside a stage, models run on batches of `generation.batch_size` of the samples the
stage handles, cut in shard order, so a stage's output is a pure function of its shard row (the
same whatever the actor count, block order or retries). Images cross the object store encoded as
they will be stored, and the scorers and the recaptioner read those bytes.

`status` moves pending → generated → accepted | rejected | failed; rows the reader rejected enter
as `rejected` and every stage passes them through untouched.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PENDING, GENERATED, ACCEPTED, REJECTED, FAILED = "pending", "generated", "accepted", "rejected", "failed"
SAMPLE_COLUMNS = ("ids", "prompts", "sources", "rows", "seeds", "status", "reason", "recaption", "imagereward", "mps", "image")


def _py(value: Any) -> Any:
    """Numpy values from a Ray batch → plain Python (lists, ints, floats, str, bytes)."""
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def unpack(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """A Ray numpy batch of shard rows → plain dicts of Python lists."""
    n = len(next(iter(batch.values())))
    return [{k: _py(col[i]) for k, col in batch.items()} for i in range(n)]


def pack(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Plain dicts → a Ray batch. List columns stay object arrays of lists so Arrow keeps them lists."""
    out: dict[str, Any] = {}
    for k in rows[0]:
        col = np.empty(len(rows), dtype=object)
        col[:] = [r[k] for r in rows]
        out[k] = col
    return out


def indices_with(row: dict[str, Any], status: str | tuple[str, ...]) -> list[int]:
    wanted = (status,) if isinstance(status, str) else status
    return [i for i, s in enumerate(row["status"]) if s in wanted]


def batches(indices: list[int], size: int) -> list[list[int]]:
    """`indices` cut in order into model batches of `size`."""
    return [indices[s : s + size] for s in range(0, len(indices), size)]
