"""The work plan of a run: which input rows make which shard, as a pure function of the input.

A shard is a fixed range of rows of one input file: shard numbers count the files' ranges in file
order, so they follow from the file list and the files' row counts (their parquet footers) alone.
Nothing is materialised per prompt: a rerun lists the shards' completion records and plans the
rest, and a resumed run writes exactly what the uninterrupted one would have.

With `sample_fraction` a shard spans `shard_size / sample_fraction` input rows, so it holds about
`shard_size` prompts; `limit` keeps the first `limit` input rows (in file order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pipelines.prompts import InputFile, check_pages, list_inputs
from stages.synth.config import PromptsConfig


def rows_per_shard(prompts: PromptsConfig, shard_size: int) -> int:
    if prompts.sample_fraction is None:
        return shard_size
    return max(1, round(shard_size / prompts.sample_fraction))


@dataclass(frozen=True)
class ShardPlan:
    files: tuple[InputFile, ...]
    rows_per_shard: int
    limit: int | None = None
    used_rows: np.ndarray = field(init=False, repr=False)  # rows of each file in the run
    shard_offsets: np.ndarray = field(init=False, repr=False)  # first shard number of each file
    row_offsets: np.ndarray = field(init=False, repr=False)  # global position of each file's row 0

    def __post_init__(self):
        rows = np.array([f.rows for f in self.files], dtype=np.int64)
        if self.limit is not None:
            before = np.concatenate([[0], np.cumsum(rows)[:-1]])
            rows = np.clip(self.limit - before, 0, rows)
        shards = -(-rows // self.rows_per_shard)
        object.__setattr__(self, "used_rows", rows)
        object.__setattr__(self, "shard_offsets", np.concatenate([[0], np.cumsum(shards)]).astype(np.int64))
        object.__setattr__(self, "row_offsets", np.concatenate([[0], np.cumsum(rows)]).astype(np.int64))

    @property
    def n_shards(self) -> int:
        return int(self.shard_offsets[-1])

    @property
    def n_rows(self) -> int:
        return int(self.row_offsets[-1])

    def spec(self, shard: int) -> tuple[int, int, int]:
        """(file index, first row, end row) of a shard."""
        if not 0 <= shard < self.n_shards:
            raise IndexError(f"shard {shard} outside the plan's {self.n_shards}")
        i = int(np.searchsorted(self.shard_offsets, shard, side="right") - 1)
        start = (shard - int(self.shard_offsets[i])) * self.rows_per_shard
        return i, start, min(start + self.rows_per_shard, int(self.used_rows[i]))

    def shard_of(self, positions: np.ndarray) -> np.ndarray:
        """Shard numbers of global row positions."""
        i = np.searchsorted(self.row_offsets, positions, side="right") - 1
        return self.shard_offsets[i] + (positions - self.row_offsets[i]) // self.rows_per_shard

    def describe(self) -> dict:
        """What the manifest records: a resume must see the same input to plan the same shards."""
        return {"rows_per_shard": self.rows_per_shard, "limit": self.limit, "shards": self.n_shards,
                "inputs": [[f.name, f.rows] for f in self.files]}


def make_plan(prompts: PromptsConfig, shard_size: int, check: bool = False) -> ShardPlan:
    """The plan, from the input files' footers. `check=True` also decodes the prompt columns of the
    rows the plan uses (`check_pages`): what a run does before it writes anything."""
    plan = ShardPlan(tuple(list_inputs(prompts)), rows_per_shard(prompts, shard_size), prompts.limit)
    if check:
        for f, rows in zip(plan.files, plan.used_rows):
            check_pages(prompts, f, int(rows))
    return plan


def groups_of(plan: ShardPlan, rows: int = 1 << 20) -> int:
    """Shards per group for passes that work on ~`rows` input rows at a time."""
    return max(1, math.ceil(rows / plan.rows_per_shard))
