"""A precompute pass: a Ray Dataset written once as parquet, reused while its settings hold.

The output directory is written under a temporary name and renamed when complete; its completion
record (`layton.completion`) carries the settings' fingerprint (a pass with other settings is redone,
not reused), the settings themselves and the row counts, including rows skipped by reason (the
`error` column, "" when usable).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import ray

from layton.completion import fingerprint, is_complete, mark_complete, read_complete

log = logging.getLogger(__name__)


def read_marker(out: Path) -> dict | None:
    """The pass's completion record (None while there is no complete pass)."""
    return read_complete(out) if Path(out).is_dir() else None


def run_pass(out: Path, settings: dict, build: Callable[[], ray.data.Dataset]) -> dict:
    """Write `build()` to `out` unless a complete pass with the same settings is there. Returns the marker."""
    out = Path(out)
    marker = is_complete(out, fingerprint(settings)) if out.is_dir() else None
    if marker:
        return marker
    if out.exists():
        log.info("precompute: %s is incomplete or was made with other settings; redoing it", out)
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build().write_parquet(str(tmp))
    table = pq.read_table(tmp, columns=["error"])
    errors = [e for e in table.column("error").to_pylist() if e]
    marker = mark_complete(tmp, fingerprint(settings), settings=settings, images=table.num_rows,
                           usable=table.num_rows - len(errors), skipped=len(errors),
                           skipped_by_reason={r: errors.count(r) for r in sorted(set(errors))})
    os.replace(tmp, out)
    return marker


def read_pass(out: Path, columns: list[str] | None = None) -> ray.data.Dataset:
    # Rows with an `error` stay in: training workers skip and count them.
    return ray.data.read_parquet(str(out), columns=columns, file_extensions=["parquet"])
