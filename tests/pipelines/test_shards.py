import json
import tarfile

import webdataset as wds

from pipelines.shards import ShardWriter, complete_shards, read_index, remove_incomplete


def _sample(key, status="accepted", reason=""):
    return {"key": key, "prompt": f"prompt {key}", "seed": 7, "source": "p.parquet", "row": 0, "status": status,
            "reason": reason, "imagereward": 1.0 if status == "accepted" else None, "mps": 2.0 if status == "accepted" else None,
            "recaption": f"caption {key}"}


def _write_shard(out, shard, keys_status):
    w = ShardWriter(out, shard, len(keys_status), {"generator": {"model": "m"}}, "f" * 16)
    for key, status, reason in keys_status:
        w.add(_sample(key, status, reason), b"\xff\xd8fakejpeg" if status == "accepted" else b"", "jpg")
    assert w.done
    return w.close()


def test_writer_layout_and_reading_back(tmp_path):
    stats = _write_shard(tmp_path, 0, [("k0", "accepted", ""), ("k1", "rejected", "mps_below_threshold"),
                                       ("k2", "failed", "generate_error: boom")])
    assert (stats["total"], stats["accepted"], stats["rejected"], stats["failed"]) == (3, 1, 1, 1)
    assert stats["reasons"] == {"generate_error: boom": 1, "mps_below_threshold": 1}
    samples = list(wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["k0"]
    assert samples[0]["txt"] == b"caption k0" and json.loads(samples[0]["json"])["generator"]["model"] == "m"
    assert read_index(tmp_path).column("key").to_pylist() == ["k0", "k1", "k2"]
    assert sorted(complete_shards(tmp_path)) == [0]
    assert stats["writer"]["pid"] > 0 and stats["writer"]["host"]
    assert not list(tmp_path.glob("*.tmp*"))


def test_incomplete_and_truncated_shards_are_not_complete(tmp_path):
    _write_shard(tmp_path, 0, [("a", "accepted", "")])
    _write_shard(tmp_path, 1, [("b", "accepted", "")])
    # A writer killed mid-file leaves a temp file of its own, and shard 2 got its tar but no record.
    (tmp_path / "00002.tar.tmp-123-abcd").write_bytes(b"x" * 1000)
    (tmp_path / "00002.tar").write_bytes(b"x" * 1024)
    # And shard 1's tar gets truncated after the fact.
    tar1 = tmp_path / "00001.tar"
    tar1.write_bytes(tar1.read_bytes()[:700])
    assert sorted(complete_shards(tmp_path)) == [0]
    removed = remove_incomplete(tmp_path, {0})
    assert "00002.tar.tmp-123-abcd" in removed and "00002.tar" in removed and "00001.tar" in removed and "00001_stats.json" in removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json"]
    with tarfile.open(tmp_path / "00000.tar") as t:
        assert t.getnames() == ["a.jpg", "a.json", "a.txt"] and {m.mtime for m in t.getmembers()} == {0}
