"""Prompt input: LAION-style parquet files → prompts with stable ids, seeds and reader verdicts.

Nothing here holds the whole input: the driver reads file footers (row counts) and, before a run,
decodes the used row groups' prompt columns once, one group at a time (`check_pages`: a damaged page
fails there, not in a task); each shard reads its own row range where it runs. A row's id is its
given id (`id_column`) or a hash of its file name and row number; its seed derives from the id
alone, so a regenerated sample is identical. Invalid prompts are kept with the reason they are
rejected, so that the shard index records every row the run was given. Duplicates are found by the
distributed pre-pass in `pipelines/dedup.py`, whose masks `shard_prompts` applies.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from layton.seeds import derive_seed, digest
from layton.storage import Root, is_uri
from stages.synth.config import PromptsConfig

_KEY_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


@dataclass(frozen=True)
class Prompt:
    id: str  # webdataset key: no dots, stable across runs
    text: str  # "" when the row is rejected for being empty/NULL/non-string
    seed: int
    source: str  # file name the row came from
    row: int  # row number in that file
    reject: str = ""  # reason the reader rejects it; "" = valid


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute local path or URI
    name: str  # file name: part of the id of every row without a given id
    rows: int


def prompt_id(source: str, row: int) -> str:
    """Id of a row without an id column: hash of the file name and row number."""
    return digest(source, row).hex()[:20]


def duplicate_id_key(source: str, row: int) -> str:
    """The key of a row whose given id repeats an earlier row's: it must not share that key."""
    return prompt_id(f"{source}#dup", row)


def key_for(given_id: str) -> str:
    """A given id is used as the sample key when it is key-safe (webdataset splits keys on dots)."""
    return given_id if _KEY_SAFE.match(given_id) else digest("id", given_id).hex()[:20]


def prompt_seed(pid: str, global_seed: int) -> int:
    """Seed derived from the id alone, so a regenerated sample is identical."""
    return derive_seed("seed", global_seed, pid)


def text_digest(text: str) -> bytes:
    """16 bytes per prompt text: collisions stay improbable (< 1e-18) at billions of prompts."""
    return digest("text", text.strip())[:16]


def id_digest(pid: str) -> bytes:
    return digest("id", pid)[:16]


def _in_sample(pid: str, fraction: float | None, seed: int) -> bool:
    if fraction is None:
        return True
    return int.from_bytes(digest("sample", seed, pid)[:8], "little") / 2**64 < fraction


def resolve_paths(patterns: list[str]) -> list[str]:
    """Parquet files named by paths, directories or globs (local), or URIs of files or
    directories, in a stable (sorted) order."""
    files: list[str] = []
    for pattern in patterns:
        if is_uri(pattern):
            from pyarrow import fs as pafs

            root = Root(pattern)
            kind = root.fs.get_file_info(root.path).type
            if kind == pafs.FileType.Directory:
                found = [f"{pattern.rstrip('/')}/{n}" for n in sorted(root.list(recursive=True)) if n.endswith(".parquet")]
            else:
                found = [pattern] if kind == pafs.FileType.File else []
        else:
            p = Path(pattern)
            if p.is_dir():
                found = [str(f.resolve()) for f in sorted(p.rglob("*.parquet"))]
            elif any(c in pattern for c in "*?["):
                found = [str(Path(f).resolve()) for f in sorted(glob.glob(pattern, recursive=True))]
            else:
                found = [str(p.resolve())] if p.is_file() else []
        if not found:
            raise FileNotFoundError(f"prompts.paths: {pattern} matches no parquet file")
        files.extend(found)
    return files


def _parquet(path: str) -> pq.ParquetFile:
    root = Root(path)  # a local path or a URI alike
    return pq.ParquetFile(root.fs.open_input_file(root.path))


def list_inputs(cfg: PromptsConfig) -> list[InputFile]:
    """Every input file with its row count, from the footers alone. Fails, before any cluster
    work, on a missing or unreadable file, a missing column, or two files whose rows would get
    the same ids."""
    inputs, names = [], {}
    for path in resolve_paths(cfg.paths):
        try:
            f = _parquet(path)
            columns, rows = f.schema_arrow.names, f.metadata.num_rows
        except Exception as e:
            raise ValueError(f"prompts.paths: {path} is not a readable parquet file ({e})") from None
        for col in filter(None, (cfg.text_column, cfg.id_column)):
            if col not in columns:
                raise ValueError(f"prompts: {path} has no column {col!r} (columns: {', '.join(columns)})")
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if not cfg.id_column and name in names:
            raise ValueError(f"prompts.paths: {names[name]} and {path} share the file name that prompt ids are "
                             "made from; rename one or set prompts.id_column")
        names[name] = path
        inputs.append(InputFile(path, name, rows))
    return inputs


