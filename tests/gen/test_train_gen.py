"""LaytonGen on Ray Train: the text pass, resume after SIGKILL (also with no step left), bad input
before any Ray work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from safetensors.torch import load_file

from layton.completion import fingerprint, mark_complete
from layton.model_files import ModelFileError
from stages.laytongen.config import GenTrainConfig
from tests.conftest import ROOT, cli, kill_after_first_checkpoint
from tests.gen.conftest import gen_config_dict


def _history(job: Path) -> list[dict]:
    return [json.loads(line) for line in (job / "history.jsonl").read_text().splitlines()]


def test_killed_run_resumes_and_exports_a_pipeline(gen_inputs, tmp_path):
    from layton.laytongen import LaytonGenPipeline

    cfg = gen_config_dict(gen_inputs, tmp_path / "runs", train__max_steps=12, train__checkpoint_every=4,
                          train__log_every=2, train__sample_every=12, train__batch_size=4,
                          train__optim__warmup_steps=20)
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(cfg))
    job = tmp_path / "runs" / "laytongen"

    killed = cli("train", "gen", path)
    kill_after_first_checkpoint(killed, job)
    first = max(h["step"] for h in _history(job))
    assert first < 12

    resumed = cli("train", "gen", path)
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log
    assert "laytongen: step 12" in log and "sample grid" in log
    history = _history(job)
    second = [h for h in history if h["resumed_from"] > 0]
    start = second[0]["resumed_from"]
    assert start % 4 == 0 and 4 <= start <= first
    assert [h["step"] for h in second] == list(range(start + 2, 13, 2))  # the step counter goes on
    assert second[0]["lr"] == pytest.approx(1e-3 * (start + 3) / 20)  # the warm-up schedule was restored
    export = job / "laytongen"
    final = max((p.parent for p in job.glob("checkpoint_*/trainer_state.json")),
                key=lambda p: json.loads((p / "trainer_state.json").read_text())["step"])
    adam_steps = {float(v) for k, v in load_file(final / "optimizer.safetensors").items() if k.endswith(".step")}
    assert adam_steps == {12.0}  # the optimizer state came back from the checkpoint
    assert json.loads((export / "trainer_state.json").read_text())["step"] == 12
    assert not (export / "optimizer.safetensors").exists()
    assert (job / "samples" / "step_0000012.png").is_file()
    assert all(h["loss"] < h["uniform_ce"] + 1.0 for h in history)

    pipe = LaytonGenPipeline.from_pretrained(export)
    (out,) = pipe("a photo of a cat", seed=3, size=64, steps=2)
    assert out.image.size == (64, 64) and out.tokens.shape == (16, 16)

    again = cli("train", "gen", path)  # a complete run is not run again
    assert "already complete at step 12" in again.communicate(timeout=300)[0]

    # Killed after the last checkpoint but before its export: the rerun restores a checkpoint with no
    # step left, trains nothing and exports that checkpoint.
    shutil.rmtree(export)
    redo = cli("train", "gen", path)
    log = redo.communicate(timeout=600)[0]
    assert redo.returncode == 0, log
    assert "laytongen: step 12" in log
    assert json.loads((export / "trainer_state.json").read_text())["step"] == 12
    assert _history(job) == history  # no step ran, nothing was logged


def _tokens_pass(out: Path, vq: str, rows: list[tuple[str, str, str]]) -> Path:
    """A tokenizer precompute pass written by hand: (key, caption, error) rows with random tokens."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    table = pa.table({"key": [r[0] for r in rows], "caption": [r[1] for r in rows],
                      "tokens_256": [rng.integers(0, 1024, 256, dtype=np.int16) for _ in rows],
                      "error": [r[2] for r in rows]})
    pq.write_table(table, out / "part-0.parquet")
    settings = {"vq": vq, "encoder_sizes": [256], "version": 2}
    mark_complete(out, fingerprint(settings), settings=settings)
    return out


def test_text_pass_skips_empty_captions_and_truncates_long_ones(gen_inputs, ray_local, tmp_path):
    from pipelines.gen_data import read_text_pass, text_precompute

    vq = json.loads((gen_inputs["tokenizer"] / "model_index.json").read_text())["vq"]
    tokens = _tokens_pass(tmp_path / "tokens", vq, [
        ("short", "a red car", ""), ("empty", "   ", ""), ("long", "word " * 300, ""),
        ("broken", "an unreadable image", "unreadable image: OSError")])
    config = GenTrainConfig.model_validate(gen_config_dict(gen_inputs, tmp_path / "runs", data__tokens=str(tokens)))
    marker = text_precompute(config)
    assert (marker["images"], marker["usable"]) == (4, 2)
    assert marker["skipped_by_reason"] == {"empty caption": 1, "unreadable image: OSError": 1}
    rows = {r["key"]: r for r in read_text_pass(config).take_all()}
    assert rows["long"]["truncated"] and rows["long"]["text_len"] == 120
    assert not rows["short"]["truncated"] and rows["short"]["text_len"] == 4  # a, red, car, </s>
    assert len(rows["short"]["text"]) == 4 * 64 * 2  # float16 (4, 64): only the valid tokens are stored
    assert text_precompute(config) == marker  # complete with the same settings: reused


@pytest.mark.parametrize("field,value,error,match", [
    ("model__text_encoder", "absent", ModelFileError, "model.text_encoder.*absent"),
    ("model__tokenizer", "absent", FileNotFoundError, "model.tokenizer.*absent"),
    ("model__init_from", "absent.pt", FileNotFoundError, "model.init_from.*absent.pt"),
    ("data__tokens", "absent", FileNotFoundError, "data.tokens.*absent.*layton train tokenizer"),
])
def test_bad_inputs_fail_before_ray(gen_inputs, tmp_path, field, value, error, match):
    from workflows.train_gen import run_gen_training

    config = GenTrainConfig.model_validate(gen_config_dict(gen_inputs, tmp_path / "runs", **{field: str(tmp_path / value)}))
    with pytest.raises(error, match=match):
        run_gen_training(config)
    assert not (tmp_path / "runs").exists()  # nothing started: no storage, no precompute


def test_tokens_of_another_vq_or_size_are_refused(gen_inputs, tmp_path):
    from workflows.train_gen import run_gen_training

    other = _tokens_pass(tmp_path / "tokens", "/elsewhere/vq.pt", [("a", "a cat", "")])
    config = GenTrainConfig.model_validate(gen_config_dict(gen_inputs, tmp_path / "runs", data__tokens=str(other)))
    with pytest.raises(ValueError, match="data.tokens.*encoded with /elsewhere/vq.pt"):
        run_gen_training(config)
    config = GenTrainConfig.model_validate(gen_config_dict(gen_inputs, tmp_path / "runs", model__image_size=288))
    with pytest.raises(ValueError, match="not model.image_size=288"):
        run_gen_training(config)
    assert not (tmp_path / "runs").exists()


def test_config_errors_name_the_field(tmp_path):
    from layton.config import ConfigError, load_config

    cfg = yaml.safe_load((ROOT / "workflows" / "gen_demo.yaml").read_text())
    cfg["model"]["gpt"] = {"size": None, "n_layer": 2}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="bad.yaml.*model.gpt.*n_layer, n_head and dim"):
        load_config(path, GenTrainConfig)
    cfg["model"]["gpt"] = {"size": "GPT-XL"}
    cfg["train"]["optim"]["lr"] = -1
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="train.optim.lr"):
        load_config(path, GenTrainConfig)
