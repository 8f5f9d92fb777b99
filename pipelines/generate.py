"""Batch text -> image generation with LaytonGen as a Ray Data job.

A prompt file (`.txt`: one prompt per line; `.jsonl`: a "prompt" field per line, as GenEval's
metadata; `.parquet`: a text column) becomes `<out>/images/<id>.png` plus `<out>/metadata.jsonl`,
one line per prompt: id, prompt, seed, file, sampling settings, unconditional/truncated flags, or an
error. A prompt's id is its row number (zero-padded) and its seed derives from the id, so a rerun
skips prompts already in metadata.jsonl and regenerates nothing. The prompt file, the LaytonGen
directory and `<out>` may each be a local path or a URI: images and metadata go straight to the
store as they are made, and a killed run resumes from what is there.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow.parquet as pq
import ray

from layton.completion import fingerprint, is_complete, mark_complete
from layton.config import Acceleration, RayConfig
from layton.devices import pick_device, pick_dtype
from layton.laytongen import LaytonGenPipeline
from layton.laytongen import TOKENIZER_SUBFOLDER, read_laytongen_index
from layton.ray_cluster import ray_session
from layton.storage import Root, absolute, local_copy, read_location
from layton.tokenizer import read_tokenizer_index
from pipelines.prompts import prompt_seed

METADATA = "metadata.jsonl"


def read_prompt_file(path: str | Path, column: str = "prompt") -> list[tuple[str, str]]:
    """(id, prompt) per row of a local or URI prompt file; ids are zero-padded row numbers."""
    path = str(path)
    suffix = PurePosixPath(path).suffix
    if suffix not in (".txt", ".jsonl", ".parquet"):
        raise ValueError(f"{path}: prompt files are .txt, .jsonl or .parquet")
    data = read_location(path) if not Root(path).is_dir() else None
    if data is None:
        raise FileNotFoundError(f"prompt file not found: {path}")
    if suffix == ".txt":
        texts = data.decode().splitlines()
    elif suffix == ".jsonl":
        texts = []
        for n, line in enumerate(data.decode().splitlines(), 1):
            try:
                texts.append(str(json.loads(line)[column]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with a {column!r} field ({e})") from None
    else:
        table = pq.read_table(io.BytesIO(data))
        if column not in table.column_names:
            raise ValueError(f"{path}: no column {column!r} (columns: {table.column_names})")
        texts = ["" if t is None else str(t) for t in table.column(column).to_pylist()]
    return [(f"{i:05d}", t) for i, t in enumerate(texts)]


@dataclass(frozen=True)
class GenerateSettings:
    cfg_scale: float | None = None  # None: the LaytonGen directory's default
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    size: int = 1024
    decode_steps: int | None = None
    seed: int = 0
    dtype: str = "float32"  # the GPT's and the decoder's weights on CUDA (CPU runs float32)


class LaytonGenWriter:
    """Ray Data actor: a LaytonGen pipeline writing one PNG per prompt to `<out_dir>/images/`."""

    def __init__(self, laytongen_dir: str, settings: dict, out_dir: str, device: str = "auto", accel: dict | None = None):
        self.s = GenerateSettings(**settings)
        dev = pick_device(device)
        self.pipe = LaytonGenPipeline.from_pretrained(laytongen_dir, device=dev, dtype=pick_dtype(self.s.dtype, dev),
                                                      accel=Acceleration.model_validate(accel or {}))
        self.params = self.pipe.default_params(cfg_scale=self.s.cfg_scale, temperature=self.s.temperature,
                                               top_k=self.s.top_k, top_p=self.s.top_p)
        self.out = Root(out_dir)

    def __call__(self, batch: dict) -> dict:
        ids, prompts, seeds = list(batch["id"]), [str(p) for p in batch["prompt"]], [int(s) for s in batch["seed"]]
        rows = []
        try:
            results = self.pipe(prompts, seed=seeds, params=self.params, size=self.s.size, steps=self.s.decode_steps)
        except Exception as e:  # a failed batch is recorded and the job goes on; its prompts can be rerun
            results = [None] * len(ids)
            error = f"{type(e).__name__}: {e}"[:500]
        for pid, prompt, seed, r in zip(ids, prompts, seeds, results):
            row = {"id": pid, "prompt": prompt, "seed": seed, **{k: v for k, v in asdict(self.params).items()}}
            if r is None:
                rows.append({**row, "file": "", "error": error, "unconditional": False, "truncated": False, "text_tokens": 0})
                continue
            buf = io.BytesIO()
            r.image.save(buf, format="PNG")
            self.out.write(f"images/{pid}.png", buf.getvalue())  # whole or absent: a file under its name is complete
            rows.append({**row, "file": f"images/{pid}.png", "error": "", "unconditional": r.unconditional,
                         "truncated": r.truncated, "text_tokens": r.text_tokens})
        return {"record": np.array([json.dumps(r) for r in rows], dtype=object)}


def _metadata_lines(out: Root) -> list[str]:
    data = out.read(METADATA)
    return data.decode(errors="replace").splitlines() if data else []


def done_ids(out_dir: str | Root) -> set[str]:
    """The ids that `<out_dir>/metadata.jsonl` records as generated."""
    ids = set()
    for line in _metadata_lines(out_dir if isinstance(out_dir, Root) else Root(out_dir)):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: that prompt runs again
            continue
        if not r.get("error"):
            ids.add(r["id"])
    return ids


class MetadataLog:
    """`metadata.jsonl`, the progress of a run, as records arrive. A local file is appended to (a
    line cut by a kill is skipped by readers); an object store cannot append, so the object is
    rewritten whole, with every line so far, after each batch (`flush`): a kill loses at most the
    batch in flight, whose prompts then run again with the same seeds."""

    def __init__(self, out: Root):
        self.out, self.file, self.lines = out, None, []
        if out.local:
            path = Path(out.join(METADATA))
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a")
        else:
            self.lines = _metadata_lines(out)

    def add(self, line: str) -> None:
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()
        else:
            self.lines.append(line)

    def flush(self) -> None:
        if self.file is None:
            self.out.write(METADATA, "".join(f"{line}\n" for line in self.lines).encode())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def check_laytongen_dir(laytongen_dir: str, what: str = "generator") -> None:
    """A LaytonGen directory's index and its parts, before any Ray work (a `ModelFileError` naming
    `what`). A URI is checked on its local copy (pulled once, the copy the actors then load)."""
    read_laytongen_index(laytongen_dir, what)
    read_tokenizer_index(local_copy(laytongen_dir, what) / TOKENIZER_SUBFOLDER, f"{what} (tokenizer/)")


def generate_from_file(laytongen_dir: str, prompt_file: str, out_dir: str, settings: GenerateSettings = GenerateSettings(),
                       *, column: str = "prompt", **kwargs) -> dict:
    """Generate every prompt of `prompt_file` not yet in `out_dir/metadata.jsonl`. Returns counts."""
    return generate_prompts(laytongen_dir, read_prompt_file(prompt_file, column), out_dir, settings, **kwargs)


def generate_prompts(laytongen_dir: str, prompts: list[tuple[str, str]], out_dir: str,
                     settings: GenerateSettings = GenerateSettings(), *, num_actors: int = 1, num_gpus: float = 0.0,
                     num_cpus: float = 1.0, batch_size: int = 4, ray_cfg=None, on_record=None,
                     accel: Acceleration | None = None) -> dict:
    """Generate every (id, prompt) not yet in `out_dir/metadata.jsonl`. Returns counts.

    `metadata.jsonl` is the progress of a run (a killed run resumes after its last line); the
    completion record, written when every prompt has an image, makes a rerun of the same prompts
    and settings a no-op without reading it. `accel` (speed only: not in the fingerprint) goes to every actor."""
    t0 = time.time()
    check_laytongen_dir(laytongen_dir, "laytongen")
    out = Root(out_dir)
    fp = fingerprint({"laytongen": absolute(laytongen_dir), "settings": asdict(settings), "prompts": prompts})
    if is_complete(out, fp):
        return {"prompts": len(prompts), "already_done": len(prompts), "generated": 0, "failed": 0,
                "seconds": time.time() - t0}
    skip = done_ids(out)
    todo = [(pid, text) for pid, text in prompts if pid not in skip]
    counts = {"prompts": len(prompts), "already_done": len(prompts) - len(todo), "generated": 0, "failed": 0}
    if todo:
        with ray_session(ray_cfg or RayConfig(dashboard=False)):
            ds = ray.data.from_items([{"id": pid, "prompt": text, "seed": prompt_seed(pid, settings.seed)} for pid, text in todo])
            ds = ds.map_batches(LaytonGenWriter, fn_constructor_kwargs=dict(
                laytongen_dir=absolute(laytongen_dir), settings=asdict(settings), out_dir=absolute(out_dir),
                device="cuda" if num_gpus else "cpu", accel=(accel or Acceleration()).model_dump(mode="json")),
                batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=num_actors),
                num_gpus=num_gpus, num_cpus=num_cpus, batch_format="numpy")
            log = MetadataLog(out)
            try:
                for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                    for rec in batch["record"]:
                        log.add(rec)
                        r = json.loads(rec)
                        counts["failed" if r["error"] else "generated"] += 1
                        if on_record:
                            on_record(r)
                    log.flush()
            finally:
                log.close()
    if counts["failed"] == 0:
        mark_complete(out, fp, **counts)
    return {**counts, "seconds": time.time() - t0}
