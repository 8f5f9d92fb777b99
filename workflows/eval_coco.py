"""`layton eval coco CONFIG`: COCO-5K preference scores as Ray Data jobs.

1. With `generator` set, LaytonGen draws one image per caption into `<images>/images/<id>.png` with
   `<images>/metadata.jsonl` (the `layton generate` job: a rerun skips captions already drawn).
2. Every caption's image (ours, or another model's folder matched by file stem) is scored by an
   actor pool holding the configured scorers: ImageReward, MPS, HPSv2 and FaceScore (on detected face
   crops; an image without a face has no FaceScore and is counted as such).
Outputs: `<output>/results.jsonl` (a row per caption: scores, or the reason it has none),
`results.json` (means, counts) and `results.md` (the paper's table). `images` and `output` may be
local paths or URIs: generated images and results are written there directly.
"""

from __future__ import annotations

from pathlib import Path

import io
import json
import time
from collections import Counter

import numpy as np

from layton.devices import pick_device, pick_dtype
from layton.geneval import load_image
from layton.model_files import check_file, check_model_dir
from layton.ray_cluster import ray_session
from layton.scorers.facescore import FaceScoreScorer
from layton.scorers.hpsv2 import HPSv2Scorer
from layton.scorers.imagereward import ImageRewardScorer
from layton.scorers.mps import MPSScorer
from layton.storage import Root, basename, read_location
from pipelines.coco import match_images, read_captions, result_table, summarize
from pipelines.eval_data import score_rows, write_results
from pipelines.generate import GenerateSettings, check_laytongen_dir, generate_prompts
from stages.eval_coco.config import CocoEvalConfig, PreferenceScorers


class ScorePreferences:
    """Ray Data actor: the configured preference scorers over (id, prompt, file) rows."""

    def __init__(self, scorers: dict, device: str = "auto"):
        cfg = PreferenceScorers.model_validate(scorers)
        device = pick_device(device)
        dtype = pick_dtype(cfg.dtype, device)
        self.scorers, self.facescore = {}, None
        if cfg.imagereward:
            ir = cfg.imagereward
            self.scorers["imagereward"] = ImageRewardScorer.from_release(ir.checkpoint, ir.med_config, ir.tokenizer,
                                                                         device=device, dtype=dtype).score
        if cfg.mps:
            self.scorers["mps"] = MPSScorer.from_release(cfg.mps.checkpoint, cfg.mps.processor, device=device, dtype=dtype).score
        if cfg.hpsv2:
            self.scorers["hpsv2"] = HPSv2Scorer(cfg.hpsv2.checkpoint, cfg.hpsv2.architecture, device=device, dtype=dtype).score
        if cfg.facescore:
            fs = cfg.facescore
            self.facescore = FaceScoreScorer(fs.checkpoint, fs.med_config, fs.tokenizer, device=device, dtype=dtype,
                                             detector=fs.detector)

    def __call__(self, batch: dict) -> dict:
        rows, images = [], []
        for pid, prompt, f in zip(batch["id"], batch["prompt"], batch["file"]):
            row = {"id": str(pid), "prompt": str(prompt), "file": str(f), "reason": ""}
            try:
                data = read_location(str(f))  # a local path or a URI
                if data is None:
                    raise FileNotFoundError(f)
                im = load_image(io.BytesIO(data))
                row["converted"] = im.mode != "RGB"  # grayscale, palette, RGBA, CMYK: scored as RGB
                images.append(im.convert("RGB"))
            except (OSError, ValueError) as e:  # an unreadable image is recorded with its reason
                row["reason"] = f"unreadable image: {type(e).__name__}"
            rows.append(row)
        scored = [r for r in rows if not r["reason"]]
        prompts = [r["prompt"] for r in scored]
        if scored:
            for name, score in self.scorers.items():
                for r, v in zip(scored, score(prompts, images)):
                    r[name] = float(v)
            if self.facescore is not None:
                for r, fs in zip(scored, self.facescore.score(prompts, images)):
                    r.update(facescore=fs["facescore"], faces=fs["faces"], face_reason=fs["reason"])
        return {"row": np.array([json.dumps(r) for r in rows], dtype=object)}


