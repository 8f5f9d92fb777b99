"""A workflow root on an object store, used directly: no staging copy, nothing local but caches.

The store is moto's S3 server on 127.0.0.1 (the session's `s3` fixture); pyarrow's S3 filesystem
reaches it through `AWS_ENDPOINT_URL`, as a user's runs reach theirs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from PIL import Image

from app.workflow import parse_workflow
from layton.storage import Root, join, local_copy
from tests.conftest import ROOT, kill_after_first_checkpoint


@pytest.mark.parametrize("scheme", ["file", "memory"])  # pyarrow's own filesystem, and one through fsspec
def test_put_dir_and_local_copy_follow_changes(tmp_path, scheme, monkeypatch):
    """A model directory exported to a URI is pulled once into the cache, and pulled again only
    where the bucket's copy changed (same size, new content: a re-export of the same model)."""
    monkeypatch.setenv("LAYTON_CACHE", str(tmp_path / "cache"))
    uri = f"file://{tmp_path / 'remote'}" if scheme == "file" else f"memory://bucket-{tmp_path.name}/run"
    src = tmp_path / "export"
    (src / "unet").mkdir(parents=True)
    (src / "unet/w.safetensors").write_bytes(b"a" * 64)
    (src / "model_index.json").write_text("{}")
    (src / "optimizer.safetensors").write_bytes(b"o")
    Root(uri).put_dir(src, "tok", skip=("optimizer.safetensors",))
    assert Root(uri).list(recursive=True) == {"tok/model_index.json": 2, "tok/unet/w.safetensors": 64}

    local = local_copy(join(uri, "tok"), "tokenizer")
    assert (local / "unet/w.safetensors").read_bytes() == b"a" * 64 and not (local / "optimizer.safetensors").exists()
    first = (local / "model_index.json").stat().st_mtime_ns
    time.sleep(0.02)
    (src / "unet/w.safetensors").write_bytes(b"b" * 64)
    (src / "model_index.json").unlink()
    Root(uri).put_dir(src, "tok")  # replaces: the index is gone there, the optimizer now comes along
    assert local_copy(join(uri, "tok")) == local
    assert (local / "unet/w.safetensors").read_bytes() == b"b" * 64
    assert not (local / "model_index.json").exists() and (local / "optimizer.safetensors").is_file()
    assert first  # the unchanged file was not the reason for the second pull
    with pytest.raises(FileNotFoundError, match="tokenizer: .*nope: no files"):
        local_copy(join(uri, "nope"), "tokenizer")


def _bucket(s3, prefix: str) -> dict[str, int]:
    return Root(f"s3://{s3.bucket}/{prefix}").list(recursive=True)


def test_coco_workflow_on_an_s3_root_resumes_from_the_bucket_alone(tiny_zoo, ray_local, s3, tmp_path, monkeypatch):
    """A COCO-scoring workflow whose root is s3://: results, state and report land in the bucket and
    nothing in the working directory; a second run from another working directory with an empty
    cache (another machine) finds the stage complete in the bucket."""
    from app.runner import run_workflow

    images = tmp_path / "images"
    images.mkdir()
    for i in (139, 285):
        Image.new("RGB", (64, 64), (i % 255, 90, 30)).save(images / f"{i}.png")
    demo = yaml.safe_load((ROOT / "workflows/demo.yaml").read_text())
    coco = json.loads(json.dumps(demo["stages"]["eval_coco"]).replace("runs/demo/zoo", str(tiny_zoo)))
    coco.update(captions=str(ROOT / "workflows/data/coco_captions_demo.json"), images=str(images), limit=2)
    coco["scorers"] = {"hpsv2": coco["scorers"]["hpsv2"]}
    uri = f"s3://{s3.bucket}/coco-run"
    text = yaml.safe_dump({"name": "uri-test", "root": uri, "stages": {"eval_coco": coco}})

    for run in ("first", "second"):
        cwd = tmp_path / run
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        monkeypatch.setenv("LAYTON_CACHE", str(tmp_path / f"cache-{run}"))
        wf = parse_workflow(text, "uri.yaml")
        assert wf.root == uri
        events = []
        final = run_workflow(wf, on_event=events.append)
        assert final["stages"]["eval_coco"]["status"] == "complete"
        assert list(cwd.iterdir()) == [], list(cwd.iterdir())  # nothing local: no staging copy
        files = _bucket(s3, "coco-run")
        assert {"workflow.yaml", "workflow_state.json", "report.html", "eval/coco/results.json"} <= set(files), files
        assert json.loads(Root(uri).read("eval/coco/results.json"))["images"] == 2
    assert any(e.startswith("eval_coco: already complete") for e in events), events


