"""Tokenizer training on Ray Train: resume after SIGKILL, bad input, precompute vs on-the-fly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from layton.model_files import ModelFileError
from stages.tokenizer.config import TokenizerTrainConfig
from tests.conftest import cli, kill_after_first_checkpoint
from tests.tokenizer.conftest import tokenizer_config_dict, write_photo_shards

FAST = dict(stage1__max_steps=6, stage1__checkpoint_every=3, stage1__log_every=3, stage1__image_every=6,
            stage1__resolution_schedule=[[0, 64]], stage2__max_steps=2, stage2__checkpoint_every=2,
            stage2__log_every=1, stage2__image_every=2, stage2__resolution_schedule=[[0, 64]],
            stage1__batch_size=2, stage2__batch_size=2, data__cache_in_memory=True)


def _config(tiny_zoo, shards, storage, **overrides) -> TokenizerTrainConfig:
    return TokenizerTrainConfig.model_validate(tokenizer_config_dict(tiny_zoo, shards, storage, **{**FAST, **overrides}))


def _history(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "history.jsonl").read_text().splitlines()]


def test_odd_images_are_converted_and_corrupt_ones_skipped_and_counted(tiny_zoo, ray_local, tmp_path):
    from pipelines.tokenizer_data import precompute

    shards = write_photo_shards(tmp_path / "shards", odd=True)
    config = _config(tiny_zoo, shards, tmp_path / "runs")
    marker = precompute(config)
    assert marker["images"] == 10 and marker["usable"] == 9 and marker["skipped"] == 1
    assert list(marker["skipped_by_reason"]) == ["unreadable image: OSError"]
    assert precompute(config) == marker  # complete with the same settings: reused, not redone


@pytest.mark.slow  # two Ray Train runs; the resume test below covers Ray Train in the default suite
def test_both_stages_train_and_export(tiny_zoo, ray_local, tmp_path):
    from layton.tokenizer import LaytonTokenizer
    from workflows.train_tokenizer import run_tokenizer_stage

    shards = write_photo_shards(tmp_path / "shards", odd=True)
    config = _config(tiny_zoo, shards, tmp_path / "runs")  # precomputed; the resume test trains on the fly
    r1 = run_tokenizer_stage(config, 1)
    assert r1.step == 6 and not r1.skipped
    assert r1.metrics["skipped_images"] >= 1  # the corrupt JPEG, skipped in the worker and counted
    r2 = run_tokenizer_stage(config, 2)
    assert r2.step == 2
    stage1 = Path(r1.export).parent
    assert [h["step"] for h in _history(stage1)] == [3, 6]
    assert (stage1 / "grids" / "step_0000006.png").is_file() and list((stage1 / "tensorboard").iterdir())
    assert r1.precompute["skipped"] == 1
    tok = LaytonTokenizer.from_pretrained(r2.export)
    assert tok.spec["stage"] == 2 and tok.spec["consistency"]["kind"] == "hypersd"
    assert not (Path(r2.export) / "optimizer.safetensors").exists()  # exports hold no optimizer
    again = run_tokenizer_stage(config, 2)  # a complete stage is not run again
    assert again.skipped and again.step == 2


def test_killed_run_resumes_from_its_checkpoint(tiny_zoo, photo_shards, ray_local, tmp_path):
    """SIGKILL after the first checkpoint, then a rerun: it resumes there, restores optimizer, LR
    schedule, random draws and data position, so every logged loss equals an uninterrupted run's;
    the history holds one line per step and the killed run's unrecorded checkpoint is gone."""
    from workflows.train_tokenizer import run_tokenizer_stage

    settings = {**FAST, "stage1__max_steps": 12, "stage1__checkpoint_every": 4, "stage1__log_every": 2,
                "stage1__optim__warmup_steps": 20, "data__precompute": False, "data__cache_in_memory": True,
                "stage1__batch_size": 2}  # 2 epochs of the photo shards in 12 steps: replay crosses an epoch
    cfg = tokenizer_config_dict(tiny_zoo, photo_shards, tmp_path / "runs", **settings)
    path = tmp_path / "tok.yaml"
    path.write_text(yaml.safe_dump(cfg))
    stage_dir = tmp_path / "runs" / "tokenizer-stage1"

    killed = cli("train", "tokenizer", "--stage", "1", path)
    kill_after_first_checkpoint(killed, stage_dir)
    first = max(h["step"] for h in _history(stage_dir))
    assert first < 12

    resumed = cli("train", "tokenizer", "--stage", "1", path)
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log
    history = _history(stage_dir)
    second = [h for h in history if h["resumed_from"] > 0]
    start = second[0]["resumed_from"]
    assert start % 4 == 0 and 4 <= start <= first
    assert [h["step"] for h in second] == list(range(start + 2, 13, 2))  # the step counter goes on
    assert [h["step"] for h in history] == list(range(2, 13, 2))  # one line per step
    recorded = {r["checkpoint_dir_name"] for r in json.loads((stage_dir / "checkpoint_manager_snapshot.json").read_text())
                ["checkpoint_results"]}
    assert {p.name for p in stage_dir.glob("checkpoint_*") if p.is_dir()} == recorded

    whole = run_tokenizer_stage(TokenizerTrainConfig.model_validate(
        tokenizer_config_dict(tiny_zoo, photo_shards, tmp_path / "whole", **settings)), 1)
    assert whole.step == 12
    reference = {h["step"]: h["loss"] for h in _history(tmp_path / "whole" / "tokenizer-stage1")}
    assert {h["step"]: pytest.approx(reference[h["step"]], abs=1e-6) for h in history} == reference
    # The LR warm-up continues where it stopped instead of starting over: the schedule was restored.
    assert second[0]["lr"] == pytest.approx(1e-4 * (start + 3) / 20)  # LambdaLR: factor (updates + 1) / 20
    final = max((p.parent for p in stage_dir.glob("checkpoint_*/trainer_state.json")),
                key=lambda p: json.loads((p / "trainer_state.json").read_text())["step"])
    # Adam's per-parameter step counts 12 updates only if its state came back from the checkpoint.
    adam_steps = {float(v) for k, v in load_file(final / "optimizer.safetensors").items() if k.endswith(".step")}
    assert adam_steps == {12.0}
    assert json.loads((stage_dir / "tokenizer" / "trainer_state.json").read_text())["step"] == 12


