"""Evaluation, generation and the report straight on an object store (moto's S3 on 127.0.0.1).

Every input is read from the bucket and every output written to it as it is produced: the generator
is a LaytonGen directory that only the bucket holds, the working directory stays empty (a path put
through pathlib would leave an `s3:` folder there), and a rerun finds the work complete in the bucket.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from layton.storage import Root
from tests.conftest import ROOT
from tests.tokenizer.conftest import PHOTOS, encoded, photo

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def laytongen_uri(tiny_zoo, s3, tmp_path_factory) -> str:
    """An untrained LaytonGen directory (the zoo's tiny GPT, an untrained stage-1 tokenizer) that
    only the bucket holds."""
    from layton.gpt import GPT
    from layton.laytongen import save_laytongen
    from layton.tokenizer import LaytonTokenizer
    from stages.tokenizer.config import TokenizerTrainConfig
    from tests.tokenizer.conftest import tokenizer_config_dict

    d = tmp_path_factory.mktemp("laytongen")
    cfg = TokenizerTrainConfig.model_validate(tokenizer_config_dict(tiny_zoo, d / "shards", d / "train",
                                                                    model__encoder_sizes=[256]))
    local = save_laytongen(d / "laytongen", GPT.from_pretrained(tiny_zoo / "llamagen_gpt" / "gpt"),
                           text_encoder=tiny_zoo / "flan-t5-xl", tokenizer=LaytonTokenizer.build(cfg.model),
                           image_size=256, sampling={"cfg_scale": 4.0, "top_k": 100})
    Root(f"s3://{s3.bucket}/models").put_dir(local, "laytongen")
    shutil.rmtree(d)
    return f"s3://{s3.bucket}/models/laytongen"


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield cwd
    assert not list(cwd.iterdir()), "nothing is written locally"


def _bucket(s3, prefix: str) -> dict[str, int]:
    return Root(f"s3://{s3.bucket}/{prefix}").list(recursive=True)


def test_generate_prompt_file_from_and_to_the_bucket_resumes(laytongen_uri, s3, ray_local, empty_cwd, capsys):
    """`layton generate --prompts s3://… -o s3://…`: images and metadata.jsonl in the bucket; a
    longer prompt file generates only its new prompt, and a rerun nothing."""
    from app.cli import main

    prompts, out = f"s3://{s3.bucket}/gen/prompts.txt", f"s3://{s3.bucket}/gen/out"
    args = ["generate", "--prompts", prompts, "-o", out, "--laytongen", laytongen_uri, "--size", "64", "--steps", "2",
            "--batch-size", "1"]
    Root(f"s3://{s3.bucket}/gen").write("prompts.txt", b"a red car\n")
    assert main(args) == 0
    assert "1 generated, 0 failed, 0 already done" in capsys.readouterr().out
    assert set(_bucket(s3, "gen/out")) == {"images/00000.png", "metadata.jsonl", "_complete.json"}

    Root(f"s3://{s3.bucket}/gen").write("prompts.txt", b"a red car\na photo of a cat\n")
    assert main(args) == 0
    assert "1 generated, 0 failed, 1 already done" in capsys.readouterr().out
    lines = Root(out).read("metadata.jsonl").decode().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["00000", "00001"]  # rewritten whole, not appended over
    assert Image.open(io.BytesIO(Root(out).read("images/00001.png"))).size == (64, 64)
    assert main(args) == 0
    assert "0 generated, 0 failed, 2 already done" in capsys.readouterr().out


def test_coco_generates_into_and_scores_from_the_bucket(tiny_zoo, laytongen_uri, s3, ray_local, empty_cwd):
    """The COCO stage with `images` and `output` in the bucket: LaytonGen draws there, the scorer
    reads the images back from there, results and the completion record land there; a rerun is
    complete without generating or scoring."""
    from stages.eval_coco.config import CocoEvalConfig
    from stages.eval_coco.stage import CocoEvalStage

    run = f"s3://{s3.bucket}/coco"
    cfg = CocoEvalConfig.model_validate({
        "captions": str(ROOT / "workflows/data/coco_captions_demo.json"), "limit": 2, "generator": laytongen_uri,
        "images": f"{run}/images", "output": run, "sampling": {"image_size": 64, "decode_steps": 2},
        "scorers": {"hpsv2": {"checkpoint": str(tiny_zoo / "hpsv2/HPS_v2_compressed.pt"),
                              "architecture": str(tiny_zoo / "hpsv2/open_clip_config.json")}},
        "batch_size": 2, "ray": {"dashboard": False}})
    result = CocoEvalStage().execute(cfg)
    assert not result.skipped and result.summary["images"] == 2
    assert result.outputs == {"results": f"{run}/results.json"} and "| Method | HPSv2 ↑ | images |" in result.lines[0]
    files = _bucket(s3, "coco")
    assert {"results.json", "results.jsonl", "results.md", "_complete.json", "images/metadata.jsonl"} <= set(files)
    rows = [json.loads(line) for line in Root(run).read("results.jsonl").decode().splitlines()]
    assert [r["file"] for r in rows] == [f"{run}/images/images/{r['id']}.png" for r in rows]
    assert all(isinstance(r["hpsv2"], float) for r in rows)
    again = CocoEvalStage().execute(cfg)
    assert again.skipped and again.summary == result.summary


def test_geneval_on_the_bucket_resumes_per_prompt_folder(tiny_zoo, laytongen_uri, s3, ray_local, empty_cwd):
    """GenEval sample folders written to the bucket one by one with their completion records; a
    folder without one (a run killed while writing it) is generated again, the others not."""
    from stages.eval_geneval.config import GenEvalRunConfig
    from stages.eval_geneval.stage import GenEvalStage
    from workflows.eval_geneval import run_geneval

    run = f"s3://{s3.bucket}/geneval"
    cfg = GenEvalRunConfig.model_validate({
        "metadata": str(ROOT / "workflows/data/geneval_demo.jsonl"), "limit": 2, "images_per_prompt": 1,
        "generator": laytongen_uri, "images": f"{run}/images", "output": run,
        "sampling": {"image_size": 64, "decode_steps": 2}, "detector": str(tiny_zoo / "mask2former"),
        "clip": str(tiny_zoo / "clip-vit-l-14"), "ray": {"dashboard": False}})
    result = GenEvalStage().execute(cfg)
    assert result.summary["images"] == 2 and "| Single Obj. |" in result.lines[0]
    images = _bucket(s3, "geneval/images")
    assert set(images) == {f"{i:05d}/{n}" for i in (0, 1) for n in ("metadata.jsonl", "samples/0000.png", "_complete.json")}
    body = json.loads(Root(run).read("results.json"))
    assert body["generated_prompts"] == 2 and body["images"] == 2
    assert GenEvalStage().execute(cfg).skipped

    Root(f"{run}/images/00001").delete("_complete.json")
    assert run_geneval(cfg)["generated_prompts"] == 1
    assert set(_bucket(s3, "geneval/images")) == set(images)


def test_image_sets_under_a_uri(s3, ray_local, empty_cwd):
    """The reconstruction job's input kinds (a folder, parquet, synthesis shards) detected and read
    from the bucket through its filesystem."""
    from pipelines.eval_data import check_image_set, read_image_set
    from pipelines.shards import write_image_shards
    from stages.eval_recon.config import ImageSet

    base = f"s3://{s3.bucket}/sets"
    pngs = {f"sub/{name}.png": encoded(Image.fromarray(photo(name)).convert("RGB").resize((32, 32)), "PNG")
            for name in PHOTOS[:3]}
    for name, data in pngs.items():
        Root(f"{base}/folder").write(name, data)
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": ["a", "b"], "image": list(pngs.values())[:2]}), buf)
    Root(f"{base}/parquet").write("part-0.parquet", buf.getvalue())
    write_image_shards(f"{base}/shards", [(f"s{i}", "p", data, "png") for i, data in enumerate(pngs.values())],
                       shard_size=2)

    sets = []
    for kind in ("folder", "parquet", "shards"):
        cfg = ImageSet(path=f"{base}/{kind}")
        assert check_image_set(cfg) == kind
        sets.append(read_image_set(cfg))
    rows = sets[0].union(*sets[1:]).take_all()  # one execution: the three reads run together
    assert sorted(r["key"] for r in rows) == sorted([f"sub/{name}" for name in PHOTOS[:3]] + ["a", "b", "s0", "s1", "s2"])
    assert {bytes(r["image"]) for r in rows} == set(pngs.values())
    with pytest.raises(FileNotFoundError, match=f"data.path: {base}/absent does not exist"):
        check_image_set(ImageSet(path=f"{base}/absent"))


def test_report_of_an_s3_root(s3, tmp_path, empty_cwd):
    """`write_report(s3://…)`: state, shard stats, history, grids and results read from the bucket
    (listed once), report.html written there."""
    from app.report import write_report
    from layton.tables import Table
    from pipelines.shards import ShardWriter

    run = f"s3://{s3.bucket}/report-run"
    root = Root(run)
    root.write("workflow_state.json", json.dumps({"name": "s3-run", "stages": {
        "eval_recon": {"status": "complete", "seconds": 3.0, "summary": {"VQ.psnr": 21.5}}}}).encode())
    w = ShardWriter(f"{run}/shards", 0, 4, {}, "f" * 16)
    for i in range(4):
        w.add({"key": f"k{i}", "prompt": "p", "seed": i, "source": "f", "row": i, "status": "accepted", "reason": "",
               "imagereward": 1.0 + i, "mps": 12.0 + i, "recaption": "c"}, b"img", "jpg")
    w.close()
    root.write("train/tok/history.jsonl", b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 32, 3), (0, 255, 0), np.uint8)).save(buf, format="PNG")
    root.write("train/tok/grids/step_0000002.png", buf.getvalue())
    root.write("eval/recon/grid_VQ.png", buf.getvalue())
    table = Table(["Method", "PSNR ↑"], [["VQ", "21.50"]], title="Reconstruction at 64x64")
    root.write("eval/recon/results.json", json.dumps({"seconds": 3.0, "table": table.to_dict()}).encode())

    assert write_report(run) == f"{run}/report.html"
    page = root.read("report.html").decode()
    assert "<h1>s3-run</h1>" in page and f"run directory {run}" in page
    assert "<td>eval_recon</td><td class='complete'>complete</td>" in page
    assert "1 complete shard(s), 4 prompts" in page and "2 log steps, last step 2" in page
    assert "tok — grids/step_0000002.png" in page and "eval/recon — grid_VQ.png" in page
    assert "<td>21.50</td>" in page and "Skipped inputs" not in page
    local = tmp_path / "r.html"
    assert write_report(run, local) == str(local) and local.read_text().startswith("<!DOCTYPE html>")
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        write_report(f"s3://{s3.bucket}/absent")
