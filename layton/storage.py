"""A workflow root on a cloud URI: stages run in a local staging directory mirrored to the URI.

The stages write with local file APIs (shard writers, Ray Train's storage, PNGs), so a root such as
`s3://bucket/runs/x` is worked on in `$LAYTON_STAGING/<name>-<hash>` (default
`~/.cache/layton/staging`): pulled from the URI before the run (a run resumes from what the URI
holds, on any machine) and pushed after every stage, so the URI always has each finished stage.
Any filesystem pyarrow opens from a URI (s3, gs, abfs, hdfs, file) is used directly; other
schemes go through fsspec. On a multi-node cluster the staging directory must be on storage that
every node sees (set $LAYTON_STAGING), as for any local root.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow.fs as pafs

SYNC_MARKER = ".layton_synced"  # local mtime of the last push: later files are pushed again


def is_uri(root: str) -> bool:
    return "://" in root


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it); fails naming the URI when neither pyarrow nor fsspec knows it."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError):  # pyarrow's ArrowInvalid for a scheme it does not know
        pass
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise ValueError(f"root: {uri}: no pyarrow or fsspec filesystem handles it ({e})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def staging_dir(name: str, uri: str) -> Path:
    base = Path(os.environ.get("LAYTON_STAGING", "~/.cache/layton/staging")).expanduser()
    return (base / f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:10]}").resolve()


def _remote_files(fs: pafs.FileSystem, root: str) -> dict[str, int]:
    """Relative path -> size of every file under `root` ({} when it does not exist)."""
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return {}
    sel = pafs.FileSelector(root, recursive=True)
    return {info.path[len(root.rstrip("/")) + 1:]: info.size for info in fs.get_file_info(sel)
            if info.type == pafs.FileType.File}


def _copy(src_fs, src: str, dst_fs, dst: str) -> None:
    with src_fs.open_input_stream(src) as fin, dst_fs.open_output_stream(dst) as fout:
        while chunk := fin.read(8 << 20):
            fout.write(chunk)


def pull(uri: str, local: Path) -> int:
    """Copy the files under `uri` missing locally or of another size. Returns how many."""
    fs, root = open_uri(uri)
    local_fs, n = pafs.LocalFileSystem(), 0
    for rel, size in _remote_files(fs, root).items():
        dest = local / rel
        if dest.is_file() and dest.stat().st_size == size:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        _copy(fs, f"{root.rstrip('/')}/{rel}", local_fs, str(dest))
        n += 1
    (local / SYNC_MARKER).touch()
    return n


def push(local: Path, uri: str) -> int:
    """Copy the local files that are new, changed in size or written since the last push. Returns how many."""
    fs, root = open_uri(uri)
    marker = local / SYNC_MARKER
    since = marker.stat().st_mtime if marker.is_file() else 0.0
    remote = _remote_files(fs, root)
    local_fs, n = pafs.LocalFileSystem(), 0
    marker.touch()  # before the scan: a file written during it goes again next time
    for f in sorted(p for p in local.rglob("*") if p.is_file() and p.name != SYNC_MARKER):
        rel = f.relative_to(local).as_posix()
        st = f.stat()
        if remote.get(rel) == st.st_size and st.st_mtime <= since:  # (timestamps tick in ms, not ns)
            continue
        dest = f"{root.rstrip('/')}/{rel}"
        fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        _copy(local_fs, str(f), fs, dest)
        n += 1
    return n
