import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.cli import build_parser
from app.report import write_report
from layton.geneval import result_table
from layton.tables import Table
from pipelines.shards import ShardWriter

STAGES = {
    "synth": ("complete", 12.0, {"accepted": 7, "rejected": 13}, None),
    "tokenizer_stage1": ("complete", 125.0, {"step": 20, "loss": 0.123456}, None),
    "tokenizer_stage2": ("failed", 3.5, {}, "RuntimeError: CUDA out of memory <tried 2 GiB>"),
    "laytongen": ("running", None, {}, None),
    "eval_recon": ("pending", None, {}, None),
    "eval_geneval": ("skipped", None, {}, None),
    "eval_coco": ("pending", None, {}, None),
}
RECON = Table(["Method", "rFID ↓", "PSNR ↑"], [["Layton (demo)", "14748.72", "13.73"], ["SDXL-VAE", "9688.78", "13.55"]],
              title="Reconstruction at 128x128")


def _png(path, size, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _history(path, rows, extra_lines=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")


def _shards(out_dir):
    """Two real shards through the project's writer (as tests/pipelines/test_stats.py makes them)."""
    rng = np.random.default_rng(0)
    ir, mps = rng.normal(0.8, 1, 20), rng.normal(12, 2, 20)
    out_dir.mkdir(parents=True)
    (out_dir / "manifest.json").write_text(json.dumps({"thresholds": {"imagereward": 0.8, "mps": 12.0}}))
    for shard in (0, 1):
        w = ShardWriter(out_dir, shard, 10, {}, "f" * 16)
        for i in range(shard * 10, shard * 10 + 10):
            ok = ir[i] >= 0.8 and mps[i] >= 12.0
            w.add({"key": f"k{i}", "prompt": f"p{i}", "seed": i, "source": "f", "row": i,
                   "status": "accepted" if ok else "rejected", "reason": "" if ok else "mps_below_threshold",
                   "imagereward": float(ir[i]), "mps": float(mps[i]), "recaption": "c"}, b"img", "jpg")
        w.close()
    return int(((ir >= 0.8) & (mps >= 12.0)).sum())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    (d / "workflow.yaml").write_text("name: nightly <b>&co</b>\nstages: [synth]\n")
    (d / "workflow_state.json").write_text(json.dumps({"name": "ignored", "stages": {
        name: {"status": st, "started": 1000.0 if secs else None, "finished": 1000.0 + secs if secs else None,
               "seconds": secs, "summary": summary, "error": err}
        for name, (st, secs, summary, err) in STAGES.items()}}))
    accepted = _shards(d / "synth")
    stage1 = d / "train" / "tokenizer-stage1"
    _history(stage1 / "history.jsonl", [{"step": s, "loss": 1.0 / s, "lr": 1e-5, "psnr": 10.0 + s, "resumed_from": 0,
                                         "time": 1e9 + s} for s in (5, 10, 15, 20)], ["{not json"])
    _png(stage1 / "grids" / "step_0000010.png", (64, 32), (255, 0, 0))
    _png(stage1 / "grids" / "step_0000020.png", (64, 32), (0, 255, 0))  # latest: the one shown
    gen = d / "train" / "laytongen"
    _history(gen / "history.jsonl", [{"step": s, "loss": 6.0 - s / 10, "grad_norm": 1.5, "time": 1e9} for s in (10, 20, 30, 40)])
    _png(gen / "samples" / "step_0000040.png", (2048, 512), (0, 0, 255))  # wider than 1024: downscaled
    (gen / "samples" / "step_0000050.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")  # newest but corrupt
    recon = d / "eval" / "recon"
    recon.mkdir(parents=True)
    (recon / "results.json").write_text(json.dumps({"task": "reconstruction", "seconds": 272.0, "table": RECON.to_dict()}))
    for name in ("Layton", "SDXL-VAE"):
        _png(recon / f"grid_{name}.png", (96, 48), (200, 200, 0))
    geneval = d / "eval" / "geneval"
    geneval.mkdir()
    summary = {"tasks": {"single_object": 0.875, "two_object": 0.5, "counting": 0.25, "colors": 0.75, "position": 0.125,
                         "color_attr": None}, "overall": 0.5}
    (geneval / "results.json").write_text(json.dumps({"task": "geneval", "summary": summary, "seconds": 58.7,
                                                      "table": result_table(summary, "laytongen").to_dict()}))
    out = write_report(d)
    return d, out, Path(out).read_text(), accepted


def _images(page):
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in re.findall(r"src='data:image/png;base64,([^']+)'", page)]


def test_report_lists_stages_and_tables(run):
    d, out, page, accepted = run
    assert out == str(d / "report.html")
    assert "nightly &lt;b&gt;&amp;co&lt;/b&gt;" in page and "<b>&co" not in page  # name from workflow.yaml, escaped
    for name, (status, *_rest) in STAGES.items():
        assert re.search(rf"<td>{name}</td><td class='{status}'>{status}</td>", page), name
    assert "2m 05s" in page and "loss: 0.1235" in page
    assert "CUDA out of memory &lt;tried 2 GiB&gt;" in page
    assert f"accepted {accepted} (" in page and "2 complete shard(s), 20 prompts" in page  # format_summary text
    assert "<th>rFID ↓</th>" in page and "<td>9688.78</td>" in page
    assert "<p>Reconstruction at 128x128</p>" in page
    assert "<td>0.88</td>" in page and "<td>–</td>" in page  # GenEval
    assert "evaluated in 4m 32s" in page and "evaluated in 58.7 s" in page
    assert page.index("<h2>Stages") < page.index("<h2>Shard") < page.index("<h2>Training") < page.index("<h2>Grids") < page.index("<h2>Evaluation")


def test_report_is_self_contained(run):
    page = run[2]
    # histogram + 2 training-curve plots + stage1 grid + laytongen sample + 2 recon grids
    assert len(_images(page)) == 7
    assert not re.search(r"(src|href)\s*=\s*['\"]?\s*(https?:|//)", page, re.I)
    assert "<script" not in page and "<link" not in page


def test_report_shows_latest_grid_and_downscales(run):
    images = _images(run[2])
    colours = [im.convert("RGB").getpixel((0, 0)) for im in images]
    assert (0, 255, 0) in colours and (255, 0, 0) not in colours  # step 20 grid, not step 10
    blue = images[colours.index((0, 0, 255))]
    assert blue.size == (1024, 256)  # 2048x512 kept its aspect


def test_report_notes_corrupt_inputs(run):
    d, _, page, _ = run
    assert f"{d / 'train' / 'tokenizer-stage1' / 'history.jsonl'}: line 5 is not a JSON object" in page
    assert f"{d / 'train' / 'laytongen' / 'samples' / 'step_0000050.png'}: not a readable image" in page
    assert "4 log steps, last step 20" in page  # the good lines still make the curve
    assert "<td>psnr</td><td class=num>30</td>" in page and "resumed_from</td>" not in page


def test_report_of_partial_run_with_invalid_state(tmp_path):
    (tmp_path / "workflow_state.json").write_text("{truncated")
    _history(tmp_path / "train" / "job" / "history.jsonl", [{"step": 1, "loss": 2.0}, {"step": 1, "loss": 1.5}])
    page = Path(write_report(tmp_path, tmp_path / "out" / "r.html")).read_text()
    assert f"{tmp_path / 'workflow_state.json'}: invalid workflow state" in page
    assert f"<h1>{tmp_path.name}</h1>" in page  # no name anywhere: the directory's
    assert "no shard directory" in page and "no eval/*/results.json" in page
    assert "<td>loss</td><td class=num>1.5</td>" in page  # a re-logged step (resume): the later record wins


def test_report_finds_shards_outside_synth(tmp_path):
    accepted = _shards(tmp_path / "data" / "shards")
    page = Path(write_report(tmp_path)).read_text()
    assert f"accepted {accepted} (" in page and "<h3>shards</h3>" in page


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        write_report(tmp_path / "nowhere")
    (tmp_path / "empty" / "eval").mkdir(parents=True)
    with pytest.raises(ValueError, match=str(tmp_path / "empty")):
        write_report(tmp_path / "empty")


def test_table_round_trips_and_escapes():
    t = Table(["a", "b | c"], [["1", "<2>"]], title="T", notes=["n"])
    assert Table.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    assert t.to_markdown() == "T\n\n| a | b \\| c |\n|---|---|\n| 1 | <2> |\n\nn\n"
    assert t.to_html() == "<p>T</p><table><tr><th>a</th><th>b | c</th></tr><tr><td>1</td><td>&lt;2&gt;</td></tr></table><p>n</p>"
    with pytest.raises(ValueError, match="not a table"):
        Table.from_dict({"rows": []})


def test_report_command(tmp_path, capsys):
    recon = tmp_path / "run" / "eval" / "recon"
    recon.mkdir(parents=True)
    (recon / "results.json").write_text(json.dumps({"table": RECON.to_dict()}))
    parser = build_parser()
    args = parser.parse_args(["report", str(tmp_path / "run")])
    args.fn(args)
    assert capsys.readouterr().out.strip() == str(tmp_path / "run" / "report.html")
    assert "<td>14748.72</td>" in (tmp_path / "run" / "report.html").read_text()
    args = parser.parse_args(["report", str(tmp_path / "run"), "-o", str(tmp_path / "x.html")])
    args.fn(args)
    assert (tmp_path / "x.html").is_file()
