"""The unit that flows through the synthesis pipeline: a chunk of prompts.

A chunk is one model batch (`generation.batch_size` prompts of one shard). Every stage runs its
model on exactly one chunk, so a chunk's outputs do not depend on how Ray happened to batch rows:
a regenerated chunk is bit-identical, which is what makes resume exact. A chunk row holds
per-sample lists:

    shard, shard_total, chunk         ints
    ids, prompts, sources, status, reason, recaption   list<str>
    seeds, rows                      list<int64>
    imagereward, mps                 list<float64>   (NaN until scored)
    images                           (n, H, W, 3) uint8, after generation
    image_bytes                      list<binary>, after encoding (empty for non-accepted)

`status` moves pending → generated → accepted | rejected | failed; rows the reader rejected enter
as `rejected` and every stage passes them through untouched.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PENDING, GENERATED, ACCEPTED, REJECTED, FAILED = "pending", "generated", "accepted", "rejected", "failed"


def _py(value: Any) -> Any:
    """Numpy values from a Ray batch → plain Python (lists, ints, floats, str, bytes)."""
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def unpack(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """A Ray numpy batch of chunk rows → plain dicts (lists as Python lists, images as arrays)."""
    n = len(next(iter(batch.values())))
    rows = []
    for i in range(n):
        row = {}
        for k, col in batch.items():
            v = col[i]
            row[k] = v if k == "images" else _py(v)
        rows.append(row)
    return rows


def pack(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Plain dicts → a Ray batch. List columns stay object arrays of lists so Arrow keeps them lists."""
    out: dict[str, Any] = {}
    for k in rows[0]:
        values = [r[k] for r in rows]
        if k == "images":
            out[k] = values  # Ray builds a (variable-shaped) tensor column from a list of arrays
        else:
            col = np.empty(len(values), dtype=object)
            col[:] = values
            out[k] = col
    return out


def map_chunks(fn):
    """Wrap `fn(chunk_dict) -> chunk_dict` as a Ray `map_batches` function over chunk rows."""

    def apply(batch):
        return pack([fn(row) for row in unpack(batch)])

    return apply


def indices_with(row: dict[str, Any], status: str | tuple[str, ...]) -> list[int]:
    wanted = (status,) if isinstance(status, str) else status
    return [i for i, s in enumerate(row["status"]) if s in wanted]
