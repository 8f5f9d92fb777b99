"""Where a run's files live: a local directory or an object store (`s3://`, `gs://`, ...), one API.

Every stage reads and writes its root through `Root` (pyarrow.fs): shards, precompute files, Ray
Train checkpoints, history lines, grids, generated images, results and the workflow state go
straight to the bucket as they are produced, so a run killed anywhere resumes on any machine from
the root alone, and no node needs a disk that another sees. Any filesystem pyarrow opens from a URI
(s3, gs, abfs, hdfs, file) is used directly; other schemes go through fsspec. Credentials and
endpoints come from the standard places (`AWS_ENDPOINT_URL`, `AWS_PROFILE`, instance roles, ...):
a config holds no secrets.

What must be a local directory to be used (a model directory that a stage exported to the root and
a later one loads) is pulled once into the node's cache with `local_copy`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pyarrow.fs as pafs

log = logging.getLogger(__name__)


def is_uri(root: str | Path) -> bool:
    return "://" in str(root)


def join(location: str | Path, *names: str) -> str:
    """`location/name/...` for a local path or a URI alike (pathlib would fold `s3://` to `s3:/`)."""
    out = str(location)
    for n in names:
        out = f"{out.rstrip('/')}/{n}" if is_uri(out) else str(Path(out) / n)
    return out


def parent(location: str | Path) -> str:
    s = str(location).rstrip("/")
    return s.rsplit("/", 1)[0] if is_uri(s) else str(Path(s).parent)


def basename(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def absolute(location: str | Path) -> str:
    """A URI as written; a local path made absolute (what fingerprints and records hold)."""
    return str(location) if is_uri(location) else str(Path(location).resolve())


PYARROW_SCHEMES = {"s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs", "file", "local", "mock"}


def within(path: str, base: str) -> bool:
    """Whether `path` is `base` or under it (both absolute paths or URIs, as `absolute` gives them)."""
    return path == base or path.startswith(base.rstrip("/") + "/")


def check_scheme(uri: str) -> None:
    """Fails naming the URI when no filesystem handles its scheme. Contacts nothing (validation must
    not wait on the network: pyarrow's `from_uri` asks S3 for the bucket's region)."""
    scheme = uri.split("://", 1)[0].lower()
    if scheme in PYARROW_SCHEMES:
        return
    try:
        import fsspec

        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as e:
        raise ValueError(f"{uri}: no pyarrow or fsspec filesystem handles {scheme}:// ({e})") from None


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
        raise ValueError(f"{uri}: no pyarrow or fsspec filesystem handles it ({e})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI: what Ray Data and Ray Train take."""
    root = Root(location)
    return root.fs, root.path


def local_copy(location: str | Path, what: str = "") -> Path:
    """A local directory holding `location`'s files: the path itself when local; for a URI, a copy in
    `$LAYTON_CACHE/remote` (default `~/.cache/layton/remote`) pulled once and refreshed where a
    file's size or modification time changed (a model directory re-exported in the bucket)."""
    if not is_uri(location):
        return Path(location)
    src = Root(location)
    files = src.list_info(recursive=True)
    if not files:
        raise FileNotFoundError(f"{what + ': ' if what else ''}{location}: no files there")
    base = Path(os.environ.get("LAYTON_CACHE", "~/.cache/layton")).expanduser() / "remote"
    dest = base / f"{hashlib.sha256(str(location).encode()).hexdigest()[:12]}-{basename(location)}"
    manifest = dest / ".layton_manifest.json"
    try:
        have = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        have = {}
    # A store that gives no modification time (0) cannot say a file is unchanged: it is pulled again.
    todo = {rel: meta for rel, meta in files.items()
            if have.get(rel) != meta or not meta[1] or not (dest / rel).is_file()}
    for rel in todo:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        with src.fs.open_input_stream(src.join(rel)) as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 8 << 20)
        os.replace(tmp, target)
    for rel in set(have) - set(files):  # gone from the bucket: gone from the copy
        (dest / rel).unlink(missing_ok=True)
    if todo or set(have) != set(files):
        log.warning("%s%s: %d file(s) pulled into the local cache %s", what + ": " if what else "", location,
                    len(todo), dest)
        _write_atomic(manifest, json.dumps(files).encode())
    return dest


