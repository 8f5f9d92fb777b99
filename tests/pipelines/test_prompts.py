import pyarrow as pa
import pytest

from layton.config import PromptsConfig
from pipelines.prompts import check_prompt_files, prompt_seed, read_prompts
from tests.conftest import write_prompts


def test_ids_seeds_and_rejections(tmp_path):
    f = write_prompts(tmp_path / "p.parquet", ["a cat", "", None, "a cat", "x" * 50, "a dog", "   "])
    got = list(read_prompts(PromptsConfig(paths=[str(f)], max_chars=20)))
    assert [p.reject for p in got] == ["", "empty_prompt", "null_prompt", "duplicate_prompt", "prompt_too_long", "", "empty_prompt"]
    assert len({p.id for p in got}) == len(got)
    assert all("." not in p.id for p in got)
    again = list(read_prompts(PromptsConfig(paths=[str(f)], max_chars=20)))
    assert [(p.id, p.seed) for p in got] == [(p.id, p.seed) for p in again]  # stable across runs
    assert got[0].seed == prompt_seed(got[0].id, 0) != prompt_seed(got[0].id, 1)


def test_id_column_limit_and_sampling(tmp_path):
    f = write_prompts(tmp_path / "p.parquet", [f"prompt {i}" for i in range(200)],
                      SAMPLE_ID=pa.array(range(200), pa.int64()))
    got = list(read_prompts(PromptsConfig(paths=[str(f)], id_column="SAMPLE_ID", limit=10)))
    assert [p.id for p in got] == [str(i) for i in range(10)]
    half = list(read_prompts(PromptsConfig(paths=[str(f)], id_column="SAMPLE_ID", sample_fraction=0.5)))
    assert 70 < len(half) < 130
    assert half == list(read_prompts(PromptsConfig(paths=[str(f)], id_column="SAMPLE_ID", sample_fraction=0.5)))


def test_repeated_ids_get_their_own_key(tmp_path):
    f = write_prompts(tmp_path / "p.parquet", ["a", "b", "c"], SAMPLE_ID=pa.array(["x.1", "y", "y"]))
    got = list(read_prompts(PromptsConfig(paths=[str(f)], id_column="SAMPLE_ID")))
    assert len({p.id for p in got}) == 3 and "." not in got[0].id
    assert [p.reject for p in got] == ["", "", "duplicate_id"]


def test_non_string_column_and_missing_inputs(tmp_path):
    f = tmp_path / "n.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"TEXT": pa.array([1, 2], pa.int64())}), f)
    got = list(read_prompts(PromptsConfig(paths=[str(f)])))
    assert {p.reject for p in got} == {"non_string_prompt"}
    with pytest.raises(FileNotFoundError, match="nothing.parquet"):
        check_prompt_files(PromptsConfig(paths=[str(tmp_path / "nothing.parquet")]))
    with pytest.raises(ValueError, match="no column 'caption'"):
        check_prompt_files(PromptsConfig(paths=[str(f)], text_column="caption"))
