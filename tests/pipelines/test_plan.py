import pyarrow.parquet as pq

from layton.config import PromptsConfig
from pipelines.plan import write_plan
from pipelines.prompts import read_prompts
from tests.conftest import write_prompts


def _plan(tmp_path, prompts, done_ids=frozenset(), used=frozenset(), name="plan.parquet"):
    summary = write_plan(prompts, set(done_ids), set(used), shard_size=5, batch_size=2, path=tmp_path / name)
    return summary, pq.read_table(summary.path).to_pylist()


def test_shards_and_chunks(tmp_path):
    f = write_prompts(tmp_path / "p.parquet", ["a", "", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"])
    prompts = list(read_prompts(PromptsConfig(paths=[str(f)])))
    summary, rows = _plan(tmp_path, prompts)
    assert (summary.shards, summary.prompts, summary.reader_rejected) == (3, 12, 1)
    by_shard = {}
    for r in rows:
        by_shard.setdefault(r["shard"], []).append(r)
        # a chunk never holds more than batch_size prompts to generate
        assert sum(s == "pending" for s in r["status"]) <= 2
    assert sorted(by_shard) == [0, 1, 2]
    assert [sum(len(r["ids"]) for r in by_shard[s]) for s in (0, 1, 2)] == [5, 5, 2]
    assert all(r["shard_total"] == len(sum((x["ids"] for x in by_shard[r["shard"]]), [])) for r in rows)
    assert rows[0]["status"][:2] == ["pending", "rejected"] and rows[0]["reason"][1] == "empty_prompt"


def test_resume_reproduces_the_remaining_groups(tmp_path):
    f = write_prompts(tmp_path / "p.parquet", [f"prompt {i}" for i in range(23)])
    prompts = list(read_prompts(PromptsConfig(paths=[str(f)])))
    _, full = _plan(tmp_path, prompts)
    # Shards 1, 3 and the short last one (4) finished before a kill.
    done = {i for r in full if r["shard"] in (1, 3, 4) for i in r["ids"]}
    summary, rest = _plan(tmp_path, prompts, done, used={1, 3, 4}, name="resume.parquet")
    assert summary.skipped_done == len(done) and summary.shards == 2
    expected = [r for r in full if r["shard"] in (0, 2)]
    drop_nan = lambda rows: [{k: v for k, v in r.items() if k not in ("imagereward", "mps")} for r in rows]  # noqa: E731
    assert drop_nan(rest) == drop_nan(expected)  # same shard numbers, same chunks, same seeds
