"""`layton eval geneval CONFIG`: GenEval as Ray Data jobs — generation (optional) and scoring.

1. With `generator` set, every prompt of the metadata (or the first `limit`) gets `images_per_prompt`
   LaytonGen samples written in GenEval's layout (`<images>/<index:05d>/metadata.jsonl` +
   `samples/<k:04d>.png`); a prompt whose folder is complete is not generated again. Seeds derive
   from (seed, index, k), so a regenerated folder is identical.
2. Every sample folder under `images` (ours or another model's) is scored by an actor pool holding the
   Mask2Former detector and the CLIP colour classifier, with GenEval's rules (`layton.geneval`).
Outputs: `<output>/results.jsonl` (GenEval's per-image rows), `results.json` (per-task accuracies and
overall) and `results.md` (the paper's table). `images` and `output` may be local paths or URIs:
each sample folder and the results are written there as they are made.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time

import numpy as np
import ray

from layton.completion import RECORD, fingerprint, is_complete
from layton.config import SamplingConfig
from layton.detection import Mask2FormerDetector
from layton.devices import pick_device, pick_dtype
from layton.geneval import GenEvalPrompt, write_sample_dir
from layton.geneval import load_image, result_row
from layton.geneval import read_metadata
from layton.geneval import read_sample_dirs, result_table, summarize
from layton.laytongen import LaytonGenPipeline
from layton.model_files import check_model_dir
from layton.ray_cluster import ray_session
from layton.scorers.clip_colour import ClipColourClassifier
from layton.seeds import derive_seed
from layton.storage import Root, basename, parent, read_location
from pipelines.eval_data import score_rows, write_results
from pipelines.generate import check_laytongen_dir
from stages.eval_geneval.config import GenEvalRunConfig


def sample_seed(seed: int, index: int, k: int) -> int:
    return derive_seed("geneval", seed, index, k)


class GenerateSamples:
    """Ray Data actor: LaytonGen samples for GenEval prompts, written in GenEval's layout."""

    def __init__(self, generator: str, sampling: dict, images_dir: str, n: int, seed: int, fingerprint: str,
                 device: str = "auto"):
        s = SamplingConfig.model_validate(sampling)
        dev = pick_device(device)
        self.pipe = LaytonGenPipeline.from_pretrained(generator, device=dev, dtype=pick_dtype(s.dtype, dev), accel=s.accel)
        self.params = self.pipe.default_params(cfg_scale=s.cfg_scale, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
        self.size, self.steps = s.image_size, s.decode_steps
        self.images_dir, self.n, self.seed, self.fingerprint = images_dir, n, seed, fingerprint

    def __call__(self, batch: dict) -> dict:
        for line in batch["line"]:
            p = GenEvalPrompt(**json.loads(line))
            out = self.pipe([p.prompt] * self.n, seed=[sample_seed(self.seed, p.index, k) for k in range(self.n)],
                            params=self.params, size=self.size, steps=self.steps)
            write_sample_dir(self.images_dir, p, [g.image for g in out], self.fingerprint)
        return {"index": np.array([json.loads(line)["index"] for line in batch["line"]])}


class ScoreSamples:
    """Ray Data actor: detector + colour classifier + GenEval's rules over sample images."""

    def __init__(self, detector: str, clip: str, device: str = "auto"):
        device = pick_device(device)
        self.detector = Mask2FormerDetector(detector, device=device)
        self.colour = ClipColourClassifier(clip, device=device)

    def __call__(self, batch: dict) -> dict:
        rows, images, metas, files = [], [], [], []
        for f, meta in zip(batch["file"], batch["metadata"]):
            try:
                data = read_location(str(f))  # a local path or a URI
                if data is None:
                    raise FileNotFoundError(f)
                images.append(load_image(io.BytesIO(data)))
                metas.append(json.loads(meta))
                files.append(str(f))
            except OSError as e:  # an unreadable sample counts as incorrect, with its reason
                m = json.loads(meta)
                rows.append({"filename": str(f), "tag": m["tag"], "prompt": m.get("prompt", ""), "correct": False,
                             "reason": f"unreadable image: {type(e).__name__}", "metadata": json.dumps(m)})
        if images:
            for f, meta, img, dets in zip(files, metas, images, self.detector.detect(images)):
                rows.append(result_row(f, meta, dets, img, self.colour))
        return {"row": np.array([json.dumps(r, default=str) for r in rows], dtype=object)}


def check_geneval_models(config: GenEvalRunConfig):
    """Metadata, detector and CLIP (what no other stage writes); returns the prompts."""
    prompts = read_metadata(config.metadata)[: config.limit]
    check_model_dir(config.detector, "detector")
    check_model_dir(config.clip, "clip", marker="open_clip_config.json")
    return prompts


def check_geneval_inputs(config: GenEvalRunConfig):
    """Metadata, detector, CLIP and generator checked before Ray starts (errors name the field/line)."""
    prompts = check_geneval_models(config)
    if config.generator is not None:
        check_laytongen_dir(config.generator)
    if config.generator is None and not Root(config.images).is_dir():
        raise FileNotFoundError(f"images: {config.images} does not exist (and no generator is set to write it)")
    return prompts


def generation_fingerprint(config: GenEvalRunConfig) -> str:
    """What decides a prompt folder's images: a folder made with other settings is generated again."""
    return fingerprint({"generator": config.generator, "sampling": config.sampling, "seed": config.seed,
                        "images_per_prompt": config.images_per_prompt})


def _complete_prompts(images: str, prompts: list, fp: str) -> set[int]:
    """The indices whose sample folder holds a completion record for `fp` (one listing, then one
    read per record found)."""
    root = Root(images)
    records = {rel.split("/")[0] for rel in root.list(recursive=True) if rel.endswith(f"/{RECORD}")}
    return {p.index for p in prompts if f"{p.index:05d}" in records and is_complete(root.sub(f"{p.index:05d}"), fp)}


def run_geneval(config: GenEvalRunConfig) -> dict:
    t0 = time.time()
    prompts = check_geneval_inputs(config)
    res = config.resources
    device = "cuda" if res.num_gpus else "cpu"
    images = config.images  # a local path (absolute: PathStr) or a URI
    with ray_session(config.ray):
        generated = 0
        if config.generator:
            fp = generation_fingerprint(config)
            done = _complete_prompts(images, prompts, fp)
            todo = [p for p in prompts if p.index not in done]
            if todo:
                items = [{"line": json.dumps(dataclasses.asdict(p))} for p in todo]
                ds = ray.data.from_items(items).map_batches(
                    GenerateSamples, fn_constructor_kwargs=dict(
                        generator=config.generator, sampling=config.sampling.model_dump(mode="json"),
                        images_dir=images, n=config.images_per_prompt, seed=config.seed, fingerprint=fp,
                        device=device),
                    batch_size=1, compute=ray.data.ActorPoolStrategy(size=res.num_actors), num_gpus=res.num_gpus,
                    num_cpus=res.num_cpus, batch_format="numpy")
                generated = sum(len(b["index"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
        wanted = {p.index for p in prompts} if config.generator else None
        items = [{"file": f, "metadata": json.dumps(meta)} for meta, paths in read_sample_dirs(images)
                 for f in paths if wanted is None or int(basename(parent(parent(f)))) in wanted]
        if not items:
            raise FileNotFoundError(f"images: {images} holds no GenEval samples")
        rows = score_rows(items, ScoreSamples, dict(detector=config.detector, clip=config.clip, device=device),
                          config.batch_size, res)
    rows.sort(key=lambda r: r["filename"])
    summary = summarize(rows)
    name = basename(config.generator or images)
    body = {"task": "geneval", "summary": summary, "images": len(rows), "generated_prompts": generated,
            "config": config.model_dump(mode="json"), "seconds": time.time() - t0}
    write_results(config.output, rows, body, result_table(summary, name))
    return body
