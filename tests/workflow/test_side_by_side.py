"""Evaluation stages that read nothing the others write run side by side when the cluster holds
them all (the workflow's `side_by_side`), with every stage's status kept exact in workflow_state.json."""

from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image

from app.runner import next_runnable
from app.workflow import parse_workflow
from layton.storage import Root
from tests.conftest import ROOT

DEMO = yaml.safe_load((ROOT / "workflows/demo.yaml").read_text())


def _demo(**changes) -> list:
    raw = {**DEMO, **changes}
    return parse_workflow(yaml.safe_dump(raw), "demo.yaml").stages()


def _names(items) -> list[str]:
    return [s.name for s, _ in items]


def test_plan_runs_independent_evaluations_together_only_where_they_fit():
    stages = _demo()
    evals = stages[4:]
    assert _names(evals) == ["eval_recon", "eval_geneval", "eval_coco"]
    # Training stages depend on what came before: one at a time, in order.
    assert _names(next_runnable(stages, [], {"CPU": 64})) == ["synth"]
    assert _names(next_runnable(stages[1:], [], {"CPU": 64})) == ["tokenizer_stage1"]
    # Each evaluation holds 1 one-CPU actor plus a CPU for its read tasks.
    assert [s.demand(c) for s, c in evals] == [{"CPU": 2.0, "GPU": 0.0}] * 3
    assert _names(next_runnable(evals, [], {"CPU": 6})) == ["eval_recon", "eval_geneval", "eval_coco"]
    assert _names(next_runnable(evals, [], {"CPU": 4})) == ["eval_recon", "eval_geneval"]
    assert _names(next_runnable(evals[2:], evals[:1], {"CPU": 4})) == ["eval_coco"]  # starts when geneval ends
    assert _names(next_runnable(evals, [], {"CPU": 2})) == ["eval_recon"]  # alone, whatever it needs
    assert next_runnable(evals[1:], evals[:1], {"CPU": 2}) == []
    # GPUs count as well: two 1-GPU scorers on a 1-GPU cluster take turns.
    gpu = _demo(stages={**DEMO["stages"], **{k: {**DEMO["stages"][k], "resources": {"num_gpus": 1}}
                                             for k in ("eval_geneval", "eval_coco")}})[4:]
    assert _names(next_runnable(gpu, [], {"CPU": 8, "GPU": 1})) == ["eval_recon", "eval_geneval"]
    # The switch off: capacity {} holds nothing beside a running stage.
    assert _names(next_runnable(evals, [], {})) == ["eval_recon"]


def test_a_stage_that_reads_another_ones_output_waits_for_it():
    stages = DEMO["stages"]
    coco = {**stages["eval_coco"], "images": "runs/demo/eval/geneval/images", "generator": None}  # geneval's output
    evals = _demo(stages={**stages, "eval_coco": coco})[4:]
    assert _names(next_runnable(evals, [], {"CPU": 64})) == ["eval_recon", "eval_geneval"]
    assert next_runnable(evals[2:], evals[1:2], {"CPU": 64}) == []  # not while geneval writes its images
    assert _names(next_runnable(evals[2:], evals[:1], {"CPU": 64})) == ["eval_coco"]


def _images(path, names) -> str:
    path.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (64, 64), (40 * i % 255, 90, 30)).save(path / f"{name}.png")
    return str(path)


def test_evaluations_side_by_side_keep_exact_state_through_a_failure(tiny_zoo, ray_local, tmp_path, monkeypatch):
    """Reconstruction and COCO scoring start together on the 4-CPU instance. COCO's images match no
    caption, so it fails at run time: the reconstruction beside it finishes its work and is recorded
    complete, COCO failed with its error, and the run raises it. The rerun with the images in place
    skips the reconstruction and completes COCO."""
    from app.runner import run_workflow

    monkeypatch.chdir(tmp_path)
    zoo = str(tiny_zoo)
    stages = json.loads(json.dumps({k: DEMO["stages"][k] for k in ("eval_recon", "eval_coco")})
                        .replace("runs/demo/zoo", zoo))
    stages["eval_recon"].update(data={"path": _images(tmp_path / "photos", range(4))}, size=64,
                                models=[{"name": "SDXL-VAE", "kind": "sdxl_vae", "path": f"{zoo}/sdxl"}])
    coco = stages["eval_coco"]
    coco.update(captions=str(ROOT / "workflows/data/coco_captions_demo.json"), limit=2,
                images=_images(tmp_path / "coco", ["unrelated"]), scorers={"hpsv2": coco["scorers"]["hpsv2"]})
    text = yaml.safe_dump({"name": "side", "root": str(tmp_path / "run"), "stages": stages})

    with pytest.raises(FileNotFoundError, match="holds no image for any of the 2 caption"):
        run_workflow(parse_workflow(text, "side.yaml"), on_event=lambda line: None)
    state = json.loads(Root(str(tmp_path / "run")).read("workflow_state.json"))["stages"]
    recon, failed = state["eval_recon"], state["eval_coco"]
    assert recon["status"] == "complete" and recon["error"] is None and "SDXL-VAE.psnr" in recon["summary"]
    assert failed["status"] == "failed" and "holds no image" in failed["error"]
    assert failed["started"] < recon["finished"] and recon["started"] < failed["finished"]  # they ran at once

    _images(tmp_path / "coco", [139, 285])  # the demo file's first two images by id
    events = []
    final = run_workflow(parse_workflow(text, "side.yaml"), on_event=events.append)["stages"]
    assert final["eval_recon"]["skipped"] is True and final["eval_recon"]["status"] == "complete"
    assert final["eval_coco"]["status"] == "complete" and final["eval_coco"]["error"] is None
    assert final["eval_coco"]["summary"]["images"] == 2
    assert any(e.startswith("eval_recon: already complete") for e in events), events
