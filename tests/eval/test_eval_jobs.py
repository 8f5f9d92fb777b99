"""The evaluation jobs: reconstruction metrics and GenEval on Ray Data, bad input before Ray."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.eval_geneval.config import GenEvalRunConfig

from layton.model_files import ModelFileError
from stages.eval_recon.config import ReconEvalConfig
from tests.tokenizer.conftest import PHOTOS, photo


def _photo_folder(root: Path, odd: bool = False) -> Path:
    root.mkdir(parents=True)
    for name in PHOTOS[:4]:
        Image.fromarray(photo(name)).convert("RGB").save(root / f"{name}.png")
    if odd:
        Image.fromarray(photo("camera")).save(root / "gray.png")  # grayscale
        Image.fromarray(photo("astronaut")).convert("RGBA").resize((90, 60)).save(root / "rgba_small.png")
        buf = io.BytesIO()
        Image.fromarray(photo("rocket")).save(buf, format="JPEG")
        (root / "corrupt.jpg").write_bytes(buf.getvalue()[:300])
    return root


def _recon_config(zoo: Path, data: Path, out: Path, **kw) -> ReconEvalConfig:
    cfg = {"data": {"path": str(data)},
           "models": [{"name": "VQ", "kind": "llamagen_vq", "path": str(zoo / "llamagen_vq" / "vq_ds16_t2i.pt")}],
           "metrics": {"inception": str(zoo / "inception" / "pt_inception-2015-12-05-6726825d.pth"),
                       "lpips": {"net": "alex", "backbone": str(zoo / "lpips" / "alexnet-owt-7be5be79.pth")}},
           "size": 64, "batch_size": 2, "output": str(out), "ray": {"dashboard": False}}
    cfg.update(kw)
    return ReconEvalConfig.model_validate(cfg)


@pytest.mark.parametrize("field,what", [("inception", "metrics.inception"), ("backbone", "metrics.lpips.backbone"),
                                        ("model", r"models\[0\].path \(VQ\)"), ("data", "data.path")])
def test_recon_bad_paths_fail_before_ray(tiny_zoo, tmp_path, field, what):
    from workflows.eval_recon import run_recon_eval

    cfg = _recon_config(tiny_zoo, _photo_folder(tmp_path / "photos"), tmp_path / "out").model_dump()
    absent = str(tmp_path / "absent")
    if field == "inception":
        cfg["metrics"]["inception"] = absent
    elif field == "backbone":
        cfg["metrics"]["lpips"]["backbone"] = absent
    elif field == "model":
        cfg["models"][0]["path"] = absent
    else:
        cfg["data"]["path"] = absent
    with pytest.raises(FileNotFoundError, match=f"{what}.*absent"):
        run_recon_eval(ReconEvalConfig.model_validate(cfg))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # two recon runs with rFIDs at d = 2048 (~40 s on 2 cores)
def test_recon_metrics_are_the_same_for_one_and_two_actors(tiny_zoo, ray_local, tmp_path):
    from workflows.eval_recon import run_recon_eval

    data = _photo_folder(tmp_path / "photos", odd=True)
    one = run_recon_eval(_recon_config(tiny_zoo, data, tmp_path / "one", resources={"num_actors": 1}))["results"]["VQ"]
    two = run_recon_eval(_recon_config(tiny_zoo, data, tmp_path / "two", resources={"num_actors": 2}))["results"]["VQ"]
    assert one["n"] == two["n"] == 6 and one["skipped"] == two["skipped"] == {"unreadable image: OSError": 1}
    for k in ("psnr", "ssim", "lpips"):
        assert one[k] == pytest.approx(two[k], rel=1e-12)
    assert one["rfid"] == pytest.approx(two["rfid"], rel=1e-6)
    table = (tmp_path / "one" / "results.md").read_text()
    assert "| VQ |" in table and (tmp_path / "one" / "grid_VQ.png").is_file()


def test_geneval_scores_a_folder_made_elsewhere(tiny_zoo, ray_local, tmp_path):
    from layton.geneval import read_metadata, write_sample_dir
    from tests.conftest import ROOT
    from workflows.eval_geneval import run_geneval

    metadata = ROOT / "workflows" / "data" / "geneval_demo.jsonl"
    images = tmp_path / "images"
    for p, name in zip(read_metadata(metadata), PHOTOS):
        write_sample_dir(images, p, [Image.fromarray(photo(name)).convert("RGB").resize((96, 96))] * 2, "f" * 16)
    config = GenEvalRunConfig.model_validate({
        "metadata": str(metadata), "images": str(images), "detector": str(tiny_zoo / "mask2former"),
        "clip": str(tiny_zoo / "clip-vit-l-14"), "output": str(tmp_path / "out"), "ray": {"dashboard": False}})
    body = run_geneval(config)
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert body["images"] == len(rows) == 12
    assert sorted({r["tag"] for r in rows}) == sorted(["single_object", "two_object", "counting", "colors", "position",
                                                        "color_attr"])
    s = body["summary"]
    assert set(s["tasks"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert s["overall"] == pytest.approx(np.mean(list(s["tasks"].values())))
    assert "| Single Obj. |" in (tmp_path / "out" / "results.md").read_text()


def test_geneval_bad_metadata_fails_naming_the_line(tiny_zoo, tmp_path):
    from workflows.eval_geneval import run_geneval

    meta = tmp_path / "meta.jsonl"
    meta.write_text('{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a bench"}\n'
                    '{"tag": "spelling", "include": [{"class": "bench", "count": 1}], "prompt": "a bench"}\n')
    config = GenEvalRunConfig.model_validate({
        "metadata": str(meta), "images": str(tmp_path / "images"), "detector": str(tiny_zoo / "mask2former"),
        "clip": str(tiny_zoo / "clip-vit-l-14"), "output": str(tmp_path / "out")})
    with pytest.raises(ValueError, match="meta.jsonl:2"):
        run_geneval(config)
    missing = config.model_copy(update={"metadata": str(tmp_path / "meta1.jsonl")})
    meta.with_name("meta1.jsonl").write_text(meta.read_text().splitlines()[0] + "\n")
    with pytest.raises(FileNotFoundError, match="images.*does not exist"):
        run_geneval(missing)
    with pytest.raises(ModelFileError, match="detector"):
        run_geneval(missing.model_copy(update={"detector": str(tmp_path / "absent")}))
    assert not (tmp_path / "out").exists()