@functools.lru_cache(maxsize=1024)
def _directory(location: str) -> "Root":
    # Opened once per directory and process: opening an S3 filesystem builds a client (and may ask
    # for the bucket's region), too much to do for every image an actor reads.
    return Root(location)


def read_location(location: str | Path) -> bytes | None:
    """A file's bytes by its location (a local path or a URI); None when it does not exist."""
    return _directory(absolute(parent(location))).read(basename(location))  # absolute: a cwd change is seen


def _write_atomic(final: Path, data: bytes) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


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

    def mkdir(self) -> None:
        try:
            self.fs.create_dir(self.path, recursive=True)
        except OSError as e:
            raise self._fail("create directory", "", e) from None

    def exists(self, name: str = "") -> bool:
        return self.fs.get_file_info(self.join(name) if name else self.path).type != pafs.FileType.NotFound

    def is_dir(self, name: str = "") -> bool:
        """A directory (locally), or a prefix with objects below it (on an object store)."""
        return self.fs.get_file_info(self.join(name) if name else self.path).type == pafs.FileType.Directory

    def write(self, name: str, data: bytes) -> None:
        try:
            if self.local:
                _write_atomic(Path(self.join(name)), data)
            else:
                with self.fs.open_output_stream(self.join(name)) as f:
                    f.write(data)
        except OSError as e:
            raise self._fail("write", name, e) from None

    def write_file(self, name: str, local: str | Path) -> None:
        """A local file's bytes at `name` (streamed: checkpoints and event files can be large)."""
        try:
            if self.local:
                final = Path(self.join(name))
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
                shutil.copyfile(local, tmp)
                os.replace(tmp, final)
            else:
                with open(local, "rb") as fin, self.fs.open_output_stream(self.join(name)) as fout:
                    shutil.copyfileobj(fin, fout, 8 << 20)
        except OSError as e:
            raise self._fail("write", name, e) from None

    def put_dir(self, local: str | Path, name: str, skip: tuple[str, ...] = (), last: tuple[str, ...] = ()) -> None:
        """A local directory tree at `name`, replacing what was there (files named in `skip` left
        out). Locally whole at once (a temp name, then a rename). On an object store file by file:
        what is replaced goes first and the files named in `last` (a completion record, a training
        state) come last, so a reader who finds those finds the whole directory."""
        local = Path(local)
        files = sorted(f for f in local.rglob("*") if f.is_file() and f.name not in skip)
        if self.local:
            dest = Path(self.join(name))
            tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(local, tmp, ignore=shutil.ignore_patterns(*skip))
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
            return
        target = self.sub(name)
        new = {f.relative_to(local).as_posix(): f for f in files}
        for rel in set(target.list(recursive=True)) - (set(new) - set(last)):
            target.delete(rel)
        for rel in sorted(new, key=lambda r: r in last):  # (a stable sort: `last` at the end)
            target.write_file(rel, new[rel])

    def delete_dir(self, name: str = "") -> None:
        try:
            self.fs.delete_dir(self.join(name) if name else self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            if self.exists(name):
                raise self._fail("delete", name, e) from None

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
        return {rel: size for rel, (size, _) in self.list_info(recursive).items()}

    def list_info(self, recursive: bool = False) -> dict[str, list[int]]:
        """Relative name -> [size, mtime in ns] of the files below."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True))
        except OSError as e:
            raise self._fail("list", "", e) from None
        return {i.path[len(self.path) + 1:]: [i.size, i.mtime_ns or 0] for i in infos if i.type == pafs.FileType.File}

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self.join(name))
        except FileNotFoundError:
            pass
