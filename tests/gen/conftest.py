"""LaytonGen inputs on the tiny zoo: a tokenizer precompute pass over real photographs (tokens +
captions), an untrained stage-1 tokenizer directory, and LaytonGen training configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, apply_overrides
from tests.tokenizer.conftest import photo_shards, tokenizer_config_dict  # noqa: F401 (fixture)


@pytest.fixture(scope="session")
def gen_inputs(tiny_zoo, photo_shards, ray_local, tmp_path_factory) -> dict:
    from stages.tokenizer.config import TokenizerTrainConfig
    from layton.tokenizer import LaytonTokenizer
    from pipelines.tokenizer_data import precompute

    root = tmp_path_factory.mktemp("gen_inputs")
    config = TokenizerTrainConfig.model_validate(tokenizer_config_dict(
        tiny_zoo, photo_shards, root / "train", model__encoder_sizes=[256], stage1__resolution_schedule=[[0, 64]],
        stage2__resolution_schedule=[[0, 64]]))
    precompute(config)
    tokenizer = LaytonTokenizer.build(config.model).save_pretrained(root / "tokenizer", stage=1)
    return {"tokens": config.precompute_path(), "tokenizer": Path(tokenizer), "zoo": tiny_zoo, "root": root}


def gen_config_dict(inputs: dict, storage: Path, **overrides) -> dict:
    """The demo LaytonGen config pointed at the test inputs; small sample grids."""
    cfg = yaml.safe_load((ROOT / "workflows" / "gen_demo.yaml").read_text())
    zoo = inputs["zoo"]
    cfg["model"]["init_from"] = str(zoo / "llamagen_gpt" / "t2i_tiny_stage1_256.pt")
    cfg["model"]["text_encoder"] = str(zoo / "flan-t5-xl")
    cfg["model"]["tokenizer"] = str(inputs["tokenizer"])
    cfg["data"]["tokens"] = str(inputs["tokens"])
    cfg["run"]["storage_path"] = str(storage)
    cfg["train"]["sample_prompts"] = ["a photo of a cat", ""]
    cfg["sampling"].update(image_size=64, decode_steps=2)
    cfg["ray"]["dashboard"] = False
    return apply_overrides(cfg, overrides)
