import pyarrow as pa
import pytest

from layton.storage import Root
from pipelines.dedup import run_dedup, shard_duplicates
from pipelines.plan import make_plan
from pipelines.prompts import list_inputs, key_for, prompt_id, prompt_seed, reject_reason, shard_prompts
from stages.synth.config import PromptsConfig
from tests.conftest import write_prompts


def _all(cfg: PromptsConfig, shard_size=3, root=None):
    """Every prompt of the plan's shards, in shard order (dedup verdicts from `root` when given)."""
    plan = make_plan(cfg, shard_size)
    out = []
    for s in range(plan.n_shards):
        i, start, stop = plan.spec(s)
        dups = shard_duplicates(root, cfg, plan, s) if root else {}
        out += shard_prompts(cfg, 0, plan.files[i], start, stop, dups.get("id", set()), dups.get("text", set()))
    return out


def _serial_reference(rows: list[tuple[str, str, object]], cfg: PromptsConfig) -> list[str]:
    """What reading the input once in order gives: (file, id, text) → verdicts."""
    seen_id, seen_text, out = set(), set(), []
    for name, pid, text in rows:
        reason = reject_reason(text, cfg.max_chars)
        if pid in seen_id:
            reason = "duplicate_id"
        seen_id.add(pid)
        if not reason and cfg.dedup:
            if text.strip() in seen_text:
                reason = "duplicate_prompt"
            seen_text.add(text.strip())
        out.append(reason)
    return out


def test_ids_seeds_and_rejections(tmp_path):
    f = write_prompts(tmp_path / "p.parquet", ["a cat", "", None, "a cat", "x" * 50, "a dog", "   "])
    cfg = PromptsConfig(paths=[str(f)], max_chars=20, dedup=False)
    got = _all(cfg)
    assert [p.reject for p in got] == ["", "empty_prompt", "null_prompt", "", "prompt_too_long", "", "empty_prompt"]
    assert [p.id for p in got] == [prompt_id("p.parquet", r) for r in range(7)]
    assert all("." not in p.id for p in got)
    assert [(p.id, p.seed) for p in got] == [(p.id, p.seed) for p in _all(cfg, shard_size=5)]  # stable across plans
    assert got[0].seed == prompt_seed(got[0].id, 0) != prompt_seed(got[0].id, 1)


def test_distributed_dedup_equals_reading_in_order(tmp_path, ray_local):
    texts_a = ["a cat", "a dog", " a cat ", None, "", "a bird", "a dog", "a fox"]
    texts_b = ["a fox", "a cow", "a cat", "a cow", "x" * 50, "a hen", "a bird"]
    ids_a = ["i0", "i1", "i2", "i3", "i4", "i5", "i1", "i7"]  # i1 repeats: that row's text is not "first"
    ids_b = ["j0", "j1", "j2", "i5", "j4", "j5", "j6"]
    a = write_prompts(tmp_path / "a.parquet", texts_a, SAMPLE_ID=pa.array(ids_a))
    b = write_prompts(tmp_path / "b.parquet", texts_b, SAMPLE_ID=pa.array(ids_b))
    for id_column in (None, "SAMPLE_ID"):
        cfg = PromptsConfig(paths=[str(a), str(b)], id_column=id_column, max_chars=20)
        root = Root(tmp_path / f"out-{id_column}")
        plan = make_plan(cfg, 3)
        found = run_dedup(plan, cfg, root, max_partitions=3)
        got = _all(cfg, root=root)
        ids = ids_a + ids_b if id_column else [prompt_id(n, r) for n, t in (("a.parquet", texts_a), ("b.parquet", texts_b))
                                                for r in range(len(t))]
        rows = [(n, pid, t) for (n, t), pid in zip([("a", t) for t in texts_a] + [("b", t) for t in texts_b], ids)]
        assert [p.reject for p in got] == _serial_reference(rows, cfg)
        assert sum(found.values()) == sum(p.reject.startswith("duplicate") for p in got)
        assert len({p.id for p in got}) == len(got)  # a repeated id gets its own key
        assert run_dedup(plan, cfg, root) == found  # the pass's output is reused


def test_id_column_limit_and_sampling(tmp_path):
    f = write_prompts(tmp_path / "p.parquet", [f"prompt {i}" for i in range(200)],
                      SAMPLE_ID=pa.array(range(200), pa.int64()))
    got = _all(PromptsConfig(paths=[str(f)], id_column="SAMPLE_ID", limit=10))
    assert [p.id for p in got] == [str(i) for i in range(10)]
    half = _all(PromptsConfig(paths=[str(f)], id_column="SAMPLE_ID", sample_fraction=0.5))
    assert 70 < len(half) < 130
    assert half == _all(PromptsConfig(paths=[str(f)], id_column="SAMPLE_ID", sample_fraction=0.5))
    assert key_for("x.1") != "x.1" and "." not in key_for("x.1")


def test_non_string_column_and_missing_inputs(tmp_path):
    f = tmp_path / "n.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"TEXT": pa.array([1, 2], pa.int64())}), f)
    got = _all(PromptsConfig(paths=[str(f)], dedup=False))
    assert {p.reject for p in got} == {"non_string_prompt"}
    with pytest.raises(FileNotFoundError, match="nothing.parquet"):
        list_inputs(PromptsConfig(paths=[str(tmp_path / "nothing.parquet")]))
    with pytest.raises(ValueError, match="no column 'caption'"):
        list_inputs(PromptsConfig(paths=[str(f)], text_column="caption"))
