"""A workflow root on a URI: the staging copy is pulled before a run and pushed after each stage."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from PIL import Image

from app.workflow import parse_workflow
from layton.storage import SYNC_MARKER, pull, push, staging_dir
from tests.conftest import ROOT


@pytest.mark.parametrize("scheme", ["file", "memory"])  # pyarrow's own filesystem, and one through fsspec
def test_push_pull_copies_new_and_changed_files(tmp_path, scheme):
    uri = f"file://{tmp_path / 'remote'}" if scheme == "file" else f"memory://bucket-{tmp_path.name}/run"
    local = tmp_path / "local"
    (local / "a/b").mkdir(parents=True)
    (local / "a/b/x.bin").write_bytes(b"x" * 100)
    (local / "state.json").write_text('{"s": 1}')
    assert push(local, uri) == 2
    assert push(local, uri) == 0  # nothing changed
    time.sleep(0.05)
    (local / "state.json").write_text('{"s": 2}')  # same size, written after the last push
    assert push(local, uri) == 1
    fresh = tmp_path / "fresh"
    assert pull(uri, fresh) == 2
    assert (fresh / "a/b/x.bin").read_bytes() == b"x" * 100 and (fresh / "state.json").read_text() == '{"s": 2}'
    assert pull(uri, fresh) == 0 and (fresh / SYNC_MARKER).is_file()


def test_workflow_on_a_uri_root_resumes_from_another_staging_dir(tiny_zoo, ray_local, tmp_path, monkeypatch):
    """A COCO-scoring workflow whose root is a file:// URI: outputs land there; a second run with an
    empty staging directory (another machine) pulls them and finds the stage complete."""
    from app.runner import run_workflow

    images = tmp_path / "images"
    images.mkdir()
    for i in (139, 285):
        Image.new("RGB", (64, 64), (i % 255, 90, 30)).save(images / f"{i}.png")
    demo = yaml.safe_load((ROOT / "workflows/demo.yaml").read_text())
    coco = json.loads(json.dumps(demo["stages"]["eval_coco"]).replace("runs/demo/zoo", str(tiny_zoo)))
    coco.update(captions=str(ROOT / "workflows/data/coco_captions_demo.json"), images=str(images), limit=2)
    coco["scorers"] = {"hpsv2": coco["scorers"]["hpsv2"]}
    uri = f"file://{tmp_path / 'bucket/run'}"
    text = yaml.safe_dump({"name": "uri-test", "root": uri, "stages": {"eval_coco": coco}})

    monkeypatch.setenv("LAYTON_STAGING", str(tmp_path / "staging1"))
    wf = parse_workflow(text, "uri.yaml")
    assert wf.remote == uri and wf.root == staging_dir("uri-test", uri) and wf.root.is_relative_to(tmp_path / "staging1")
    events = []
    run_workflow(wf, on_event=events.append)
    remote = tmp_path / "bucket/run"
    assert json.loads((remote / "eval/coco/results.json").read_text())["images"] == 2
    assert json.loads((remote / "workflow_state.json").read_text())["stages"]["eval_coco"]["status"] == "complete"
    assert (remote / "report.html").is_file()

    monkeypatch.setenv("LAYTON_STAGING", str(tmp_path / "staging2"))
    events = []
    final = run_workflow(parse_workflow(text, "uri.yaml"), on_event=events.append)
    assert any(e.startswith("storage:") and "pulled" in e and not e.startswith("storage: 0") for e in events), events
    assert any(e.startswith("eval_coco: already complete") for e in events), events
    assert final["stages"]["eval_coco"]["status"] == "complete"