def _workflow_file(tmp_path, tiny_zoo, root: str) -> str:
    """The demo's synthesis (8 prompts, shards of 4) and tokenizer stage 1 (30 steps, a checkpoint
    every 15) on the tiny zoo, with `root`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    demo = yaml.safe_load((ROOT / "workflows/demo.yaml").read_text().replace("runs/demo/zoo", str(tiny_zoo)))
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"TEXT": [f"a {c} bird on a {t}" for c in ("red", "blue") for t in
                                      ("branch", "roof", "fence", "boat")]}), prompts)
    synth = demo["stages"]["synth"]
    synth["prompts"]["paths"] = [str(prompts)]
    synth["output"]["shard_size"] = 4
    tok = demo["stages"]["tokenizer"]
    tok["stage1"]["resolution_schedule"] = [[0, 64]]
    return yaml.safe_dump({"name": "s3-demo", "root": root, "ray": {"num_cpus": 4, "dashboard": True},
                           "stages": {"synth": synth, "tokenizer": tok}})


@pytest.mark.slow
def test_synthesis_and_tokenizer_on_s3_killed_and_resumed_from_the_bucket(tiny_zoo, s3, tmp_path):
    """Synthesis + tokenizer stage 1 with `root: s3://…`: every output goes to the bucket as it is
    produced; a SIGKILL during stage 1, then a rerun from a fresh working directory with an empty
    cache resumes at the bucket's last checkpoint and finishes; nothing is written locally."""
    uri = f"s3://{s3.bucket}/demo-run"
    wf_file = tmp_path / "wf.yaml"
    wf_file.write_text(_workflow_file(tmp_path, tiny_zoo, uri))

    def run(name: str) -> subprocess.Popen:
        cwd = tmp_path / name
        cwd.mkdir()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "LAYTON_CACHE": str(tmp_path / f"cache-{name}")}
        return subprocess.Popen([sys.executable, "-m", "app.cli", "workflow", "run", str(wf_file)], cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env=env)

    kill_after_first_checkpoint(run("first"), join(uri, "train/tokenizer-stage1"))
    state = json.loads(Root(uri).read("workflow_state.json"))["stages"]
    assert state["synth"]["status"] == "complete" and state["tokenizer_stage1"]["status"] == "running"
    shards = {n: s for n, s in _bucket(s3, "demo-run/shards").items() if n[:5].isdigit()}
    assert len(shards) == 6, shards  # 2 shards: .tar, .parquet, _stats.json
    assert list((tmp_path / "first").iterdir()) == []

    proc = run("second")
    log = proc.communicate(timeout=1500)[0]
    assert proc.returncode == 0, log[-5000:]
    assert "synth: already complete" in log, log[-3000:]
    history = [json.loads(x) for x in Root(uri).read("train/tokenizer-stage1/history.jsonl").decode().splitlines()]
    assert history[-1]["step"] == 30 and history[-1]["resumed_from"] >= 15, history[-3:]
    files = _bucket(s3, "demo-run")
    assert "train/tokenizer-stage1/tokenizer/model_index.json" in files and "report.html" in files, sorted(files)
    assert any(n.startswith("train/tokenizer-precompute/") and n.endswith(".parquet") for n in files), sorted(files)
    state = json.loads(Root(uri).read("workflow_state.json"))["stages"]
    assert all(s["status"] == "complete" for s in state.values()), state
    assert list((tmp_path / "second").iterdir()) == []
