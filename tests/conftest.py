"""Shared fixtures: the tiny model zoo (written once per session) and a small local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    from layton.zoo import write_tiny_zoo

    out = tmp_path_factory.mktemp("zoo")
    write_tiny_zoo(out)
    return out


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


def synth_config_dict(zoo: Path, prompts: list[str] | str, out_dir: Path, **overrides) -> dict:
    """The demo config, pointed at a zoo, a prompt file and an output directory."""
    import yaml

    cfg = yaml.safe_load((ROOT / "workflows" / "synth_demo.yaml").read_text())
    cfg["prompts"]["paths"] = [str(p) for p in ([prompts] if isinstance(prompts, (str, Path)) else prompts)]
    cfg["generation"]["model"] = str(zoo / "flux")
    cfg["scoring"]["imagereward"] = {
        "checkpoint": str(zoo / "imagereward" / "ImageReward.pt"),
        "med_config": str(zoo / "imagereward" / "med_config.json"),
        "tokenizer": str(zoo / "imagereward" / "tokenizer"),
    }
    cfg["scoring"]["mps"] = {
        "checkpoint": str(zoo / "mps" / "MPS_overall_checkpoint.pth"),
        "processor": str(zoo / "mps" / "processor"),
    }
    cfg["recaption"]["model"] = str(zoo / "qwen2vl")
    cfg["output"]["dir"] = str(out_dir)
    cfg["ray"]["dashboard"] = False  # faster start-up for the many short runs of the tests
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def write_prompts(path: Path, texts: list, column: str = "TEXT", **extra_columns) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: pa.array(texts, pa.string()), **extra_columns}), path)
    return path
