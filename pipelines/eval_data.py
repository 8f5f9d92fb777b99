"""Evaluation image sets as Ray Datasets of (key, encoded image bytes).

A set is a folder of image files (searched recursively), parquet with an image-bytes column, or a
synthesis output's complete shards. Bytes travel undecoded: workers decode, and an unreadable file
becomes a skipped-and-counted row there instead of failing the job.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import ray

from layton.tables import Table
from pipelines.tokenizer_data import read_shard_images
from pipelines.tokenizer_data import shard_tars
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def image_set_kind(cfg) -> str:
    p = Path(cfg.path)
    if cfg.kind != "auto":
        return cfg.kind
    if p.is_file() and p.suffix == ".parquet":
        return "parquet"
    if p.is_dir() and any(p.glob("*_stats.json")):
        return "shards"
    if p.is_dir() and any(p.rglob("*.parquet")) and not any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.rglob("*")):
        return "parquet"
    return "folder"


def image_files(root: Path) -> list[Path]:
    return sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def check_image_set(cfg) -> str:
    """The set's kind; a missing or empty set fails here, before Ray starts, naming the path."""
    p = Path(cfg.path)
    if not p.exists():
        raise FileNotFoundError(f"data.path: {p} does not exist")
    kind = image_set_kind(cfg)
    if kind == "folder" and not image_files(p):
        raise FileNotFoundError(f"data.path: {p} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    if kind == "shards":
        shard_tars([str(p)])
    return kind


def _read_files(batch: dict) -> dict:
    data = []
    for path in batch["path"]:
        try:
            data.append(Path(path).read_bytes())
        except OSError:
            data.append(b"")  # decoded as "no image member" -> skipped and counted
    return {"key": batch["key"], "image": np.array(data, dtype=object)}


def read_image_set(cfg) -> ray.data.Dataset:
    kind = check_image_set(cfg)
    p = Path(cfg.path)
    if kind == "folder":
        files = image_files(p)[: cfg.limit]
        items = [{"key": str(f.relative_to(p).with_suffix("")), "path": str(f)} for f in files]
        return ray.data.from_items(items).map_batches(_read_files, batch_format="numpy")
    if kind == "parquet":
        ds = ray.data.read_parquet(str(p), columns=None)
        if cfg.image_column not in ds.columns():
            raise ValueError(f"data.image_column: {p} has no column {cfg.image_column!r} (columns: {ds.columns()})")
        key = "key" if "key" in ds.columns() else None

        def rename(batch: dict) -> dict:
            images = batch[cfg.image_column]
            # Without a key column, an image is named by its content (row numbers are per block).
            keys = batch[key] if key else np.array([hashlib.sha1(b or b"").hexdigest()[:16] for b in images], dtype=object)
            return {"key": keys, "image": images}

        ds = ds.map_batches(rename, batch_format="numpy")
    else:
        ds = read_shard_images([str(p)]).select_columns(["key", "image"])
    return ds.limit(cfg.limit) if cfg.limit else ds


def score_rows(items: list[dict], actor_cls, ctor_kwargs: dict, batch_size: int, res) -> list[dict]:
    """An actor pool of `actor_cls` (sized by `res`, a Resources) over `items`; the actor returns its
    rows as JSON strings in the column `row`."""
    import json

    ds = ray.data.from_items(items).map_batches(
        actor_cls, fn_constructor_kwargs=ctor_kwargs, batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=res.num_actors), num_gpus=res.num_gpus, num_cpus=res.num_cpus,
        batch_format="numpy")
    return [json.loads(r) for b in ds.iter_batches(batch_size=None, batch_format="numpy") for r in b["row"]]


def write_results(out: Path, rows: list[dict], body: dict, table: Table) -> None:
    """results.jsonl (a row per image, in the given order), results.json (`body` with the table as
    data) and results.md (the table as markdown)."""
    with open(out / "results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")
    (out / "results.json").write_text(json.dumps({**body, "table": table.to_dict()}, indent=1, default=str))
    (out / "results.md").write_text(table.to_markdown())
