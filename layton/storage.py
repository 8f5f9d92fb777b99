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


def _copy(src_fs, src: str, dst_fs, dst: str) -> None:
    with src_fs.open_input_stream(src) as fin, dst_fs.open_output_stream(dst) as fout:
        while chunk := fin.read(8 << 20):
            fout.write(chunk)


def pull(uri: str, local: Path) -> int:
    """Copy the files under `uri` missing locally or of another size. Returns how many."""
    fs, root = open_uri(uri)
    local_fs, n = pafs.LocalFileSystem(), 0
    for rel, size in Root(uri).list(recursive=True).items():
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
    remote = Root(uri).list(recursive=True)
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


class Root:
    """A directory on a local disk or an object store, through pyarrow.fs.

    Writes are atomic: a reader sees a file whole or not at all. Locally a file is written under a
    temp name unique to the writer and renamed (two writers of one shard never share a temp file);
    on an object store an object appears only when its upload completes, so it is written in place.
    Picklable by its location, so Ray tasks reopen it where they run.
    """

    def __init__(self, location: str | Path):
        self.location = str(location)
        if is_uri(self.location):
            self.fs, self.path = open_uri(self.location)
        else:
            self.fs, self.path = pafs.LocalFileSystem(), str(Path(self.location).resolve())
        self.path = self.path.rstrip("/") or "/"
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __reduce__(self):
        return Root, (self.location,)

    def __repr__(self) -> str:
        return f"Root({self.location!r})"

    def join(self, name: str) -> str:
        return f"{self.path}/{name}"

    def sub(self, name: str) -> "Root":
        return Root(f"{self.location.rstrip('/')}/{name}")

    def _fail(self, op: str, name: str, err: Exception):
        return OSError(f"{self.location.rstrip('/')}/{name}: {op} failed: {err}")

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def mkdir(self) -> None:
        try:
            self.fs.create_dir(self.path, recursive=True)
        except OSError as e:
            raise self._fail("create directory", "", e) from None

    def write(self, name: str, data: bytes) -> None:
        try:
            if self.local:
                final = Path(self.join(name))
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            else:
                with self.fs.open_output_stream(self.join(name)) as f:
                    f.write(data)
        except OSError as e:
            raise self._fail("write", name, e) from None

    def read(self, name: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            with self.fs.open_input_stream(self.join(name)) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            if self.fs.get_file_info(self.join(name)).type == pafs.FileType.NotFound:
                return None
            raise self._fail("read", name, e) from None

    def list(self, recursive: bool = False) -> dict[str, int]:
        """Relative name -> size of the files below ({} when the directory does not exist)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True))
        except OSError as e:
            raise self._fail("list", "", e) from None
        return {i.path[len(self.path) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self.join(name))
        except FileNotFoundError:
            pass
