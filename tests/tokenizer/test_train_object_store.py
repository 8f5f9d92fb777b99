"""Training straight on object storage (moto's S3 server), the file order of every epoch, and the
CPUs the training workers must leave to Ray Data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from layton.storage import Root, join
from stages.tokenizer.config import TokenizerTrainConfig
from tests.conftest import ROOT
from tests.tokenizer.conftest import encoded, tokenizer_config_dict, write_photo_shards
from workflows.train_resources import check_data_cpus

FAST = dict(stage1__max_steps=2, stage1__checkpoint_every=2, stage1__log_every=1, stage1__image_every=2,
            stage1__resolution_schedule=[[0, 64]], stage1__batch_size=2, stage2__resolution_schedule=[[0, 64]],
            model__encoder_sizes=[256], data__cache_in_memory=True)


def _files(where: Path) -> set[str]:
    return {str(p.relative_to(where)) for p in where.rglob("*")}


def test_stage1_trains_checkpoints_and_resumes_on_the_bucket(s3, tiny_zoo, ray_local, tmp_path, monkeypatch):
    import ray

    from workflows.train_tokenizer import run_tokenizer_stage

    # The workers reach the bucket through the AWS env of the Ray they run in (a cluster's nodes have theirs).
    env = ray.get(ray.remote(lambda: os.environ.get("AWS_ENDPOINT_URL")).remote())
    assert env == s3.url, "the session's Ray was started before the s3 fixture set the AWS env"
    monkeypatch.setenv("LAYTON_CACHE", str(tmp_path / "cache"))
    base = f"s3://{s3.bucket}/object-store"
    write_photo_shards(join(base, "shards"))
    raw = tokenizer_config_dict(tiny_zoo, Path("."), Path("."), **FAST)
    raw["data"]["shards"], raw["run"]["storage_path"] = [join(base, "shards")], join(base, "train")
    config = TokenizerTrainConfig.model_validate(raw)
    before = _files(tmp_path)

    r1 = run_tokenizer_stage(config, 1)
    assert (r1.step, r1.skipped, r1.export) == (2, False, join(base, "train", "tokenizer-stage1", "tokenizer"))
    job = Root(config.stage_dir(1)).list(recursive=True)
    assert any(n.startswith("checkpoint_") and n.endswith("/optimizer.safetensors") for n in job)
    assert "grids/step_0000002.png" in job and any(n.startswith("tensorboard/events.out.tfevents") for n in job)
    assert {"tokenizer/model_index.json", "tokenizer/trainer_state.json"} <= set(job)
    assert "tokenizer/optimizer.safetensors" not in job  # exports hold no optimizer
    history = [json.loads(line) for line in Root(config.stage_dir(1)).read("history.jsonl").splitlines()]
    assert [(h["step"], h["resumed_from"]) for h in history] == [(1, 0), (2, 0)]
    precomputed = Root(config.precompute_path()).list()
    assert "_complete.json" in precomputed and any(n.endswith(".parquet") for n in precomputed)
    assert r1.precompute["usable"] == 6

    # More steps: Ray Train restores the run from the bucket's checkpoint and goes on from step 2.
    longer = config.model_copy(update={"stage1": config.stage1.model_copy(update={"max_steps": 3})})
    r2 = run_tokenizer_stage(longer, 1)
    assert r2.step == 3 and r2.precompute == r1.precompute  # the pass in the bucket is reused
    history = [json.loads(line) for line in Root(config.stage_dir(1)).read("history.jsonl").splitlines()]
    assert [(h["step"], h["resumed_from"]) for h in history] == [(1, 0), (2, 0), (3, 2)]
    again = run_tokenizer_stage(longer, 1)  # complete: nothing runs
    assert again.skipped and again.step == 3

    # Nothing was written locally but the node cache (a URI put through pathlib would show as `s3:/...`).
    assert not any((d / "s3:").exists() for d in (ROOT, Path.cwd(), tmp_path))
    assert {p for p in _files(tmp_path) - before if not p.startswith("cache")} == set()


def test_epochs_read_the_shard_files_in_new_orders(ray_local, tmp_path):
    import numpy as np
    import ray
    from PIL import Image

    from pipelines.precompute import training_read
    from pipelines.shards import write_image_shards
    from pipelines.tokenizer_data import read_shard_images
    from stages.tokenizer.config import TokenizerDataConfig
    from workflows.train_common import EpochBatches

    img = encoded(Image.fromarray(np.zeros((8, 8, 3), np.uint8)))
    keys = [f"s{i:02d}" for i in range(8)]
    write_image_shards(tmp_path / "shards", [(k, k, img, "jpg") for k in keys], shard_size=1)  # a file each

    def epochs(**data) -> list[list[str]]:
        cfg = TokenizerDataConfig(shards=[str(tmp_path / "shards")], shuffle_buffer=0, **data)  # no row shuffle
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # rows in file order: the order the read was given
        try:
            # One read task (in one worker) for the files, in the order the read gives them.
            ds = read_shard_images(cfg.shards, **training_read(cfg), override_num_blocks=1)
        finally:
            ctx.execution_options.preserve_order = False
        batches = EpochBatches(ds.iterator(), 8, cfg, rank=0)  # each epoch a new execution, as a worker's shard
        return [[str(k) for rows in batches.epoch(n) for k in rows["key"]] for n in (1, 2)]

    first, second = epochs()
    assert sorted(first) == sorted(second) == keys and first != second  # every file, in a new order
    assert epochs()[0] == first  # seeded by data.shuffle_seed
    assert epochs(shuffle_seed=1)[0] != first
    assert epochs(shuffle_files=False) == [keys, keys]


@pytest.mark.parametrize("nodes,workers,cpus,strategy,left", [
    ([4], 2, 1, "PACK", 2),
    ([2, 2], 2, 1, "PACK", 2),  # both on one node: the other is free
    ([2, 2], 2, 1, "SPREAD", 1),
    ([4, 4], 2, 3, "STRICT_SPREAD", 1),
    ([8, 2], 2, 3, "STRICT_PACK", 2),
])
def test_placements_that_leave_a_cpu_for_ray_data(nodes, workers, cpus, strategy, left):
    from workflows.train_resources import free_after_placement

    free = free_after_placement([{"CPU": n} for n in nodes], workers, {"CPU": cpus}, strategy)
    assert max(n["CPU"] for n in free) == left
    check_data_cpus([{"CPU": n} for n in nodes], workers=workers, cpus_per_worker=cpus, strategy=strategy)


def test_placements_that_starve_ray_data_fail_naming_the_numbers():
    with pytest.raises(ValueError, match=r"2 worker\(s\) × 1.5 CPU\(s\) \(PACK\) on nodes of 2, 2 CPUs leave at most "
                                         r"0.5 CPU on a node; Ray Data's read tasks need 1 CPU.*run.cpus_per_worker"):
        check_data_cpus([{"CPU": 2}, {"CPU": 2}], workers=2, cpus_per_worker=1.5)
    with pytest.raises(ValueError, match="need 1.5 CPU"):
        check_data_cpus([{"CPU": 2}, {"CPU": 2}], workers=2, cpus_per_worker=1, strategy="SPREAD", read_cpus=1.5)
    with pytest.raises(ValueError, match=r"3 worker\(s\) × 1 CPU\(s\) \(STRICT_PACK\) do not fit"):
        check_data_cpus([{"CPU": 2}, {"CPU": 2}], workers=3, cpus_per_worker=1, strategy="STRICT_PACK")
    with pytest.raises(ValueError, match="STRICT_SPREAD.*do not fit"):
        check_data_cpus([{"CPU": 8}, {"CPU": 8}], workers=3, cpus_per_worker=1, strategy="STRICT_SPREAD")
    # GPU workers go where the GPUs are, whatever the CPUs elsewhere.
    gpu_nodes = [{"CPU": 8}, {"CPU": 4, "GPU": 1}]
    check_data_cpus(gpu_nodes, workers=1, cpus_per_worker=4, gpus_per_worker=1)
    with pytest.raises(ValueError, match="do not fit"):
        check_data_cpus(gpu_nodes, workers=2, cpus_per_worker=1, gpus_per_worker=1)


def test_the_cpu_check_runs_on_the_live_cluster_before_training(tiny_zoo, photo_shards, ray_local, tmp_path):
    from workflows.train_tokenizer import run_tokenizer_stage

    cpus = int(sum(n["Resources"].get("CPU", 0) for n in ray_local.nodes() if n["Alive"]))
    config = TokenizerTrainConfig.model_validate(tokenizer_config_dict(
        tiny_zoo, photo_shards, tmp_path / "runs", **FAST, run__num_workers=cpus))
    with pytest.raises(ValueError, match=f"{cpus} worker.*on nodes of {cpus} CPUs leave at most 0 CPU"):
        run_tokenizer_stage(config, 1)
    assert not (tmp_path / "runs").exists()


def test_metrics_log_writes_history_grids_and_rolling_event_files_to_the_bucket(s3, tmp_path, monkeypatch):
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import workflows.train_common as tc

    monkeypatch.setattr(tc, "TB_ROLL_BYTES", 1)  # a new event file after every flush
    job = f"s3://{s3.bucket}/metrics-log/job"
    mlog = tc.MetricsLog(job, 0, "stage1", resumed_from=0)
    for step in (1, 2):
        mlog.add(float(step), 2)
        mlog.flush(step)
    mlog.save_grid("grids/step_0000002.png", torch.zeros(2, 3, 8, 8), 2, "reconstruction", 2)
    mlog.close()
    resumed = tc.MetricsLog(job, 0, "stage1", resumed_from=2)  # the lines before are kept
    resumed.add(3.0, 2)
    resumed.flush(3)
    resumed.close()

    root = Root(job)
    history = [json.loads(line) for line in root.read("history.jsonl").splitlines()]
    assert [(h["step"], h["loss"], h["resumed_from"]) for h in history] == [(1, 1.0, 0), (2, 2.0, 0), (3, 3.0, 2)]
    assert root.read("grids/step_0000002.png").startswith(b"\x89PNG")
    events = sorted(root.sub("tensorboard").list())
    assert len(events) >= 3
    assert not Path(mlog.tb.dir).exists()  # the local copies are gone once uploaded
    for name in events:
        (tmp_path / name).write_bytes(root.read(f"tensorboard/{name}"))
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0}).Reload()
    assert [e.step for e in acc.Scalars("stage1/loss")] == [1, 2, 3]
    assert [e.step for e in acc.Images("reconstruction")] == [2]
