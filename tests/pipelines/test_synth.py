"""The synthesis run end to end on the tiny zoo: output, resume after SIGKILL, faults."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import yaml

from pipelines.shards import read_index
from stages.synth.config import SynthConfig
from tests.conftest import ROOT, scrape, synth_config_dict, write_prompts

PROMPTS = [f"a photo of a {c} {o}" for c in ("red", "green", "blue", "black", "white", "golden") for o in ("cat", "car", "house", "tree", "boat")]


def _samples(out: Path) -> dict[str, dict]:
    """Every sample of every complete shard, by key, with all member bytes."""
    samples = {}
    for tar in sorted(out.glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            key = s.pop("__key__")
            s.pop("__url__", None)
            s.pop("__local_path__", None)
            assert key not in samples, f"duplicate key {key}"
            samples[key] = s
    return samples


def _config_file(tmp_path: Path, zoo: Path, name: str, prompts: Path, **overrides) -> Path:
    cfg = synth_config_dict(zoo, prompts, tmp_path / name, **overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app.cli", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


# Thresholds that split the tiny models' scores on these prompts.
COMMON = dict(output__shard_size=4, generation__batch_size=2, scoring__imagereward_threshold=-1.6, scoring__mps_threshold=-8.0)
ALL_PROMPTS = PROMPTS + ["", None]  # 32 prompts: 8 shards of 4


@pytest.fixture(scope="module")
def reference_run(tiny_zoo, ray_local, tmp_path_factory):
    """An uninterrupted run in this process (on the session's Ray)."""
    from pipelines.synth import run_synth

    tmp = tmp_path_factory.mktemp("reference")
    prompts = write_prompts(tmp / "p.parquet", ALL_PROMPTS)
    cfg = SynthConfig.model_validate(synth_config_dict(tiny_zoo, prompts, tmp / "out", **COMMON))
    return cfg, prompts, run_synth(cfg)


# Generation heavy enough (vs. an actor's start-up) that a second generation actor gets shards.
HEAVY = dict(COMMON, generation__height=256, generation__width=256, generation__num_inference_steps=16)


@pytest.fixture(scope="module")
def heavy_reference(tiny_zoo, ray_local, tmp_path_factory):
    """One generation actor, uninterrupted, at the heavier settings; its 8 shards start as 3 blocks
    that the streaming repartition splits (the path of runs with more shards than INPUT_BLOCKS)."""
    from pipelines import synth

    tmp = tmp_path_factory.mktemp("heavy")
    prompts = write_prompts(tmp / "p.parquet", ALL_PROMPTS)
    blocks, synth.INPUT_BLOCKS = synth.INPUT_BLOCKS, 3
    try:
        synth.run_synth(SynthConfig.model_validate(synth_config_dict(tiny_zoo, prompts, tmp / "out", **HEAVY)))
    finally:
        synth.INPUT_BLOCKS = blocks
    return tmp / "out", prompts


def _total(samples: dict[str, float], **labels: str) -> float:
    return sum(v for k, v in samples.items() if all(f'{lk}="{lv}"' in k for lk, lv in labels.items()))


def _settled(url: str, name: str, timeout: float = 40.0, **labels: str) -> float:
    """A counter's total once two exports a report interval apart agree (counts arrive as shards land)."""
    deadline, last = time.time() + timeout, None
    while True:
        now = _total(scrape(url, name), **labels)
        if now == last or time.time() > deadline:
            return now
        last = now
        time.sleep(11)  # Ray's metrics report interval is ~10 s


def test_synth_output(reference_run, ray_local):
    from pipelines.stats import shard_summary
    from pipelines.synth import run_synth

    cfg, _, result = reference_run
    out = Path(cfg.output.dir)
    assert result.shards_written == 8 and result.prompts == 32
    index = read_index(out).to_pylist()
    assert len(index) == 32 and len({r["key"] for r in index}) == 32
    by_status = {s: [r for r in index if r["status"] == s] for s in ("accepted", "rejected", "failed")}
    assert sum(map(len, by_status.values())) == 32
    assert by_status["accepted"] and by_status["rejected"]  # the demo thresholds split the tiny scores
    assert {r["reason"] for r in index if r["prompt"] == ""} == {"empty_prompt", "null_prompt"}
    samples = _samples(out)
    assert set(samples) == {r["key"] for r in by_status["accepted"]}
    for r in by_status["accepted"]:
        meta = json.loads(samples[r["key"]]["json"])
        assert meta["prompt"] == r["prompt"] and meta["recaption"] == samples[r["key"]]["txt"].decode() != ""
        assert meta["scores"]["imagereward"] >= cfg.scoring.imagereward_threshold
        assert meta["scores"]["mps"] >= cfg.scoring.mps_threshold
        assert meta["generator"]["num_inference_steps"] == cfg.generation.num_inference_steps
        assert samples[r["key"]]["jpg"][:2] == b"\xff\xd8"
    for r in by_status["rejected"]:
        assert r["reason"] in ("empty_prompt", "null_prompt") or "threshold" in r["reason"]
    summary = shard_summary(out)
    assert summary["total"] == 32 and summary["accepted"] == len(by_status["accepted"])
    assert json.loads((out / "manifest.json").read_text())["thresholds"]["mps"] == cfg.scoring.mps_threshold
    # The driver's live counters reached the metrics export (what the dashboard's Metrics view reads).
    assert _settled(ray_local.metrics_url, "ray_layton_synth_written_total") == len(by_status["accepted"])
    assert _settled(ray_local.metrics_url, "ray_layton_synth_rejected_total", reason="reader") == 2
    assert _settled(ray_local.metrics_url, "ray_layton_synth_shards_written_total") == 8
    # A second run finds everything done and generates nothing.
    again = run_synth(cfg)
    assert again.shards_written == 0 and again.shards_skipped == 8


def _shard_files(out: Path) -> dict[str, bytes]:
    """Every shard file's bytes; a completion record without who wrote it and when."""
    files = {}
    for p in sorted(out.glob("[0-9]*")):
        data = p.read_bytes()
        if p.name.endswith("_stats.json"):
            stats = json.loads(data)
            stats.pop("writer")
            stats.pop("completed_at")
            data = json.dumps(stats, sort_keys=True).encode()
        files[p.name] = data
    return files


def _kill_tree(pid: int) -> None:
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    os.killpg(pid, signal.SIGKILL)


def _assert_same_output(ref: Path, out: Path) -> None:
    ref_files, out_files = _shard_files(ref), _shard_files(out)
    assert sorted(ref_files) == sorted(out_files) and ref_files
    for name in ref_files:  # same shard numbers; byte-identical tars, indexes and records
        assert ref_files[name] == out_files[name], name
    index = read_index(out).to_pylist()
    assert len(index) == len({r["key"] for r in index}) == len(ALL_PROMPTS)  # each prompt handled once
    _samples(out)  # no duplicate key across tars
    assert not [p.name for p in out.rglob("*.tmp*")]


def test_resume_after_sigkills_matches_uninterrupted_run(reference_run, tiny_zoo, tmp_path):
    """The driver is killed at several points; every rerun keeps the complete shards and plans
    only the rest; the end result equals the uninterrupted run's."""
    _, prompts, _ = reference_run
    ref = Path(reference_run[0].output.dir)
    run_cfg = _config_file(tmp_path, tiny_zoo, "run", prompts, **COMMON)
    out = tmp_path / "run"
    at_least = 0  # shards known complete: a killed run's workers may still finish one in flight
    for kill_after in (1, 3, None):  # shards this attempt completes before its driver is killed
        proc = _cli("synth", run_cfg)
        finished, kept, lines = 0, None, []
        for line in proc.stdout:  # the CLI prints its plan, then a line as each shard completes
            lines.append(line)
            if m := re.match(r"synth: plan 8 shard\(s\) .*: (\d+) complete, (\d+) to do", line):
                kept = int(m.group(1))
                assert kept >= at_least and int(m.group(2)) == 8 - kept, line  # only the rest is planned
            finished += line.startswith("shard ")
            if finished == kill_after:
                _kill_tree(proc.pid)  # the machine goes: driver, local Ray and its workers at once
                break
        if kill_after is None:
            log = "".join(lines)
            assert proc.wait() == 0 and f"wrote {8 - kept} shard(s), kept {kept} complete" in log, log
        else:
            proc.wait()
            assert kept is not None and kept + kill_after < 8
            at_least = kept + kill_after
    assert kept >= 4  # both kills came after shards were durable, and those were kept
    _assert_same_output(ref, out)


def test_two_generation_actors_share_the_shards_and_an_actor_kill_is_survived(heavy_reference, tiny_zoo, tmp_path):
    """Two 1-CPU generation actors both take shards, shards become durable while others are still
    being generated, one generation actor SIGKILLed mid-run is restarted, and the output equals
    the one-actor run's byte for byte."""
    import psutil

    ref, prompts = heavy_reference
    cfg = _config_file(tmp_path, tiny_zoo, "two", prompts, **HEAVY, generation__resources__num_actors=2, ray__num_cpus=5)
    proc = _cli("synth", cfg)
    lines, killed_pid = [], None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("shard ") and killed_pid is None:
            actors = [p for p in psutil.Process(proc.pid).children(recursive=True)
                      if "GenerateStage" in " ".join(p.cmdline())]
            assert len(actors) == 2, [p.cmdline() for p in actors]
            killed_pid = actors[0].pid
            actors[0].send_signal(signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, "".join(lines)
    out = tmp_path / "two"
    _assert_same_output(ref, out)
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    generators = {s["writer"]["stages"]["generate"]["pid"] for s in stats}
    assert len(generators) >= 2, generators  # both actors took shards (a restarted one may add a pid)
    first_durable = min(s["writer"]["finished_at"] for s in stats)
    last_generated = max(s["writer"]["stages"]["generate"]["at"] for s in stats)
    assert first_durable < last_generated  # shards land as they finish, not together at the end


def test_changed_settings_refuse_to_resume(tiny_zoo, tmp_path):
    from pipelines.plan import make_plan
    from pipelines.synth import ResumeConflict, prepare_output

    prompts = write_prompts(tmp_path / "p.parquet", PROMPTS[:3])
    cfg = SynthConfig.model_validate(synth_config_dict(tiny_zoo, prompts, tmp_path / "out"))
    plan = make_plan(cfg.prompts, cfg.output.shard_size)
    prepare_output(cfg, plan, force=False)
    changed = SynthConfig.model_validate(synth_config_dict(tiny_zoo, prompts, tmp_path / "out", scoring__mps_threshold=5.0))
    with pytest.raises(ResumeConflict, match=r"scoring.mps_threshold: -5.0 -> 5.0"):
        prepare_output(changed, plan, force=False)
    prepare_output(changed, plan, force=True)
    more_actors = synth_config_dict(tiny_zoo, prompts, tmp_path / "out", scoring__mps_threshold=5.0, ray__num_cpus=16,
                                    generation__resources__num_actors=3)
    prepare_output(SynthConfig.model_validate(more_actors), plan, force=False)  # resources may change
    # The output may move: where it lives is not a setting.
    shutil.move(tmp_path / "out", tmp_path / "moved")
    moved = synth_config_dict(tiny_zoo, prompts, tmp_path / "moved", scoring__mps_threshold=5.0)
    prepare_output(SynthConfig.model_validate(moved), plan, force=False)
    # Input rows appended to a file would renumber the shards: refused.
    write_prompts(tmp_path / "p.parquet", PROMPTS[:5])
    with pytest.raises(ResumeConflict, match=r"input.inputs"):
        prepare_output(SynthConfig.model_validate(moved), make_plan(cfg.prompts, cfg.output.shard_size), force=False)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_bad_model_path_fails_before_ray(tiny_zoo, tmp_path, damage):
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    if damage == "missing":
        bad = zoo / "mps" / "MPS_overall_checkpoint.pth"
        bad.unlink()
    else:
        bad = next((zoo / "flux" / "transformer").glob("*.safetensors"))
        bad.write_bytes(bad.read_bytes()[:1000])
    prompts = write_prompts(tmp_path / "p.parquet", PROMPTS[:3])
    proc = _cli("synth", _config_file(tmp_path, zoo, "out", prompts))
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2 and str(bad) in log, log
    assert "Started a local Ray instance" not in log and not (tmp_path / "out").exists()


def test_failing_generation_is_recorded_and_the_chunk_goes_on(tiny_zoo):
    from pipelines.shard_rows import FAILED, GENERATED, PENDING
    from pipelines.stages import GenerateStage, decode_image

    stage = GenerateStage(synth_config_dict(tiny_zoo, "x", Path("y"))["generation"])
    real_pipe = stage.pipe

    def pipe_failing_on_poison(prompt, **kw):
        if "poison" in prompt:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return real_pipe(prompt=prompt, **kw)

    stage.pipe = pipe_failing_on_poison
    row = {"ids": ["a", "b", "c"], "prompts": ["a cat", "poison", "a dog"], "seeds": [1, 2, 3],
           "status": [PENDING] * 3, "reason": [""] * 3}
    out = stage.process(row)
    assert out["status"] == [GENERATED, FAILED, GENERATED]
    assert out["reason"][1].startswith("generate_error: RuntimeError: CUDA error")
    assert out["image"][1] == b""
    first = np.asarray(decode_image(out["image"][0]))
    assert first.std() > 0
    alone = stage.generate(["a cat"], [1])[0]
    # The stage hands on the stored (lossless PNG by default) encoding of the same pixels.
    np.testing.assert_array_equal(first, alone)


def test_vllm_backend_without_vllm_fails_before_ray(tiny_zoo, tmp_path):
    from pipelines.synth import run_synth

    prompts = write_prompts(tmp_path / "p.parquet", PROMPTS[:3])
    cfg = SynthConfig.model_validate(synth_config_dict(tiny_zoo, prompts, tmp_path / "out", recaption__backend="vllm"))
    with pytest.raises(ImportError, match="gpu"):
        run_synth(cfg)
    assert not (tmp_path / "out").exists()
    first = SynthConfig.model_validate(synth_config_dict(tiny_zoo, prompts, tmp_path / "out", recaption__backend="vllm",
                                                         order="recaption_first"))
    with pytest.raises(ValueError, match="score_first"):
        run_synth(first)


def test_stage_metrics_are_exported(ray_local):
    @ray_local.remote
    def stage_work():
        from pipelines.metrics import SynthMetrics

        m = SynthMetrics()
        m.latency("score", 0.3, items=4)
        m.scores([0.9, -0.5], [12.5, 3.0])
        m.count("rejected", 1, reason="mps_below_threshold")

        time.sleep(8)  # stay alive until the metrics agent has pulled the values

    ray_local.get(stage_work.remote())
    url = ray_local.metrics_url
    assert _total(scrape(url, "ray_layton_synth_stage_seconds_count"), stage="score") >= 1
    assert _total(scrape(url, "ray_layton_synth_items_processed_total"), stage="score") >= 4
    assert _total(scrape(url, "ray_layton_synth_mps_count")) >= 2
    assert _total(scrape(url, "ray_layton_synth_rejected_total"), reason="mps_below_threshold") >= 1


def test_stage_actors_that_cannot_fit_fail_clearly(tiny_zoo, tmp_path):
    prompts = write_prompts(tmp_path / "p.parquet", PROMPTS[:3])
    # 3 actors of 2 CPUs on a 4-CPU local instance: Ray Data would wait forever for a task slot.
    proc = _cli("synth", _config_file(tmp_path, tiny_zoo, "out", prompts, generation__resources__num_cpus=2,
                                      scoring__resources__num_cpus=2, recaption__resources__num_cpus=2))
    log = proc.communicate(timeout=180)[0]
    assert proc.returncode == 2, log
    assert "resources: CPU: stage actors need 7" in log and "Ray has 4" in log
    assert not list((tmp_path / "out").glob("*.tar"))
