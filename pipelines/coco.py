"""COCO-5K preference scores: captions in, images matched to them, per-metric means out.

The paper's COCO-5K column set is generated from the 5,000 images of COCO-2017 val: one caption per
image, the first of its annotations (lowest annotation id), so the set is fixed by the file alone.
An image set made elsewhere is matched to captions by file stem: `<id>.png`, or a number equal to
the image id (`397133.jpg` and `000000397133.jpg` both match image 397133).
"""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath

from layton.storage import Root, join, read_location
from layton.tables import Table, cell
from pipelines.eval_data import image_names
from pipelines.generate import METADATA, read_prompt_file

METRICS = {"imagereward": "ImageReward", "mps": "MPS", "hpsv2": "HPSv2", "facescore": "FaceScore"}


def read_coco_captions(path: str | Path) -> list[tuple[str, str]]:
    """(id, caption) per image of a COCO captions file (local or URI), by image id; id = the 12-digit file stem."""
    p = str(path)
    try:
        blob = read_location(p)
        if blob is None:
            raise FileNotFoundError("no such file")
        data = json.loads(blob)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"captions: {p} is not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"captions: {p} is not a COCO captions file (no 'annotations' list)")
    first: dict[int, tuple[int, str]] = {}
    for n, a in enumerate(data["annotations"]):
        try:
            image_id, ann_id, caption = int(a["image_id"]), int(a["id"]), str(a["caption"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"captions: {p}: annotations[{n}] lacks image_id/id/caption ({e})") from None
        if image_id not in first or ann_id < first[image_id][0]:
            first[image_id] = (ann_id, caption)
    return [(f"{i:012d}", " ".join(first[i][1].split())) for i in sorted(first)]


def read_captions(path: str | Path, limit: int | None = None) -> list[tuple[str, str]]:
    """A COCO captions .json, or any prompt file `layton generate` reads (.txt/.jsonl/.parquet)."""
    p = str(path)
    root = Root(p)
    if not root.exists() or root.is_dir():
        raise FileNotFoundError(f"captions: {p} does not exist")
    pairs = read_coco_captions(p) if p.endswith(".json") else read_prompt_file(p)
    if not pairs:
        raise ValueError(f"captions: {p} holds no captions")
    return pairs[:limit]


def _stem_key(stem: str) -> str:
    return str(int(stem)) if stem.isdigit() else stem


def match_images(images_dir: str | Path, ids: list[str]) -> tuple[dict[str, str], list[str]]:
    """{id: image file} for the ids found under `images_dir` (recursively; a local path or a URI),
    and the ids not found; a file is named as `images_dir` is (`join(images_dir, name)`).

    A `metadata.jsonl` written by `layton generate` names each id's file (failed rows have none);
    otherwise files are matched by stem. One listing of the folder serves either way."""
    root = Root(images_dir)
    files = root.list(recursive=True)
    found: dict[str, str] = {}
    if METADATA in files:
        for line in (root.read(METADATA) or b"").decode(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if r.get("file") and r["file"] in files:
                found[r["id"]] = r["file"]
    else:
        by_stem = {_stem_key(PurePosixPath(f).stem): f for f in image_names(root, files)}
        found = {i: by_stem[_stem_key(i)] for i in ids if _stem_key(i) in by_stem}
    return {i: join(images_dir, found[i]) for i in ids if i in found}, [i for i in ids if i not in found]


def summarize(rows: list[dict], metrics: list[str]) -> dict:
    """Mean of each metric over the images that have it. `math.fsum` is exactly rounded, so the
    means do not depend on row order (1 worker or N)."""
    out = {}
    for m in metrics:
        values = [r[m] for r in rows if r.get(m) is not None]
        out[m] = {"mean": math.fsum(values) / len(values) if values else None, "n": len(values)}
    return out


def result_table(summary: dict, name: str, images: int) -> Table:
    """The paper's COCO-5K layout: one row per model, a column per metric (higher is better)."""
    cols = [m for m in METRICS if m in summary]
    notes = [f"{METRICS[m]} over {summary[m]['n']} image(s)" for m in cols if summary[m]["n"] != images]
    return Table(["Method", *(f"{METRICS[m]} ↑" for m in cols), "images"],
                 [[name, *(cell(summary[m]["mean"], 4) for m in cols), str(images)]],
                 title=f"COCO ({images} images)", notes=[f"{'; '.join(notes)}."] if notes else [])
