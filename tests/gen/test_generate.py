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
    from layton.gpt import GPT
    from layton.laytongen import save_laytongen

    d = tmp_path_factory.mktemp("laytongen") / "laytongen"
    return save_laytongen(d, GPT.from_pretrained(gen_inputs["zoo"] / "llamagen_gpt" / "gpt"), text_encoder=gen_inputs["zoo"] / "flan-t5-xl",
                          tokenizer=gen_inputs["tokenizer"], image_size=256, sampling={"cfg_scale": 4.0, "top_k": 100})


def _layton(capsys, *args) -> tuple[int, str, str]:
    from app.cli import main

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
    assert rc == 2 and "absent" in stderr and "not a LaytonGen directory" in stderr


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


def _write_legacy_laytongen(gpt_dir: Path, spec: dict, out: Path) -> Path:
    """A LaytonGen directory in the first layout: the GPT files with `laytongen.json` beside them."""
    shutil.copytree(gpt_dir, out)
    (out / "laytongen.json").write_text(json.dumps({"format": "laytongen/1", **spec}))
    return out


def test_directory_is_self_contained_and_moves(laytongen_dir, gen_inputs, tmp_path):
    from layton.laytongen import LaytonGenPipeline

    index = json.loads((laytongen_dir / "model_index.json").read_text())
    assert index["gpt"] == ["layton.gpt", "GPT"] and index["tokenizer"] == ["layton.tokenizer", "LaytonTokenizer"]
    assert (index["image_size"], index["sampling"]["cfg_scale"]) == (256, 4.0)
    assert sorted(p.name for p in laytongen_dir.iterdir()) == ["gpt", "model_index.json", "tokenizer"]
    assert sorted(p.name for p in (laytongen_dir / "tokenizer").iterdir()) == sorted(
        p.name for p in gen_inputs["tokenizer"].iterdir())  # a copy of the tokenizer directory
    original = shutil.copytree(laytongen_dir, tmp_path / "original")
    ref = LaytonGenPipeline.from_pretrained(original)("a photo of a cat", seed=11, size=64, steps=2)[0]
    moved = shutil.copytree(original, tmp_path / "elsewhere" / "moved")
    shutil.rmtree(original)
    pipe = LaytonGenPipeline.from_pretrained(moved)
    assert pipe.spec["tokenizer"] == str(moved / "tokenizer")
    got = pipe("a photo of a cat", seed=11, size=64, steps=2)[0]
    assert np.array_equal(got.tokens.numpy(), ref.tokens.numpy())
    assert np.array_equal(np.asarray(got.image), np.asarray(ref.image))


def test_legacy_directory_is_refused_and_converts(laytongen_dir, gen_inputs, tmp_path):
    from layton.laytongen import LaytonGenPipeline, convert_legacy_laytongen
    from layton.model_files import ModelFileError
    from layton.tokenizer import LaytonTokenizer
    from pipelines.generate import check_laytongen_dir
    from tests.tokenizer.test_tokenizer import write_legacy_tokenizer

    spec = {"text_encoder": str(gen_inputs["zoo"] / "flan-t5-xl"), "tokenizer": str(gen_inputs["tokenizer"]),
            "image_size": 256, "sampling": {"cfg_scale": 4.0, "top_k": 100}}
    legacy = _write_legacy_laytongen(laytongen_dir / "gpt", spec, tmp_path / "legacy")
    for call in (lambda: LaytonGenPipeline.from_pretrained(legacy), lambda: check_laytongen_dir(str(legacy))):
        with pytest.raises(ModelFileError, match=f"{legacy}.*old layout.*layton convert laytongen.*convert_legacy_laytongen"):
            call()
    ref = LaytonGenPipeline.from_pretrained(laytongen_dir)("a red car", seed=2, size=64, steps=2)[0]
    # Its tokenizer may be in either layout: an old one is converted into the new directory.
    legacy_tok = write_legacy_tokenizer(LaytonTokenizer.from_pretrained(gen_inputs["tokenizer"]), tmp_path / "legacy_tok")
    legacy_both = _write_legacy_laytongen(laytongen_dir / "gpt", {**spec, "tokenizer": str(legacy_tok)}, tmp_path / "legacy_both")
    for src, dst in ((legacy, tmp_path / "new"), (legacy_both, tmp_path / "new_both")):
        new = convert_legacy_laytongen(src, dst)
        check_laytongen_dir(str(new))
        got = LaytonGenPipeline.from_pretrained(new)("a red car", seed=2, size=64, steps=2)[0]
        assert np.array_equal(got.tokens.numpy(), ref.tokens.numpy())
        assert np.array_equal(np.asarray(got.image), np.asarray(ref.image))
    with pytest.raises(ModelFileError, match="pass tokenizer="):
        convert_legacy_laytongen(_write_legacy_laytongen(laytongen_dir / "gpt", {**spec, "tokenizer": "/moved/tok"},
                                                         tmp_path / "legacy_moved"), tmp_path / "x")


def test_gpt_of_a_laytongen_directory(laytongen_dir, gen_inputs):
    """What LaytonGen training reads: `model.init_from` (a LaytonGen or GPT directory) and a checkpoint's weights."""
    import torch

    from layton.gpt import GPT
    from layton.laytongen import gpt_directory, load_gpt_state_dict

    zoo_gpt = gen_inputs["zoo"] / "llamagen_gpt"
    assert gpt_directory(laytongen_dir) == laytongen_dir / "gpt"
    assert gpt_directory(zoo_gpt / "gpt") == zoo_gpt / "gpt"
    assert gpt_directory(zoo_gpt / "t2i_tiny_stage1_256.pt") is None  # a LlamaGen release: loaded by load_llamagen_gpt
    sd, ref = load_gpt_state_dict(laytongen_dir), GPT.from_pretrained(zoo_gpt / "gpt").state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
