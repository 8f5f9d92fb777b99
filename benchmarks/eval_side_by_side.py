"""The three evaluation stages of a workflow one after another vs side by side (`side_by_side`).

The same workflow twice on a local Ray of `--cpus` logical CPUs, alternating the modes each round:
reconstruction metrics (SDXL-VAE and LlamaGen VQ-16 of the tiny zoo on scikit-image photos),
GenEval scoring and COCO preference scoring (HPSv2 + ImageReward) of folders made here (no
generation, so no trained LaytonGen is needed). Each run writes to a fresh root; the figure is the
evaluation part's wall time (the first stage's start to the last stage's end, from
workflow_state.json), so Ray's start-up is not in it.

    .venv/bin/python benchmarks/eval_side_by_side.py [--cpus 6] [--rounds 1] [--images 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import tiny_zoo  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry")


def photos(n: int, size: int) -> list[Image.Image]:
    from skimage import data

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        a = getattr(data, PHOTOS[i % len(PHOTOS)])()
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        h, w = a.shape[:2]
        s = int(min(h, w) * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        out.append(Image.fromarray(a[y:y + s, x:x + s]).resize((size, size), Image.BICUBIC))
    return out


def inputs(tmp: Path, n: int) -> dict[str, str]:
    """A photo folder (reconstruction, COCO by file stem) and a GenEval folder of the demo prompts."""
    from layton.geneval import read_metadata, write_sample_dir

    imgs = photos(n, 128)
    folder = tmp / "photos"
    folder.mkdir()
    captions = json.loads((ROOT / "workflows/data/coco_captions_demo.json").read_text())
    ids = sorted({a["image_id"] for a in captions["annotations"]})
    for i, im in zip(ids, imgs):
        im.save(folder / f"{i}.png")
    geneval = tmp / "geneval"
    for p, im in zip(read_metadata(ROOT / "workflows/data/geneval_demo.jsonl"), imgs):
        write_sample_dir(geneval, p, [im, im.transpose(Image.FLIP_LEFT_RIGHT)], "f" * 16)
    return {"photos": str(folder), "geneval": str(geneval)}


def workflow(zoo: Path, data: dict, root: Path, cpus: int, side_by_side: bool) -> str:
    demo = yaml.safe_load((ROOT / "workflows/demo.yaml").read_text())
    st = json.loads(json.dumps({k: demo["stages"][k] for k in ("eval_recon", "eval_geneval", "eval_coco")})
                    .replace("runs/demo/zoo", str(zoo)))
    st["eval_recon"].update(data={"path": data["photos"]}, size=128, models=[
        {"name": "SDXL-VAE", "kind": "sdxl_vae", "path": f"{zoo}/sdxl"},
        {"name": "LlamaGen VQ-16", "kind": "llamagen_vq", "path": f"{zoo}/llamagen_vq/vq_ds16_t2i.pt"}])
    st["eval_geneval"].update(images=data["geneval"])
    coco = st["eval_coco"]
    coco.update(images=data["photos"], scorers={k: coco["scorers"][k] for k in ("hpsv2", "imagereward")})
    return yaml.safe_dump({"name": "bench", "root": str(root), "side_by_side": side_by_side,
                           "ray": {"num_cpus": cpus, "dashboard": False}, "stages": st})


def run(text: str) -> dict:
    from app.runner import run_workflow
    from app.workflow import parse_workflow

    stages = run_workflow(parse_workflow(text, "bench.yaml"), on_event=lambda line: None)["stages"]
    assert all(s["status"] == "complete" and not s.get("skipped") for s in stages.values()), stages
    start, end = min(s["started"] for s in stages.values()), max(s["finished"] for s in stages.values())
    return end - start, {k: (s["started"] - start, s["seconds"]) for k, s in stages.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", type=Path)
    ap.add_argument("--cpus", type=int, default=6, help="logical CPUs of the local Ray (6: all three side by side)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--images", type=int, default=6, help="photos (at most the demo's 6 COCO captions are scored)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        zoo = tiny_zoo(args.zoo, tmp)
        data = inputs(tmp, args.images)
        walls = {True: [], False: []}
        for r in range(args.rounds):
            for mode in ((False, True) if r % 2 == 0 else (True, False)):
                wall, stages = run(workflow(zoo, data, tmp / f"run-{r}-{mode}", args.cpus, mode))
                walls[mode].append(wall)
                times = ", ".join(f"{k} at +{s:.1f}s for {d:.1f}s" for k, (s, d) in stages.items())
                print(f"round {r + 1}, {'side by side' if mode else 'one after another'}: {wall:.1f}s ({times})",
                      flush=True)
        seq, par = statistics.median(walls[False]), statistics.median(walls[True])
        print(f"evaluation part, median of {args.rounds}: one after another {seq:.1f}s, side by side {par:.1f}s, "
              f"ratio {seq / par:.2f}x ({args.cpus} logical CPUs on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
