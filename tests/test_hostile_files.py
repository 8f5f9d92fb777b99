"""Hostile and broken input files (issue 16): each fails before Ray, with one clear message naming it.

2. a model directory missing a file its own index names;
3. a prompt parquet file with a corrupt data page (footer intact);
4. a `.pt` holding pickled code, given to every `weights_only` loader;
5. a pickle that would mutate the loading process's objects through the restricted unpickler.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
import traceback
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from layton.model_files import ModelFileError, check_model_dir, check_synth_models, load_torch_state_dict
from stages.synth.config import SynthConfig
from tests.conftest import synth_config_dict, write_prompts

# ----------------------------------------------------------------- 2. model directories, checked by their index


def _copy(zoo, name, tmp_path):
    return shutil.copytree(zoo / name, tmp_path / name)


def _synth_cfg(zoo, tmp_path, **overrides) -> SynthConfig:
    prompts = write_prompts(tmp_path / "p.parquet", ["a cat"])
    return SynthConfig.model_validate(synth_config_dict(zoo, prompts, tmp_path / "out", **overrides))


def test_tiny_zoo_passes_the_deep_checks(tiny_zoo, tmp_path):
    check_synth_models(_synth_cfg(tiny_zoo, tmp_path))
    check_model_dir(tiny_zoo / "sdxl", "model.sdxl", marker="model_index.json")
    for name in ("flan-t5-xl", "mask2former", "sdxl/vae", "llamagen_gpt/gpt"):
        check_model_dir(tiny_zoo / name, name)


@pytest.mark.parametrize("model, missing, what", [
    ("flux", "transformer/diffusion_pytorch_model.safetensors", "generation.model (transformer/)"),
    ("flux", "transformer/config.json", "generation.model (transformer/)"),
    ("flux", "text_encoder_2/model.safetensors", "generation.model (text_encoder_2/)"),
    ("flux", "scheduler/scheduler_config.json", "generation.model (scheduler/)"),
    ("flux", "tokenizer/merges.txt", "generation.model (tokenizer/)"),
    ("flux", "vae", "generation.model (vae/)"),
    ("qwen2vl", "model.safetensors", "recaption.model"),
    ("qwen2vl", "tokenizer.json", "recaption.model"),
])
def test_synth_check_names_a_file_missing_from_a_model_dir(tiny_zoo, tmp_path, model, missing, what):
    copy = _copy(tiny_zoo, model, tmp_path)
    gone = copy / missing
    shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
    field = {"flux": "generation__model", "qwen2vl": "recaption__model"}[model]
    cfg = _synth_cfg(tiny_zoo, tmp_path, **{field: str(copy)})
    with pytest.raises(ModelFileError) as err:
        check_synth_models(cfg)
    assert str(err.value).startswith(f"{what}: {gone} does not exist"), err.value


def test_sdxl_unet_weights_are_checked(tiny_zoo, tmp_path):
    copy = _copy(tiny_zoo, "sdxl", tmp_path)
    (copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFileError, match=rf"model.sdxl \(unet/\): {re.escape(str(copy))}/unet/diffusion_pytorch_model.safetensors"):
        check_model_dir(copy, "model.sdxl", marker="model_index.json")


def test_unparseable_component_config_is_named(tiny_zoo, tmp_path):
    copy = _copy(tiny_zoo, "flux", tmp_path)
    (copy / "transformer" / "config.json").write_text("{")
    with pytest.raises(ModelFileError, match=rf"generation.model \(transformer/\): {re.escape(str(copy))}/transformer/config.json is not valid JSON"):
        check_model_dir(copy, "generation.model", marker="model_index.json")


def test_every_shard_an_index_names_must_exist(tiny_zoo, tmp_path):
    copy = _copy(tiny_zoo, "qwen2vl", tmp_path)
    tensors = load_file(str(copy / "model.safetensors"))
    (copy / "model.safetensors").unlink()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: tensors[k].contiguous() for k in part}, str(copy / name))
    weight_map = {k: name for name, part in shards.items() for k in part}
    (copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    check_model_dir(copy, "recaption.model")  # sharded as transformers writes it: fine
    (copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFileError, match=rf"recaption.model: {re.escape(str(copy))}/model-00002-of-00002.safetensors does not "
                                             r"exist \(a shard named by model.safetensors.index.json\)"):
        check_model_dir(copy, "recaption.model")


# ----------------------------------------------------------------- 3. a prompt file with a corrupt data page


def _corrupt_prompt_file(path, column="TEXT"):
    """3000 prompts in row groups of 1000; row group 1's text page header overwritten, footer intact."""
    texts = [f"a photo of thing number {i}" for i in range(3000)]
    pq.write_table(pa.table({column: texts}), path, row_group_size=1000, compression="none")
    meta = pq.ParquetFile(path).metadata
    chunk = meta.row_group(1).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start:start + 16] = b"\xff" * 16
    path.write_bytes(bytes(raw))
    assert pq.ParquetFile(path).metadata.num_rows == 3000  # the footer still reads
    return path


