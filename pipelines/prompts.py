"""Prompt reader: LAION-style parquet files → a stream of prompts with stable ids and seeds.

Streaming: files are read in row batches, so memory does not grow with the input (the dedup set
holds one 8-byte digest per distinct prompt). Invalid prompts are yielded too, with the reason
they are rejected, so that the shard index records every row the run was given.
"""

from __future__ import annotations

import glob
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from layton.config import PromptsConfig

_KEY_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


@dataclass(frozen=True)
class Prompt:
    id: str  # webdataset key: no dots, stable across runs
    text: str  # "" when the row is rejected for being empty/NULL/non-string
    seed: int
    source: str  # file name the row came from
    row: int  # row number in that file
    reject: str = ""  # reason the reader rejects it; "" = valid


def _digest(*parts: object) -> bytes:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()


def prompt_id(source: str, row: int) -> str:
    """Id of a row without an id column: hash of the file name and row number."""
    return _digest(source, row).hex()[:20]


def key_for(given_id: str) -> str:
    """A given id is used as the sample key when it is key-safe (webdataset splits keys on dots)."""
    return given_id if _KEY_SAFE.match(given_id) else _digest("id", given_id).hex()[:20]


def prompt_seed(pid: str, global_seed: int) -> int:
    """Seed derived from the id alone, so a regenerated sample is identical."""
    return int.from_bytes(_digest("seed", global_seed, pid)[:4], "little") & 0x7FFFFFFF


def _in_sample(pid: str, fraction: float | None, seed: int) -> bool:
    if fraction is None:
        return True
    return int.from_bytes(_digest("sample", seed, pid)[:8], "little") / 2**64 < fraction


def resolve_paths(patterns: list[str]) -> list[Path]:
    """Parquet files named by paths, directories or globs, in a stable (sorted) order."""
    files: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            found = sorted(p.rglob("*.parquet"))
        elif any(c in pattern for c in "*?["):
            found = sorted(Path(f) for f in glob.glob(pattern, recursive=True))
        else:
            found = [p] if p.is_file() else []
        if not found:
            raise FileNotFoundError(f"prompts.paths: {pattern} matches no parquet file")
        files.extend(found)
    return files


def check_prompt_files(cfg: PromptsConfig) -> list[Path]:
    """Fail before any cluster work when a file is missing, unreadable or lacks a column."""
    files = resolve_paths(cfg.paths)
    for f in files:
        try:
            names = pq.ParquetFile(f).schema_arrow.names
        except Exception as e:
            raise ValueError(f"prompts.paths: {f} is not a readable parquet file ({e})") from None
        for col in filter(None, (cfg.text_column, cfg.id_column)):
            if col not in names:
                raise ValueError(f"prompts: {f} has no column {col!r} (columns: {', '.join(names)})")
    return files


def _reject_reason(text: object, max_chars: int) -> str:
    if text is None:
        return "null_prompt"
    if not isinstance(text, str):
        return "non_string_prompt"
    if not text.strip():
        return "empty_prompt"
    if len(text) > max_chars:
        return "prompt_too_long"
    return ""


def read_prompts(cfg: PromptsConfig, global_seed: int = 0, batch_rows: int = 8192) -> Iterator[Prompt]:
    """Every selected row of every file, in file then row order."""
    seen_text: set[bytes] = set()
    seen_id: set[bytes] = set()
    emitted = 0
    for f in check_prompt_files(cfg):
        columns = [c for c in (cfg.text_column, cfg.id_column) if c]
        row = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns):
            texts = batch.column(cfg.text_column).to_pylist()
            ids = batch.column(cfg.id_column).to_pylist() if cfg.id_column else None
            for i, text in enumerate(texts):
                pid = key_for(str(ids[i])) if ids is not None else prompt_id(f.name, row)
                row += 1
                if not _in_sample(pid, cfg.sample_fraction, cfg.sample_seed):
                    continue
                reason = _reject_reason(text, cfg.max_chars)
                d = _digest("id", pid)[:8]
                if d in seen_id:
                    # A repeated id (or two files of one name) must not share a key: give it its own.
                    pid, reason = prompt_id(f"{f}#dup", row - 1), "duplicate_id"
                seen_id.add(d)
                if not reason and cfg.dedup:
                    d = _digest("text", text.strip())[:8]
                    if d in seen_text:
                        reason = "duplicate_prompt"
                    seen_text.add(d)
                yield Prompt(
                    id=pid,
                    text=text if isinstance(text, str) else "",
                    seed=prompt_seed(pid, global_seed),
                    source=f.name,
                    row=row - 1,
                    reject=reason,
                )
                emitted += 1
                if cfg.limit is not None and emitted >= cfg.limit:
                    return