def check_scorer_files(sc: PreferenceScorers) -> None:
    """Every file of the configured scorers; errors name the field."""
    if sc.imagereward:
        check_file(sc.imagereward.checkpoint, "scorers.imagereward.checkpoint")
        check_file(sc.imagereward.med_config, "scorers.imagereward.med_config")
        check_model_dir(sc.imagereward.tokenizer, "scorers.imagereward.tokenizer", marker="tokenizer_config.json")
    if sc.mps:
        check_file(sc.mps.checkpoint, "scorers.mps.checkpoint")
        check_model_dir(sc.mps.processor, "scorers.mps.processor", marker="preprocessor_config.json")
    if sc.hpsv2:
        check_file(sc.hpsv2.checkpoint, "scorers.hpsv2.checkpoint")
        if sc.hpsv2.architecture.endswith(".json"):
            check_file(sc.hpsv2.architecture, "scorers.hpsv2.architecture")
    if sc.facescore:
        check_file(sc.facescore.checkpoint, "scorers.facescore.checkpoint")
        check_file(sc.facescore.med_config, "scorers.facescore.med_config")
        check_model_dir(sc.facescore.tokenizer, "scorers.facescore.tokenizer", marker="tokenizer_config.json")
        if sc.facescore.detector and not Path(sc.facescore.detector).is_file():  # (an old non-zip .pth too)
            raise FileNotFoundError(f"scorers.facescore.detector: {sc.facescore.detector} does not exist")


def check_coco_inputs(config: CocoEvalConfig) -> list[tuple[str, str]]:
    """Captions, scorer files and generator/images checked before Ray starts (errors name the field)."""
    pairs = read_captions(config.captions, config.limit)
    check_scorer_files(config.scorers)
    if config.generator is not None:
        check_laytongen_dir(config.generator)
    elif not Root(config.images).is_dir():
        raise FileNotFoundError(f"images: {config.images} does not exist (and no generator is set to write it)")
    return pairs


def run_coco_eval(config: CocoEvalConfig) -> dict:
    t0 = time.time()
    pairs = check_coco_inputs(config)
    res = config.resources
    device = "cuda" if res.num_gpus else "cpu"
    # An empty caption is bad input here (LaytonGen would sample it unconditionally): recorded, not run.
    rows = [{"id": i, "prompt": "", "file": "", "reason": "empty caption"} for i, t in pairs if not t.strip()]
    pairs = [(i, t) for i, t in pairs if t.strip()]
    with ray_session(config.ray):
        generated = None
        if config.generator:
            s = config.sampling
            settings = GenerateSettings(cfg_scale=s.cfg_scale, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                        size=s.image_size, decode_steps=s.decode_steps, seed=config.seed, dtype=s.dtype)
            generated = generate_prompts(config.generator, pairs, config.images, settings, num_actors=res.num_actors,
                                         num_gpus=res.num_gpus, num_cpus=res.num_cpus, batch_size=config.batch_size,
                                         accel=s.accel)
        files, missing = match_images(config.images, [i for i, _ in pairs])
        rows += [{"id": i, "prompt": t, "file": "", "reason": "no image"} for i, t in pairs if i in missing]
        items = [{"id": i, "prompt": t, "file": files[i]} for i, t in pairs if i in files]
        if not items:
            raise FileNotFoundError(f"images: {config.images} holds no image for any of the {len(pairs)} caption(s)")
        rows += score_rows(items, ScorePreferences, dict(scorers=config.scorers.model_dump(mode="json"), device=device),
                           config.batch_size, res)
    rows.sort(key=lambda r: r["id"])
    scored = [r for r in rows if not r["reason"]]
    metrics = config.scorers.names()
    summary = summarize(scored, metrics)
    name = basename(config.generator or config.images)
    body = {"task": "coco", "name": name, "summary": summary, "captions": len(rows), "images": len(scored),
            "skipped": dict(Counter(r["reason"] for r in rows if r["reason"])),
            "converted": sum(bool(r.get("converted")) for r in scored),
            "without_face": sum(r.get("faces") == 0 for r in scored) if "facescore" in metrics else None,
            "generated": generated, "config": config.model_dump(mode="json"), "seconds": time.time() - t0}
    write_results(config.output, rows, body, result_table(summary, name, len(scored)))
    return body