def test_corrupt_prompt_page_fails_the_check_naming_file_and_row_group(tiny_zoo, tmp_path):
    from pipelines.synth import run_synth
    from stages.synth.stage import SynthStage

    bad = _corrupt_prompt_file(tmp_path / "laion-part-7.parquet")
    cfg = SynthConfig.model_validate(synth_config_dict(tiny_zoo, bad, tmp_path / "out"))
    pattern = rf"prompts: {re.escape(str(bad))}: row group 1 \(rows 1000-2000\) cannot be read"
    with pytest.raises(ValueError, match=pattern):
        SynthStage().check(cfg)  # what `layton synth` and a workflow run first
    with pytest.raises(ValueError, match=pattern):
        run_synth(cfg)  # the job itself, before its output exists
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------- 4. pickled code given to the weights_only loaders


class _System:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.cmd = f"touch {marker}"

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_pickled_code_is_refused_with_one_message_everywhere(tiny_zoo, tmp_path):
    from layton.perceptual import build_lpips, load_lpips_backbone
    from layton.scorers.facescore import FaceScoreScorer
    from layton.scorers.imagereward import ImageRewardScorer, read_imagereward_state_dict

    live = tmp_path / "live"
    run, args = _System(live).__reduce__()  # what unpickling would call, called directly
    run(*args)
    assert live.exists()  # the payload is real: the loaders below would notice if it ran

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"features.0.weight": torch.zeros(2), "x": _System(marker)}, evil)
    ir, fs = tiny_zoo / "imagereward", tiny_zoo / "facescore"
    loaders = [
        ("ImageReward checkpoint", lambda: read_imagereward_state_dict(evil)),
        ("ImageReward checkpoint", lambda: ImageRewardScorer.from_release(evil, ir / "med_config.json", ir / "tokenizer")),
        ("FaceScore checkpoint", lambda: FaceScoreScorer(evil, fs / "med_config.json", fs / "tokenizer")),
        ("LPIPS backbone", lambda: load_lpips_backbone(build_lpips("alex", random_backbone=True), evil)),
        ("LlamaGen VQ", lambda: load_torch_state_dict(evil, "LlamaGen VQ")),
    ]
    tails = set()
    for what, load in loaders:
        with pytest.raises(ValueError) as err:
            load()
        msg = str(err.value)
        assert msg.startswith(f"{what}: {evil} holds pickled code or objects that are not plain tensors"), msg
        assert "refusing to unpickle" in msg and "posix.system" in msg
        shown = "".join(traceback.format_exception(err.value))  # what the user sees, chained errors included
        assert "weights_only=False" not in shown and "add_safe_globals" not in shown, shown
        tails.add(msg.split(str(evil), 1)[1])
    assert len(tails) == 1, tails  # the same words after the file's name
    assert not marker.exists()


# ----------------------------------------------------------------- 5. the restricted unpickler mutates nothing of the process


def _torch_zip(path, data: bytes):
    """`data` as the data.pkl of a torch zip checkpoint (the layout `restricted_load` reads)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/byteorder", "little")
    return path


def _text(s: str) -> bytes:
    b = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


# BUILD with state (None, {"__defaults__": (...)}) does setattr(target, "__defaults__", ...);
# with a plain dict state it writes into target.__dict__.
_DEFAULTS = pickle.NONE + pickle.EMPTY_DICT + _text("__defaults__") + _text("poisoned") + pickle.TUPLE1 + pickle.SETITEM + pickle.TUPLE2
_DICT = pickle.EMPTY_DICT + _text("poisoned") + pickle.NEWTRUE + pickle.SETITEM
PAYLOADS = {
    "defaults": pickle.PROTO + b"\x02" + _global("torch._utils", "_rebuild_tensor_v2") + _DEFAULTS + pickle.BUILD + pickle.STOP,
    "dict": pickle.PROTO + b"\x02" + _global("torch._utils", "_rebuild_parameter") + _DICT + pickle.BUILD + pickle.STOP,
    "setitem": pickle.PROTO + b"\x02" + _global("torch._utils", "_rebuild_tensor_v2") + _text("k") + pickle.NONE
               + pickle.SETITEM + pickle.STOP,
    "appends": pickle.PROTO + b"\x02" + _global("collections", "OrderedDict") + pickle.MARK + pickle.NONE
               + pickle.APPENDS + pickle.STOP,
}


def _function_state():
    import layton.scorers.restricted_unpickle as ru

    fns = [torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, torch._utils._rebuild_tensor,
           ru._rebuild_tensor, ru._rebuild_parameter, ru._rebuild_from_type]
    return [(f.__defaults__, f.__kwdefaults__, dict(f.__dict__)) for f in fns]


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_restricted_unpickler_mutates_no_object_of_the_process(tmp_path, payload):
    from layton.scorers.restricted_unpickle import read_module_tensors

    before = _function_state()
    path = _torch_zip(tmp_path / f"{payload}.pth", PAYLOADS[payload])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: could not read checkpoint: .*refused"):
        read_module_tensors(path)
    assert _function_state() == before
