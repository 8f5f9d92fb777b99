"""Evaluation throughput: COCO preference scoring as a Ray Data job vs a plain single-process loop.

Both run the same four scorers of the tiny zoo (ImageReward, MPS, HPSv2, FaceScore: real
architectures) over the same images and batches. The job is `layton eval coco` on a folder of
images (no generation), run in a subprocess over 1x and 4x the images; its whole process tree's
peak RSS is sampled: rows stream through the actors, so memory must not grow with the image count.

    .venv/bin/python benchmarks/eval_throughput.py [--images 48] [--size 256] [--actors 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import print_scaling, run_layton, steady_rate, tiny_zoo  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry")


def make_set(root: Path, n: int, size: int) -> Path:
    """n images (scikit-image photos, each a different crop) and their captions as a prompt file."""
    from skimage import data

    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "captions.jsonl", "w") as f:
        for i in range(n):
            name = PHOTOS[i % len(PHOTOS)]
            im = Image.fromarray(getattr(data, name)()).convert("RGB")
            x, y = rng.integers(0, im.width // 4), rng.integers(0, im.height // 4)
            im.crop((x, y, x + im.width * 3 // 4, y + im.height * 3 // 4)).resize((size, size)).save(images / f"{i:05d}.png")
            f.write(json.dumps({"prompt": f"a photo of {name}, variant {i}"}) + "\n")
    return root


def config(zoo: Path, root: Path, args) -> dict:
    z = str(zoo)
    return {
        "captions": str(root / "captions.jsonl"), "images": str(root / "images"), "batch_size": args.batch,
        "scorers": {
            "imagereward": {"checkpoint": f"{z}/imagereward/ImageReward.pt", "med_config": f"{z}/imagereward/med_config.json",
                            "tokenizer": f"{z}/imagereward/tokenizer"},
            "mps": {"checkpoint": f"{z}/mps/MPS_overall_checkpoint.pth", "processor": f"{z}/mps/processor"},
            "hpsv2": {"checkpoint": f"{z}/hpsv2/HPS_v2_compressed.pt", "architecture": f"{z}/hpsv2/open_clip_config.json"},
            "facescore": {"checkpoint": f"{z}/facescore/FS_model.pt", "med_config": f"{z}/facescore/med_config.json",
                          "tokenizer": f"{z}/facescore/tokenizer"}},
        "resources": {"num_actors": args.actors, "num_cpus": psutil.cpu_count() / args.actors},
        "output": str(root / "out"), "ray": {"dashboard": False, "num_cpus": psutil.cpu_count()},
    }


def plain_loop(cfg_dict: dict, threads: int) -> tuple[int, float]:
    """The same actor class as a plain object in this process, batch after batch; model load excluded."""
    import torch

    from pipelines.coco import match_images, read_captions
    from stages.eval_coco.config import CocoEvalConfig
    from workflows.eval_coco import ScorePreferences

    torch.set_num_threads(threads)
    cfg = CocoEvalConfig.model_validate(cfg_dict)
    pairs = read_captions(cfg.captions)
    files, _ = match_images(cfg.images, [i for i, _ in pairs])
    scorer = ScorePreferences(cfg.scorers.model_dump(mode="json"), device="cpu")
    t0 = time.perf_counter()
    n = 0
    for start in range(0, len(pairs), cfg.batch_size):
        chunk = pairs[start : start + cfg.batch_size]
        out = scorer({"id": [i for i, _ in chunk], "prompt": [t for _, t in chunk], "file": [str(files[i]) for i, _ in chunk]})
        n += len(out["row"])
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--zoo", type=Path, help="an existing tiny zoo (default: write one)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        zoo = tiny_zoo(args.zoo, tmp)
        results = {}
        for mult in (1, 4):
            root = make_set(tmp / f"x{mult}", args.images * mult, args.size)
            cfg_path = tmp / f"coco{mult}.yaml"
            cfg_path.write_text(yaml.safe_dump(config(zoo, root, args)))
            results[mult] = run_layton("eval", "coco", str(cfg_path))
            scored = json.loads((root / "out/results.json").read_text())["images"]
            assert scored == args.images * mult, f"{scored} of {args.images * mult} images scored"
        plain = {t: plain_loop(config(zoo, tmp / "x1", args), t) for t in sorted({psutil.cpu_count(), 1})}

    ray_ips = steady_rate(results, args.images)
    print(f"setup: {args.images} images at {args.size}px, batch {args.batch}, {args.actors} scoring actors x "
          f"{psutil.cpu_count() / args.actors:g} CPUs, {psutil.cpu_count()} CPUs; tiny zoo ImageReward+MPS+HPSv2+FaceScore")
    for threads, (n, seconds) in plain.items():
        print(f"plain loop, 1 process, {threads} torch thread(s)  : {n / seconds:7.3f} images/s (model load excluded)")
    best = max(n / seconds for n, seconds in plain.values())
    print(f"Ray Data job, (4x - 1x) images / time      : {ray_ips:7.3f} images/s")
    print(f"ratio Ray / best plain loop                : {ray_ips / best:7.3f}")
    print_scaling(results, args.images, "images")


if __name__ == "__main__":
    main()