_DECODED: set[tuple] = set()  # files (path, size, mtime, columns, rows) whose pages all decoded, in this process


def check_pages(cfg: PromptsConfig, f: InputFile, rows: int) -> None:
    """Decode the prompt columns of the row groups that hold the file's first `rows` rows, one group at a
    time. The footer alone does not show a corrupt data page: found here, it fails the run before Ray
    and before any output exists, naming the file and the row group, instead of in a task later."""
    columns = [c for c in (cfg.text_column, cfg.id_column) if c]
    root = Root(f.path)
    info = root.fs.get_file_info(root.path)
    key = (f.path, info.size, info.mtime_ns, tuple(columns), rows)
    if rows <= 0 or key in _DECODED:  # the stage's check and the job both ask: decode once
        return
    pf = _parquet(f.path)
    offset = 0
    for g in range(pf.metadata.num_row_groups):
        if offset >= rows:
            break
        n = pf.metadata.row_group(g).num_rows
        try:
            pf.read_row_group(g, columns=columns)
        except Exception as e:
            raise ValueError(f"prompts: {f.path}: row group {g} (rows {offset}-{offset + n}) cannot be read "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); the file is damaged: "
                             "replace it or leave it out of prompts.paths") from None
        offset += n
    _DECODED.add(key)


def read_rows(f: InputFile, start: int, stop: int, columns: list[str]) -> dict[str, list]:
    """Rows [start, stop) of a file: only the row groups that hold them are read."""
    groups = []
    try:
        pf = _parquet(f.path)
        first, offset = None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset < stop and offset + n > start:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        if not groups:
            return {c: [] for c in columns}
        table = pf.read_row_groups(groups, columns=columns).slice(start - first, stop - start)
        return {c: table.column(c).to_pylist() for c in columns}
    except Exception as e:
        where = f" (row group {groups[0]}{f'-{groups[-1]}' if len(groups) > 1 else ''})" if groups else ""
        raise OSError(f"prompts: {f.path}: rows {start}-{stop}{where}: {type(e).__name__}: {e}") from None


# Every reason the reader (with the dedup pass's verdicts) rejects a row for.
READER_REASONS = frozenset({"null_prompt", "non_string_prompt", "empty_prompt", "prompt_too_long", "duplicate_prompt",
                            "duplicate_id"})


def reject_reason(text: object, max_chars: int) -> str:
    if text is None:
        return "null_prompt"
    if not isinstance(text, str):
        return "non_string_prompt"
    if not text.strip():
        return "empty_prompt"
    if len(text) > max_chars:
        return "prompt_too_long"
    return ""


def selected_rows(cfg: PromptsConfig, f: InputFile, start: int, stop: int) -> list[tuple[int, str, object, str]]:
    """(row, id, text, reader verdict) of the rows in [start, stop) that the sample selects."""
    columns = [c for c in (cfg.text_column, cfg.id_column) if c]
    data = read_rows(f, start, stop, columns)
    texts = data[cfg.text_column]
    ids = data[cfg.id_column] if cfg.id_column else None
    out = []
    for i, text in enumerate(texts):
        row = start + i
        pid = key_for(str(ids[i])) if ids is not None else prompt_id(f.name, row)
        if _in_sample(pid, cfg.sample_fraction, cfg.sample_seed):
            out.append((row, pid, text, reject_reason(text, cfg.max_chars)))
    return out


def shard_prompts(cfg: PromptsConfig, global_seed: int, f: InputFile, start: int, stop: int,
                  dup_ids: set[int] = frozenset(), dup_texts: set[int] = frozenset()) -> list[Prompt]:
    """The prompts of rows [start, stop) of `f`, in row order, with the dedup pass's verdicts
    (`dup_*`: row numbers whose id / text repeats an earlier row's)."""
    prompts = []
    for row, pid, text, reason in selected_rows(cfg, f, start, stop):
        if row in dup_ids:
            pid, reason = duplicate_id_key(f.name, row), "duplicate_id"
        elif not reason and row in dup_texts:
            reason = "duplicate_prompt"
        prompts.append(Prompt(pid, text if isinstance(text, str) else "", prompt_seed(pid, global_seed), f.name, row, reason))
    return prompts
