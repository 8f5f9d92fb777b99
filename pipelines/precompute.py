"""A precompute pass: a Ray Dataset written once as parquet, reused while its settings hold.

The output directory (a local path or a URI) is cleared, written, then given its completion record
(`layton.completion`) last, so a pass killed half-way has no record and is redone. The record
carries the settings' fingerprint (a pass with other settings is redone, not reused), the settings
themselves and the row counts, including rows skipped by reason (the `error` column, "" when usable).

Training reads a pass (and shard tars) through `training_read`: the files in a new seeded order
every epoch, so that the first steps of a long run see rows from all over the data set.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import FileShuffleConfig

from layton.completion import fingerprint, is_complete, mark_complete, read_complete
from layton.seeds import derive_seed
from layton.storage import Root

log = logging.getLogger(__name__)


def training_read(data_cfg) -> dict:
    """Ray Data read arguments of a training input: a file order reseeded at every execution (epoch)
    from `data.shuffle_seed`, and `data.read_cpus` per read task (what the CPU check keeps free)."""
    shuffle = FileShuffleConfig(seed=derive_seed("train-files", data_cfg.shuffle_seed)) if data_cfg.shuffle_files else None
    return {"shuffle": shuffle, "num_cpus": data_cfg.read_cpus}


def read_marker(out: str | Path) -> dict | None:
    """The pass's completion record (None while there is no complete pass)."""
    return read_complete(out)


def run_pass(out: str | Path, settings: dict, build: Callable[[], ray.data.Dataset]) -> dict:
    """Write `build()` to `out` unless a complete pass with the same settings is there. Returns the marker."""
    root = Root(out)
    marker = is_complete(root, fingerprint(settings))
    if marker:
        return marker
    if root.exists():
        log.info("precompute: %s is incomplete or was made with other settings; redoing it", out)
        root.delete_dir()
    build().write_parquet(root.path, filesystem=root.fs)
    errors = pc.value_counts(pq.read_table(root.path, columns=["error"], filesystem=root.fs).column("error"))
    by_reason = {e["values"].as_py(): e["counts"].as_py() for e in errors}
    rows = sum(by_reason.values())
    skipped = {r: n for r, n in sorted(by_reason.items()) if r}
    return mark_complete(root, fingerprint(settings), settings=settings, images=rows, usable=rows - sum(skipped.values()),
                         skipped=sum(skipped.values()), skipped_by_reason=skipped)


def read_pass(out: str | Path, columns: list[str] | None = None, **read_args) -> ray.data.Dataset:
    """The pass's rows (`read_args`: `training_read`'s, for a training input). Rows with an `error`
    stay in: training workers skip and count them."""
    root = Root(out)
    return ray.data.read_parquet(root.path, filesystem=root.fs, columns=columns, file_extensions=["parquet"], **read_args)
