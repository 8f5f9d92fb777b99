import json

import numpy as np

from app.cli import main
from pipelines.shards import ShardWriter
from pipelines.stats import shard_summary


def _sample(i, ir, mps, threshold_ir=0.8, threshold_mps=12.0):
    reasons = [r for r, bad in (("imagereward_below_threshold", ir < threshold_ir), ("mps_below_threshold", mps < threshold_mps)) if bad]
    return {"key": f"k{i}", "prompt": f"p{i}", "seed": i, "source": "f", "row": i, "status": "rejected" if reasons else "accepted",
            "reason": ";".join(reasons), "imagereward": ir, "mps": mps, "recaption": "c"}


def test_stats_summary_and_cli(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ir, mps = rng.normal(0.8, 1, 40), rng.normal(12, 2, 40)
    (tmp_path / "manifest.json").write_text(json.dumps({"thresholds": {"imagereward": 0.8, "mps": 12.0}}))
    for shard in (0, 1):
        w = ShardWriter(tmp_path, shard, 20, {}, "f" * 16)
        for i in range(shard * 20, shard * 20 + 20):
            s = _sample(i, float(ir[i]), float(mps[i]))
            w.add(s, b"img", "jpg")
        w.close()
    s = shard_summary(tmp_path)
    accepted = int(((ir >= 0.8) & (mps >= 12.0)).sum())
    assert (s["shards"], s["total"], s["accepted"]) == (2, 40, accepted)
    assert s["reasons"]["mps_below_threshold"]["count"] == int((mps < 12.0).sum())
    assert abs(s["imagereward"]["p50"] - np.percentile(ir, 50)) < 1e-12
    assert main(["shards", "stats", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"accepted {accepted}" in out and "imagereward_below_threshold" in out
    png = tmp_path / "score_histograms.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stats_of_missing_dir(tmp_path, capsys):
    assert main(["shards", "stats", str(tmp_path / "none")]) == 2
    assert "none" in capsys.readouterr().err
