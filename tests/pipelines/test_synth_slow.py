"""Long synthesis runs (`pytest -m slow`): the other stage order. The demo end to end is
tests/workflow/test_workflow_slow.py."""

from __future__ import annotations

import pytest

from pipelines.shards import read_index
from stages.synth.config import SynthConfig
from tests.conftest import ROOT, synth_config_dict

pytestmark = pytest.mark.slow


def test_recaption_first_order(tiny_zoo, ray_local, tmp_path):
    from pipelines.synth import run_synth

    prompts = ROOT / "workflows" / "data" / "demo_prompts.parquet"
    first = SynthConfig.model_validate(synth_config_dict(tiny_zoo, prompts, tmp_path / "rf", order="recaption_first",
                                                         prompts__limit=24, output__shard_size=8))
    second = SynthConfig.model_validate(synth_config_dict(tiny_zoo, prompts, tmp_path / "sf", prompts__limit=24,
                                                          output__shard_size=8))
    run_synth(first)
    run_synth(second)
    rf = {r["key"]: r for r in read_index(tmp_path / "rf").to_pylist()}
    sf = {r["key"]: r for r in read_index(tmp_path / "sf").to_pylist()}
    assert rf.keys() == sf.keys() and len(rf) == 24
    for key, r in rf.items():
        # Same images, same scores, same verdicts; recaption-first also captions the rejected ones.
        assert (r["status"], r["imagereward"], r["mps"]) == (sf[key]["status"], sf[key]["imagereward"], sf[key]["mps"])
        if r["status"] == "accepted":  # captioned in a different batch: equal up to float ties
            assert r["recaption"] and sf[key]["recaption"]
        elif r["imagereward"] is not None:
            assert r["recaption"] != "" and sf[key]["recaption"] == ""
