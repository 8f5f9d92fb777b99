import numpy as np
import pytest

from pipelines.plan import ShardPlan, make_plan
from pipelines.prompts import InputFile, shard_prompts
from stages.synth.config import PromptsConfig
from tests.conftest import write_prompts


def _plan(rows, per, limit=None):
    return ShardPlan(tuple(InputFile(f"/d/f{i}.parquet", f"f{i}.parquet", n) for i, n in enumerate(rows)), per, limit)


def test_shards_are_row_ranges_of_files():
    plan = _plan([12, 0, 5], per=5)
    assert plan.n_shards == 4 and plan.n_rows == 17
    assert [plan.spec(s) for s in range(4)] == [(0, 0, 5), (0, 5, 10), (0, 10, 12), (2, 0, 5)]
    np.testing.assert_array_equal(plan.shard_of(np.array([0, 4, 5, 11, 12, 16])), [0, 0, 1, 2, 3, 3])
    with pytest.raises(IndexError):
        plan.spec(4)


def test_limit_keeps_the_first_input_rows():
    plan = _plan([12, 5], per=5, limit=14)
    assert plan.n_rows == 14 and [plan.spec(s) for s in range(plan.n_shards)] == [(0, 0, 5), (0, 5, 10), (0, 10, 12), (1, 0, 2)]
    # The plan is a pure function of the inputs: the same shards whatever was done before.
    assert plan.describe() == _plan([12, 5], per=5, limit=14).describe()


def test_plan_from_files_and_sampling(tmp_path):
    a = write_prompts(tmp_path / "a.parquet", [f"a{i}" for i in range(23)])
    b = write_prompts(tmp_path / "b.parquet", [f"b{i}" for i in range(7)])
    plan = make_plan(PromptsConfig(paths=[str(tmp_path)]), shard_size=10)
    assert [f.name for f in plan.files] == ["a.parquet", "b.parquet"] and plan.n_shards == 4
    cfg = PromptsConfig(paths=[str(a), str(b)], sample_fraction=0.5)
    sampled = make_plan(cfg, shard_size=5)
    assert sampled.rows_per_shard == 10  # a shard spans shard_size / fraction rows: ~shard_size prompts
    got = [p for s in range(sampled.n_shards) for p in shard_prompts(cfg, 0, sampled.files[sampled.spec(s)[0]], *sampled.spec(s)[1:])]
    assert 8 < len(got) < 22 and len({p.id for p in got}) == len(got)


def test_two_files_of_one_name_fail_without_an_id_column(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    write_prompts(tmp_path / "x" / "p.parquet", ["a"])
    write_prompts(tmp_path / "y" / "p.parquet", ["b"])
    with pytest.raises(ValueError, match="share the file name"):
        make_plan(PromptsConfig(paths=[str(tmp_path)]), 4)
