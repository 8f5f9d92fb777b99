"""COCO-5K preference scores: caption reading, image matching, means, and the Ray Data job."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layton.config import ConfigError, load_config
from layton.model_files import ModelFileError
from pipelines.coco import match_images, result_table, read_captions, read_coco_captions, summarize
from stages.eval_coco.config import CocoEvalConfig
from tests.tokenizer.conftest import photo

ROOT = Path(__file__).resolve().parents[2]


def _coco_file(path: Path, annotations: list[dict]) -> Path:
    images = sorted({a["image_id"] for a in annotations if "image_id" in a})
    path.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in images],
                                "annotations": annotations}))
    return path


def test_first_caption_of_each_image_by_annotation_id(tmp_path):
    anns = [{"image_id": 724, "id": 9, "caption": "later caption"},
            {"image_id": 139, "id": 5, "caption": "  a  woman in\na dining room "},
            {"image_id": 724, "id": 3, "caption": "a stop sign upside down"},
            {"image_id": 139, "id": 7, "caption": "another"}]
    pairs = read_coco_captions(_coco_file(tmp_path / "c.json", anns))
    assert pairs == [("000000000139", "a woman in a dining room"), ("000000000724", "a stop sign upside down")]
    random.Random(0).shuffle(anns)  # file order does not matter
    assert read_coco_captions(_coco_file(tmp_path / "d.json", anns)) == pairs
    assert read_captions(tmp_path / "c.json", limit=1) == pairs[:1]
    bundled = read_captions(ROOT / "workflows/data/coco_captions_demo.json")
    assert len(bundled) == 6 and bundled[0] == ("000000000139", "A room with chairs, a table, and a woman in it.")


def test_bad_caption_files_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"annotations\[1\] lacks image_id/id/caption"):
        read_coco_captions(_coco_file(tmp_path / "a.json", [{"image_id": 1, "id": 1, "caption": "x"}, {"id": 2}]))
    (tmp_path / "b.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="b.json is not a COCO captions file"):
        read_captions(tmp_path / "b.json")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ValueError, match="c.json is not a readable JSON file"):
        read_captions(tmp_path / "c.json")
    with pytest.raises(FileNotFoundError, match="captions: .*missing.json does not exist"):
        read_captions(tmp_path / "missing.json")
    (tmp_path / "p.txt").write_text("a cat\na dog\n")  # any `layton generate` prompt file works too
    assert read_captions(tmp_path / "p.txt") == [("00000", "a cat"), ("00001", "a dog")]


def test_images_match_captions_by_stem_or_metadata(tmp_path):
    d = tmp_path / "other_model"
    (d / "sub").mkdir(parents=True)
    for name in ("397133.jpg", "sub/000000000139.png", "unrelated.png"):
        Image.new("RGB", (8, 8)).save(d / name)
    files, missing = match_images(d, ["000000397133", "000000000139", "000000000285"])
    assert files == {"000000397133": str(d / "397133.jpg"), "000000000139": str(d / "sub/000000000139.png")}
    assert missing == ["000000000285"]
    # `layton generate` output: metadata.jsonl names the files; failed rows and cut lines have none.
    g = tmp_path / "ours"
    (g / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(g / "images/a.png")
    (g / "metadata.jsonl").write_text(json.dumps({"id": "a", "file": "images/a.png", "error": ""}) + "\n"
                                      + json.dumps({"id": "b", "file": "", "error": "RuntimeError: x"}) + "\n{\"id\": \"c\", ")
    assert match_images(g, ["a", "b", "c"]) == ({"a": str(g / "images/a.png")}, ["b", "c"])


def test_means_do_not_depend_on_row_order():
    rng = np.random.default_rng(0)
    rows = [{"imagereward": float(v), "facescore": None if i % 3 else float(v) * 1e8} for i, v in enumerate(rng.normal(size=999))]
    s = summarize(rows, ["imagereward", "facescore"])
    assert s["imagereward"]["n"] == 999 and s["facescore"]["n"] == 333
    for seed in range(5):
        random.Random(seed).shuffle(rows)
        assert summarize(rows, ["imagereward", "facescore"]) == s
    assert summarize([{"facescore": None}], ["facescore"]) == {"facescore": {"mean": None, "n": 0}}
    table = result_table({"imagereward": {"mean": 0.5, "n": 4}, "facescore": {"mean": None, "n": 0}}, "m", 4).to_markdown()
    assert table.splitlines()[2:5] == ["| Method | ImageReward ↑ | FaceScore ↑ | images |", "|---|---|---|---|",
                                       "| m | 0.5000 | – | 4 |"]
    assert "FaceScore over 0 image(s)." in table


def _scorers(zoo: Path) -> dict:
    return {"imagereward": {"checkpoint": str(zoo / "imagereward/ImageReward.pt"),
                            "med_config": str(zoo / "imagereward/med_config.json"),
                            "tokenizer": str(zoo / "imagereward/tokenizer")},
            "mps": {"checkpoint": str(zoo / "mps/MPS_overall_checkpoint.pth"), "processor": str(zoo / "mps/processor")},
            "hpsv2": {"checkpoint": str(zoo / "hpsv2/HPS_v2_compressed.pt"),
                      "architecture": str(zoo / "hpsv2/open_clip_config.json")},
            "facescore": {"checkpoint": str(zoo / "facescore/FS_model.pt"),
                          "med_config": str(zoo / "facescore/med_config.json"),
                          "tokenizer": str(zoo / "facescore/tokenizer")}}


def test_scoring_a_folder_made_elsewhere(tiny_zoo, ray_local, tmp_path):
    """Two actors score a foreign folder; every score equals the scorers called in this process, and
    bad input (no image, unreadable, empty caption) is recorded while grayscale/odd sizes are converted."""
    from layton.scorers.facescore import FaceScoreScorer
    from layton.scorers.hpsv2 import HPSv2Scorer
    from layton.scorers.imagereward import ImageRewardScorer
    from layton.scorers.mps import MPSScorer
    from workflows.eval_coco import run_coco_eval

    caps = {1: "an astronaut in a white suit", 2: "a cup of coffee", 3: "a cat", 4: "a rocket", 5: "missing",
            6: "corrupt", 7: "   "}
    anns = [{"image_id": i, "id": 100 + i, "caption": c} for i, c in caps.items()]
    folder = tmp_path / "other_model"
    folder.mkdir()
    Image.fromarray(photo("astronaut")).save(folder / "000000000001.png")  # a face
    Image.fromarray(photo("coffee")).save(folder / "2.jpg")
    Image.fromarray(photo("camera")).save(folder / "3.png")  # grayscale
    Image.fromarray(photo("rocket")).resize((37, 101)).convert("RGBA").save(folder / "4.png")  # odd size, RGBA
    (folder / "6.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cfg = CocoEvalConfig.model_validate({
        "captions": str(_coco_file(tmp_path / "captions.json", anns)), "images": str(folder), "scorers": _scorers(tiny_zoo),
        "batch_size": 2, "resources": {"num_actors": 2}, "output": str(tmp_path / "out"), "ray": {"dashboard": False}})
    body = run_coco_eval(cfg)

    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "out/results.jsonl").read_text().splitlines())}
    assert body["captions"] == 7 and body["images"] == 4 and body["converted"] == 2
    assert body["skipped"] == {"no image": 1, "unreadable image: UnidentifiedImageError": 1, "empty caption": 1}
    assert rows["000000000005"]["reason"] == "no image" and rows["000000000007"]["reason"] == "empty caption"
    assert rows["000000000001"]["faces"] >= 1 and rows["000000000002"]["faces"] == 0
    assert body["without_face"] == sum(rows[f"{i:012d}"]["faces"] == 0 for i in (1, 2, 3, 4))

    # The reference: the same scorers, in this process, one image at a time.
    sc = cfg.scorers
    ids = [f"{i:012d}" for i in (1, 2, 3, 4)]
    images = [Image.open(rows[i]["file"]).convert("RGB") for i in ids]
    refs = {
        "imagereward": ImageRewardScorer.from_release(sc.imagereward.checkpoint, sc.imagereward.med_config, sc.imagereward.tokenizer),
        "mps": MPSScorer.from_release(sc.mps.checkpoint, sc.mps.processor),
        "hpsv2": HPSv2Scorer(sc.hpsv2.checkpoint, sc.hpsv2.architecture),
    }
    for name, scorer in refs.items():
        for i, im in zip(ids, images):
            (ref,) = scorer.score([caps[int(i)]], [im])
            assert rows[i][name] == pytest.approx(float(ref), rel=1e-5, abs=1e-6), (name, i)
        mean = np.mean([rows[i][name] for i in ids])
        assert body["summary"][name] == {"mean": pytest.approx(mean, rel=1e-12), "n": 4}
    fs = FaceScoreScorer(sc.facescore.checkpoint, sc.facescore.med_config, sc.facescore.tokenizer).score([caps[1]], images[:1])[0]
    assert rows["000000000001"]["facescore"] == pytest.approx(fs["facescore"], rel=1e-5)
    assert body["summary"]["facescore"]["n"] == sum(rows[i]["faces"] > 0 for i in ids)
    md = (tmp_path / "out/results.md").read_text()
    assert "| Method | ImageReward ↑ | MPS ↑ | HPSv2 ↑ | FaceScore ↑ | images |" in md and "| other_model |" in md


def test_bad_config_fails_before_ray(tiny_zoo, tmp_path):
    from workflows.eval_coco import check_coco_inputs

    caps = _coco_file(tmp_path / "c.json", [{"image_id": 1, "id": 1, "caption": "a cat"}])
    base = {"captions": str(caps), "images": str(tmp_path), "scorers": _scorers(tiny_zoo), "output": str(tmp_path / "o")}
    bad_ir = {**_scorers(tiny_zoo)["imagereward"], "checkpoint": str(tmp_path / "nope.pt")}
    with pytest.raises(ModelFileError, match="scorers.imagereward.checkpoint: .*nope.pt does not exist"):
        check_coco_inputs(CocoEvalConfig.model_validate({**base, "scorers": {"imagereward": bad_ir}}))
    with pytest.raises(FileNotFoundError, match="generator: .*no_gen is not a LaytonGen directory"):
        check_coco_inputs(CocoEvalConfig.model_validate({**base, "generator": str(tmp_path / "no_gen")}))
    with pytest.raises(FileNotFoundError, match="images: .*absent does not exist"):
        check_coco_inputs(CocoEvalConfig.model_validate({**base, "images": str(tmp_path / "absent")}))
    (tmp_path / "empty.yaml").write_text(f"captions: {caps}\nimages: x\noutput: y\nscorers: {{}}\n")
    with pytest.raises(ConfigError, match="scorers: .*at least one of imagereward, mps, hpsv2, facescore"):
        load_config(tmp_path / "empty.yaml", CocoEvalConfig)
    for path in ("workflows/coco.yaml", "workflows/eval_coco_demo.yaml"):  # the bundled configs validate
        load_config(ROOT / path, CocoEvalConfig)
    r = subprocess.run([sys.executable, "-m", "app.cli", "eval", "coco", str(tmp_path / "empty.yaml")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "empty.yaml: scorers" in r.stderr and "Ray" not in r.stderr
