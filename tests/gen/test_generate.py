"""`layton generate`: one prompt, and a prompt file as a Ray Data job that resumes without repeats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def laytongen_dir(gen_inputs, tmp_path_factory) -> Path:
    """An untrained LaytonGen directory: the zoo's tiny GPT, the tiny flan-t5, a stage-1 tokenizer."""
    from layton.laytongen import write_spec

    d = tmp_path_factory.mktemp("laytongen") / "laytongen"
    shutil.copytree(gen_inputs["zoo"] / "llamagen_gpt" / "gpt", d)
    write_spec(d, gen_inputs["zoo"] / "flan-t5-xl", gen_inputs["tokenizer"], 256, {"cfg_scale": 4.0, "top_k": 100})
    return d


def _layton(capsys, *args) -> tuple[int, str, str]:
    from layton.cli import main

    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_one_prompt(laytongen_dir, tmp_path, capsys):
    out = tmp_path / "hydrant.png"
    rc, stdout, stderr = _layton(capsys, "generate", "a red fire hydrant in front of a skyscraper", "-o", out,
                                 "--laytongen", laytongen_dir, "--size", 64, "--steps", 2, "--seed", 7)
    assert rc == 0, stderr
    assert Image.open(out).size == (64, 64)
    rc, stdout, _ = _layton(capsys, "generate", "", "-o", tmp_path / "empty.png", "--laytongen", laytongen_dir,
                            "--size", 64, "--steps", 2)
    assert rc == 0 and "unconditional: empty prompt" in stdout
    rc, _, stderr = _layton(capsys, "generate", "a cat", "-o", tmp_path / "x.png", "--laytongen", tmp_path / "absent")
    assert rc == 2 and "absent" in stderr and "laytongen.json" in stderr


def test_prompt_file_job_records_every_prompt_and_resumes(laytongen_dir, ray_local, tmp_path):
    from layton.laytongen import LaytonGenPipeline
    from pipelines.generate import GenerateSettings, generate_from_file
    from pipelines.prompts import prompt_seed

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\n\n" + "word " * 300 + "\na photo of a cat\n")
    settings = GenerateSettings(size=64, decode_steps=2, seed=5)
    out = tmp_path / "out"
    first = generate_from_file(str(laytongen_dir), str(prompts), str(out), settings, batch_size=2)
    assert (first["generated"], first["failed"], first["already_done"]) == (4, 0, 0)
    meta = {r["id"]: r for r in map(json.loads, (out / "metadata.jsonl").read_text().splitlines())}
    assert sorted(meta) == ["00000", "00001", "00002", "00003"]
    assert meta["00001"]["unconditional"] and not meta["00000"]["unconditional"]
    assert meta["00002"]["truncated"] and meta["00002"]["text_tokens"] == 120
    assert all(Image.open(out / r["file"]).size == (64, 64) for r in meta.values())
    assert meta["00000"]["cfg_scale"] == 4.0 and meta["00000"]["top_k"] == 100  # the directory's defaults

    # The same prompt, seed and settings in-process give the same image: nothing depends on the batch.
    pipe = LaytonGenPipeline.from_pretrained(laytongen_dir)
    (r,) = pipe("a photo of a cat", seed=prompt_seed("00003", 5), size=64, steps=2)
    ours, theirs = np.asarray(r.image, dtype=int), np.asarray(Image.open(out / "images" / "00003.png"), dtype=int)
    assert np.abs(ours - theirs).max() <= 2  # same tokens; float sums may differ by a rounding step across processes

    again = generate_from_file(str(laytongen_dir), str(prompts), str(out), settings)
    assert (again["generated"], again["already_done"]) == (0, 4)
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 4  # no duplicates


def test_prompt_file_errors_name_the_line(tmp_path):
    from pipelines.generate import read_prompt_file

    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a cat"}\n{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="p.jsonl:2"):
        read_prompt_file(bad)
    with pytest.raises(ValueError, match=".csv"):
        read_prompt_file(tmp_path / "p.csv") if (tmp_path / "p.csv").write_text("x") else None
