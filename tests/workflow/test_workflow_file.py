"""Workflow files: schema, the paths that link stages, and bad input refused before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.workflow import check_links, load_workflow, parse_workflow
from layton.config import ConfigError
from stages.registry import STAGES

ROOT = Path(__file__).resolve().parents[2]


def _demo(tmp_path: Path, **changes) -> dict:
    raw = yaml.safe_load((ROOT / "workflows/demo.yaml").read_text())
    raw["root"] = str(tmp_path / "run")
    raw.update(changes)
    return raw


def _parse(raw: dict, source: str = "wf.yaml"):
    return parse_workflow(yaml.safe_dump(raw), source)


def test_bundled_workflows_validate_with_linked_paths(tmp_path):
    demo = load_workflow(ROOT / "workflows/demo.yaml")
    assert demo.stage_names() == [s.name for s in STAGES]
    paper = load_workflow(ROOT / "workflows/paper.yaml")
    assert paper.configs["tokenizer"].stage2.resolution_schedule[-1][1] == 1024

    wf = _parse(_demo(tmp_path))
    run = tmp_path / "run"
    c = wf.configs
    assert c["synth"].output.dir == str(run / "shards")
    assert c["tokenizer"].data.shards == [str(run / "shards")] and c["tokenizer"].run.storage_path == str(run / "train")
    assert c["laytongen"].data.tokens == str(run / "train/tokenizer-precompute")
    assert c["laytongen"].model.tokenizer == str(run / "train/tokenizer-stage2/tokenizer")
    assert c["eval_recon"].models[0].path == str(run / "train/tokenizer-stage2/tokenizer")
    assert c["eval_recon"].models[1].path == str(Path("runs/demo/zoo/sdxl").resolve())  # given explicitly: kept (made absolute)
    assert c["eval_geneval"].generator == c["eval_coco"].generator == str(run / "train/laytongen/laytongen")
    assert c["eval_coco"].output == str(run / "eval/coco")
    assert all(cfg.ray == wf.ray for cfg in c.values())  # one cluster for every stage


def test_explicit_paths_win_and_order_is_fixed(tmp_path):
    raw = _demo(tmp_path)
    stages = raw.pop("stages")
    raw["stages"] = {"eval_coco": stages["eval_coco"], "laytongen": stages["laytongen"], "tokenizer": stages["tokenizer"]}
    raw["stages"]["tokenizer"]["run"] = {"name": "tok", "storage_path": str(tmp_path / "elsewhere")}
    wf = _parse(raw)
    assert wf.stage_names() == ["tokenizer_stage1", "tokenizer_stage2", "laytongen", "eval_coco"]
    assert wf.configs["laytongen"].model.tokenizer == str(tmp_path / "elsewhere/tok-stage2/tokenizer")
    assert wf.configs["laytongen"].data.tokens == str(tmp_path / "elsewhere/tok-precompute")


@pytest.mark.parametrize("change, message", [
    ({"stages": {"synthesis": {}}}, r"wf.yaml: stages.synthesis: unknown stage"),
    ({"name": "has space"}, r"wf.yaml: name: String should match pattern"),
    ({"root": "nosuchfs://bucket/run"}, r"wf.yaml: root: nosuchfs://bucket/run: no pyarrow or fsspec filesystem handles nosuchfs://"),
    ({"stages": {}}, r"wf.yaml: stages: "),
    ({"ray": {"num_cpu": 4}}, r"wf.yaml: ray.num_cpu: Extra inputs are not permitted"),
])
def test_invalid_workflow_names_file_and_field(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        _parse(_demo(tmp_path, **change))


def test_invalid_stage_field_names_the_stage(tmp_path):
    raw = _demo(tmp_path)
    raw["stages"]["tokenizer"]["stage1"]["max_steps"] = 0
    del raw["stages"]["eval_coco"]["scorers"]
    with pytest.raises(ConfigError, match=r"stages.tokenizer.stage1.max_steps: Input should be greater than or equal to 1"
                                          r".*stages.eval_coco.scorers: Field required"):
        _parse(raw)
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_workflow("name: [", "bad.yaml")
    with pytest.raises(ConfigError, match="nope.yaml: workflow file not found"):
        load_workflow(tmp_path / "nope.yaml")


def test_stage_reading_missing_outputs_fails_before_anything(tmp_path):
    raw = _demo(tmp_path)
    raw["stages"] = {"laytongen": raw["stages"]["laytongen"]}  # no tokenizer stage writes its inputs
    raw["tiny_zoo"] = None
    wf = _parse(raw)
    with pytest.raises(FileNotFoundError, match=r"wf.yaml: stages.laytongen.data.tokens: .*tokenizer-precompute does not "
                                                r"exist and no earlier stage of this workflow writes it"):
        check_links(wf)
    path = tmp_path / "gen_only.yaml"
    path.write_text(yaml.safe_dump(raw))
    r = subprocess.run([sys.executable, "-m", "app.cli", "workflow", "run", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "stages.laytongen.data.tokens" in r.stderr
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_missing_model_file_fails_in_preflight_naming_stage_and_field(tmp_path, tiny_zoo):
    from layton.model_files import ModelFileError
    from app.runner import preflight

    raw = _demo(tmp_path)
    text = yaml.safe_dump(raw).replace("runs/demo/zoo", str(tiny_zoo))
    wf = parse_workflow(text, "wf.yaml")
    preflight(wf)  # the whole demo workflow's own inputs are there
    wf = parse_workflow(text.replace("vq_ds16_t2i.pt", "missing_vq.pt"), "wf.yaml")
    with pytest.raises(ModelFileError, match=r"wf.yaml: stages.tokenizer: model.vq: .*missing_vq.pt does not exist"):
        preflight(wf)
    # A stage whose generator comes later still has its scorer files checked up front.
    wf = parse_workflow(text.replace("HPS_v2_compressed.pt", "missing_hps.pt"), "wf.yaml")
    with pytest.raises(ModelFileError, match=r"wf.yaml: stages.eval_coco: scorers.hpsv2.checkpoint: .*missing_hps.pt"):
        preflight(wf)
