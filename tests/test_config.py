import re
from pathlib import Path

import pytest
import yaml

from layton.completion import fingerprint
from layton.config import ConfigError, load_config

from stages.synth.config import SynthConfig
from tests.conftest import ROOT


def test_bundled_configs_validate():
    for name in ("synth_demo.yaml", "synth_flux_dev.yaml"):
        cfg = load_config(ROOT / "workflows" / name, SynthConfig)
        assert isinstance(cfg, SynthConfig)
    real = load_config(ROOT / "workflows" / "synth_flux_dev.yaml", SynthConfig)
    assert (real.generation.height, real.generation.num_inference_steps, real.generation.guidance_scale) == (1024, 50, 3.5)
    assert (real.scoring.imagereward_threshold, real.scoring.mps_threshold) == (0.8, 12.0)


def _write(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_unknown_field_names_file_and_field(tmp_path):
    cfg = yaml.safe_load((ROOT / "workflows" / "synth_demo.yaml").read_text())
    cfg["generation"]["num_steps"] = 4
    path = _write(tmp_path, cfg)
    with pytest.raises(ConfigError) as e:
        load_config(path, SynthConfig)
    assert str(path) in str(e.value) and "generation.num_steps" in str(e.value)


def test_invalid_value_names_field(tmp_path):
    cfg = yaml.safe_load((ROOT / "workflows" / "synth_demo.yaml").read_text())
    cfg["generation"]["height"] = 100  # not a multiple of 16
    cfg["scoring"]["resources"]["num_actors"] = 0
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, cfg), SynthConfig)
    assert "generation" in str(e.value) and "multiple of 16" in str(e.value)
    assert "scoring.resources.num_actors" in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", SynthConfig)
    p = tmp_path / "x.yaml"
    p.write_text("prompts: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p, SynthConfig)


def test_fingerprint_ignores_resources_only():
    cfg = load_config(ROOT / "workflows" / "synth_demo.yaml", SynthConfig)
    more_gpus = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"num_cpus": 64})})
    assert fingerprint(more_gpus) == fingerprint(cfg)
    other = cfg.model_copy(update={"scoring": cfg.scoring.model_copy(update={"mps_threshold": 13.0})})
    assert fingerprint(other) != fingerprint(cfg)


def test_tokenizer_configs_validate_and_carry_paper_settings():
    from stages.tokenizer.config import TokenizerTrainConfig

    load_config(ROOT / "workflows" / "tokenizer_demo.yaml", TokenizerTrainConfig)
    real = load_config(ROOT / "workflows" / "tokenizer_sdxl.yaml", TokenizerTrainConfig)
    assert (real.stage1.max_steps, real.stage2.max_steps) == (80000, 30000)
    assert real.stage1.optim.betas == (0.9, 0.99) and real.stage1.optim.lr == 1e-5
    assert real.run.num_workers * real.stage1.batch_size == 4
    assert [real.stage1.resolution_at(s) for s in (0, 39999, 40000)] == [512, 512, 1024]
    assert real.stage2.consistency.resolved_timesteps() == [999]


@pytest.mark.parametrize("field,value,message", [
    ("model__encoder_sizes", [250], "multiple of 16"),
    ("stage1__resolution_schedule", [[10, 512]], "start at step 0"),
    ("stage2__consistency__kind", "lcm", "stage2.consistency.kind"),
    ("run__name", "a/b", "run.name"),
])
def test_tokenizer_config_errors_name_the_field(tmp_path, field, value, message):
    from stages.tokenizer.config import TokenizerTrainConfig
    from tests.conftest import apply_overrides

    cfg = apply_overrides(yaml.safe_load((ROOT / "workflows" / "tokenizer_demo.yaml").read_text()), {field: value})
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, cfg), TokenizerTrainConfig)


def test_gen_configs_validate_and_carry_paper_settings():
    from stages.laytongen.config import GenTrainConfig

    load_config(ROOT / "workflows" / "gen_demo.yaml", GenTrainConfig)
    real = load_config(ROOT / "workflows" / "gen_xl.yaml", GenTrainConfig)
    assert real.model.gpt.size == "GPT-XL" and real.model.image_size == 256
    o = real.train.optim
    assert (o.name, o.lr, o.betas) == ("adamw", 1e-4, (0.9, 0.99))
    assert real.train.batch_size * real.run.num_workers == 320 and real.train.max_steps == 200_000


def test_eval_configs_validate():
    from stages.eval_geneval.config import GenEvalRunConfig
    from stages.eval_recon.config import ReconEvalConfig

    recon = load_config(ROOT / "workflows" / "eval_recon_demo.yaml", ReconEvalConfig)
    assert [m.kind for m in recon.models] == ["layton", "sdxl_vae", "llamagen_vq"]
    for name in ("eval_geneval_demo.yaml", "geneval.yaml"):
        load_config(ROOT / "workflows" / name, GenEvalRunConfig)


@pytest.mark.parametrize("field,value,message", [
    ("scoring.imagereward_threshold", "-1.0", "Input should be a valid number"),
    ("scoring.imagereward_threshold", True, "Input should be a valid number"),
    ("scoring.mps_threshold", float("nan"), "Input should be a finite number"),
    ("scoring.mps_threshold", "inf", "Input should be a valid number"),
    ("scoring.mps_threshold", float("-inf"), "Input should be a finite number"),
    ("output.shard_size", 8.0, "Input should be a valid integer"),
    ("output.shard_size", "8", "Input should be a valid integer"),
    ("prompts.dedup", "yes", "Input should be a valid boolean"),
])
def test_config_values_are_not_coerced(tmp_path, field, value, message):
    """Numbers are numbers, floats finite, integers integers, booleans booleans: each error names
    the file and the field (a NaN threshold would otherwise reject every sample)."""
    from stages.synth.config import SynthConfig

    raw = yaml.safe_load((ROOT / "workflows/synth_demo.yaml").read_text())
    section, leaf = field.split(".")
    raw[section][leaf] = value
    path = tmp_path / "synth.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {field}: {message}")):
        load_config(path, SynthConfig)
    raw[section][leaf] = {"scoring": -1.0, "output": 8, "prompts": True}[section]  # the same, well typed
    path.write_text(yaml.safe_dump(raw))
    load_config(path, SynthConfig)
