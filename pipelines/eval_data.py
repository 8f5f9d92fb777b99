"""Evaluation image sets as Ray Datasets of (key, encoded image bytes).

A set is a folder of image files (searched recursively), parquet with an image-bytes column, or a
synthesis output's complete shards, on a local disk or under a URI (read through its filesystem,
`layton.storage`). Bytes travel undecoded: workers decode, and an unreadable file
becomes a skipped-and-counted row there instead of failing the job.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath

import numpy as np
import ray

from layton.storage import Root
from layton.tables import Table
from pipelines.shards import complete_shards, shard_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
SHARD_IMAGE_MEMBERS = ("jpg", "png", "webp")


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def image_names(root: Root, files: dict[str, int] | None = None) -> list[str]:
    """The image files below `root` (recursively), as sorted names relative to it."""
    return sorted(n for n in (root.list(recursive=True) if files is None else files) if _is_image(n))


def image_set_kind(cfg, files: dict[str, int] | None = None) -> str:
    """`cfg.kind`, or what `cfg.path` holds: a .parquet file, shards (`*_stats.json` records),
    parquet files and no images, else a folder of images. `files`: the path's recursive listing."""
    if cfg.kind != "auto":
        return cfg.kind
    root = Root(cfg.path)
    if cfg.path.endswith(".parquet") and root.exists() and not root.is_dir():
        return "parquet"
    files = root.list(recursive=True) if files is None else files
    if any("/" not in n and n.endswith("_stats.json") for n in files):
        return "shards"
    if any(n.endswith(".parquet") for n in files) and not any(_is_image(n) for n in files):
        return "parquet"
    return "folder"


def _shard_tars(root: Root) -> list[str]:
    """Paths (inside `root.fs`) of the tars of the complete shards with accepted samples."""
    done = complete_shards(root)
    if not done:
        raise FileNotFoundError(f"data.path: {root.location} holds no complete shard (run `layton synth` first)")
    tars = [root.join(f"{shard_name(s)}.tar") for s in sorted(done) if done[s].get("accepted", 1)]
    if not tars:
        raise FileNotFoundError(f"data.path: no accepted samples in {root.location}")
    return tars


def check_image_set(cfg) -> str:
    """The set's kind; a missing or empty set fails here, before Ray starts, naming the path."""
    root = Root(cfg.path)
    if not root.exists():
        raise FileNotFoundError(f"data.path: {cfg.path} does not exist")
    files = root.list(recursive=True) if root.is_dir() else {}
    kind = image_set_kind(cfg, files)
    if kind == "folder" and not image_names(root, files):
        raise FileNotFoundError(f"data.path: {cfg.path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    if kind == "shards":
        _shard_tars(root)
    return kind


def _read_files(batch: dict, location: str) -> dict:
    root = Root(location)
    data = []
    for name in batch["path"]:
        try:
            data.append(root.read(str(name)) or b"")  # gone: decoded as "no image member" -> skipped and counted
        except OSError:
            data.append(b"")
    return {"key": batch["key"], "image": np.array(data, dtype=object)}


def _shard_images(batch: dict) -> dict:
    # A member a sample lacks comes back as None or NaN, depending on the block.
    images = [next((batch[c][i] for c in SHARD_IMAGE_MEMBERS if c in batch and isinstance(batch[c][i], bytes)), b"")
              for i in range(len(batch["__key__"]))]
    return {"key": batch["__key__"], "image": np.array(images, dtype=object)}


def read_image_set(cfg) -> ray.data.Dataset:
    """(key, image bytes) of the set; every read goes through the path's filesystem (local or URI)."""
    kind = check_image_set(cfg)
    root = Root(cfg.path)
    if kind == "folder":
        names = image_names(root)[: cfg.limit]
        items = [{"key": str(PurePosixPath(n).with_suffix("")), "path": n} for n in names]
        return ray.data.from_items(items).map_batches(_read_files, fn_kwargs={"location": cfg.path}, batch_format="numpy")
    if kind == "parquet":
        ds = ray.data.read_parquet(root.path, filesystem=root.fs)
        if cfg.image_column not in ds.columns():
            raise ValueError(f"data.image_column: {cfg.path} has no column {cfg.image_column!r} (columns: {ds.columns()})")
        key = "key" if "key" in ds.columns() else None

        def rename(batch: dict) -> dict:
            images = batch[cfg.image_column]
            # Without a key column, an image is named by its content (row numbers are per block).
            keys = batch[key] if key else np.array([hashlib.sha1(b or b"").hexdigest()[:16] for b in images], dtype=object)
            return {"key": keys, "image": images}

        ds = ds.map_batches(rename, batch_format="numpy")
    else:
        ds = ray.data.read_webdataset(_shard_tars(root), filesystem=root.fs, decoder=None).map_batches(
            _shard_images, batch_format="numpy")
    return ds.limit(cfg.limit) if cfg.limit else ds


def score_rows(items: list[dict], actor_cls, ctor_kwargs: dict, batch_size: int, res) -> list[dict]:
    """An actor pool of `actor_cls` (sized by `res`, a Resources) over `items`; the actor returns its
    rows as JSON strings in the column `row`."""
    ds = ray.data.from_items(items).map_batches(
        actor_cls, fn_constructor_kwargs=ctor_kwargs, batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=res.num_actors), num_gpus=res.num_gpus, num_cpus=res.num_cpus,
        batch_format="numpy")
    return [json.loads(r) for b in ds.iter_batches(batch_size=None, batch_format="numpy") for r in b["row"]]


def write_results(out: str, rows: list[dict], body: dict, table: Table) -> None:
    """results.jsonl (a row per image, in the given order), results.json (`body` with the table as
    data) and results.md (the table as markdown), each written whole at `out` (a local path or a URI)."""
    root = Root(out)
    root.write("results.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in rows).encode())
    root.write("results.json", json.dumps({**body, "table": table.to_dict()}, indent=1, default=str).encode())
    root.write("results.md", table.to_markdown().encode())