@pytest.mark.parametrize("field,what", [
    ("stage2__consistency__lora", "stage2.consistency.lora"),
    ("model__sdxl", "model.sdxl"),
    ("model__vq", "model.vq"),
    ("stage2__lpips__backbone", "stage2.lpips.backbone"),
])
def test_missing_model_paths_fail_before_training(tiny_zoo, photo_shards, tmp_path, field, what):
    from workflows.train_tokenizer import run_tokenizer_stage

    config = _config(tiny_zoo, photo_shards, tmp_path / "runs", **{field: str(tmp_path / "absent")})
    with pytest.raises(FileNotFoundError, match=f"{what}.*absent"):
        run_tokenizer_stage(config, 2 if "stage2" in field else 1)
    assert not (tmp_path / "runs").exists()  # nothing was started: no storage, no precompute


def test_missing_unet_or_vae_inside_sdxl_fails_before_training(tiny_zoo, photo_shards, tmp_path):
    import shutil

    from workflows.train_tokenizer import run_tokenizer_stage

    sdxl = tmp_path / "sdxl"
    shutil.copytree(tiny_zoo / "sdxl", sdxl)
    shutil.rmtree(sdxl / "vae")
    config = _config(tiny_zoo, photo_shards, tmp_path / "runs", model__sdxl=str(sdxl))
    with pytest.raises(ModelFileError, match="vae"):
        run_tokenizer_stage(config, 1)
    assert not (tmp_path / "runs").exists()


def test_stage2_without_stage1_fails_clearly(tiny_zoo, photo_shards, tmp_path):
    from workflows.train_tokenizer import run_tokenizer_stage

    with pytest.raises(FileNotFoundError, match="stage2.init_from.*run stage 1 first"):
        run_tokenizer_stage(_config(tiny_zoo, photo_shards, tmp_path / "runs"), 2)
