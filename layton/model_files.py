"""Checks that every configured weight file is present and readable, before any cluster work.

The checks are cheap (headers and directory listings, no weights loaded) so a run with a typo in
a path or a truncated download fails in seconds with the path in the message, instead of after
Ray has started actors.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import zipfile
from pathlib import Path

import torch

from safetensors import safe_open


class ModelFileError(FileNotFoundError):
    """A configured model path that is absent or unreadable; the message names it."""


def _check_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{what}: {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{what}: {path} is not valid JSON ({e})") from None


def _check_safetensors(path: Path, what: str) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise ModelFileError(f"{what}: {path} is not a readable safetensors file ({e})") from None


def _check_torch_zip(path: Path, what: str) -> None:
    # torch.save writes a zip; a truncated file loses the central directory at its end.
    if not path.is_file():
        raise ModelFileError(f"{what}: {path} does not exist")
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except zipfile.BadZipFile as e:
        raise ModelFileError(f"{what}: {path} is not a readable torch checkpoint ({e})") from None


def check_file(path: str | Path, what: str) -> Path:
    """A single weight or config file, checked by its suffix."""
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{what}: {p} does not exist")
    if p.suffix == ".json":
        _check_json(p, what)
    elif p.suffix == ".safetensors":
        _check_safetensors(p, what)
    elif p.suffix in (".pt", ".pth", ".bin"):
        _check_torch_zip(p, what)
    return p


def _hub_snapshot(repo_id: str, what: str) -> Path:
    """A hub id is accepted only when it is already in the local cache: nothing is downloaded."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        raise ModelFileError(
            f"{what}: {repo_id!r} is neither a local directory nor a cached hub model "
            "(downloads are never started by a run: fetch the weights first and give their path)"
        ) from None


def _check_weights(d: Path, what: str) -> None:
    """A model directory's weights: every shard a `*.safetensors.index.json` (or transformers' older
    `*.bin.index.json`) names, or one `*.safetensors` (or `.bin`, which loaders read `weights_only`)."""
    indexes = sorted(d.glob("*.safetensors.index.json")) + sorted(d.glob("*.bin.index.json"))
    for index in indexes:
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelFileError(f"{what}: {index} is not a weights index (no readable weight_map: {e!r:.200})") from None
        for shard in sorted(map(str, shards)):
            # A shard is a file beside its index; a path that leaves the directory is no release's.
            if Path(shard).name != shard or shard in ("", ".", ".."):
                raise ModelFileError(f"{what}: {index} names a shard outside its directory: {shard!r:.200}")
            if not (d / shard).is_file():
                raise ModelFileError(f"{what}: {d / shard} does not exist (a shard named by {index.name})")
    singles = sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin"))
    if not indexes and not singles:
        config = _check_json(d / "config.json", what)
        diffusers = isinstance(config, dict) and "_diffusers_version" in config
        name = "diffusion_pytorch_model.safetensors" if diffusers else "model.safetensors"
        raise ModelFileError(f"{what}: {d / name} does not exist (no weights in {d}: neither *.safetensors "
                             "nor *.safetensors.index.json with its shards)")


def _check_tokenizer(d: Path, what: str) -> None:
    """`tokenizer_config.json` and a vocabulary: `tokenizer.json`, or the slow tokenizer's files."""
    _check_json(d / "tokenizer_config.json", what)
    if (d / "tokenizer.json").is_file() or (d / "vocab.txt").is_file() or any(d.glob("*.model")):
        return  # fast tokenizer / WordPiece / SentencePiece
    if (d / "vocab.json").is_file():  # BPE (CLIP, Qwen2) needs its merges too
        if not (d / "merges.txt").is_file():
            raise ModelFileError(f"{what}: {d / 'merges.txt'} does not exist (the BPE merges beside vocab.json)")
        return
    raise ModelFileError(f"{what}: {d / 'tokenizer.json'} does not exist (nor vocab.json + merges.txt, vocab.txt "
                         f"or spiece.model: {d} holds no tokenizer vocabulary)")


def _check_component(d: Path, what: str, class_name: str) -> None:
    """One subfolder of a diffusers pipeline, checked by what `save_pretrained` writes for its class."""
    if not d.is_dir():
        raise ModelFileError(f"{what}: {d} does not exist (model_index.json names it: {class_name})")
    if "Scheduler" in class_name:
        _check_json(d / "scheduler_config.json", what)
    elif "Tokenizer" in class_name:
        _check_tokenizer(d, what)
    elif class_name.endswith(("ImageProcessor", "FeatureExtractor")):
        _check_json(d / "preprocessor_config.json", what)
    else:  # a model: its config and its weights
        _check_json(d / "config.json", what)
        _check_weights(d, what)


def _check_pipeline(p: Path, what: str) -> None:
    """Every component the pipeline's `model_index.json` names with a library and a class."""
    index = json.loads((p / "model_index.json").read_text())
    if not isinstance(index, dict):
        raise ModelFileError(f"{what}: {p / 'model_index.json'} is not a JSON object")
    for name, entry in sorted(index.items()):
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
            continue  # _class_name, _diffusers_version, flags such as force_zeros_for_empty_prompt
        library, class_name = entry
        if library is None or class_name is None:
            continue  # an optional component the pipeline does not use (feature_extractor: [null, null])
        _check_component(p / name, f"{what} ({name}/)", str(class_name))


def check_model_dir(path: str | Path, what: str, marker: str = "config.json") -> Path:
    """A `save_pretrained` directory: `marker` must parse and every safetensors header must read.

    A model directory (`config.json`) must hold its weights (every shard its index names); a pipeline
    (`model_index.json`) every component its index names. So a partial download fails here, naming
    the missing file, and not minutes later in a Ray actor."""
    p = Path(path)
    if not p.exists():
        looks_like_hub_id = str(path).count("/") == 1 and not str(path).startswith((".", "/"))
        if not looks_like_hub_id:
            raise ModelFileError(f"{what}: {p} does not exist")
        p = _hub_snapshot(str(path), what)
    if not p.is_dir():
        raise ModelFileError(f"{what}: {p} is not a directory")
    _check_json(p / marker, what)
    if marker == "config.json":
        _check_weights(p, what)
    elif marker == "model_index.json":
        _check_pipeline(p, what)
    elif marker == "tokenizer_config.json":
        _check_tokenizer(p, what)
    for weights in sorted(p.rglob("*.safetensors")):
        _check_safetensors(weights, what)
    return p


def check_synth_models(config) -> None:
    """Every model the synthesis run will load (a `SynthConfig`)."""
    check_model_dir(config.generation.model, "generation.model", marker="model_index.json")
    ir = config.scoring.imagereward
    check_file(ir.checkpoint, "scoring.imagereward.checkpoint")
    check_file(ir.med_config, "scoring.imagereward.med_config")
    check_model_dir(ir.tokenizer, "scoring.imagereward.tokenizer", marker="tokenizer_config.json")
    check_file(config.scoring.mps.checkpoint, "scoring.mps.checkpoint")
    mps = check_model_dir(config.scoring.mps.processor, "scoring.mps.processor", marker="preprocessor_config.json")
    _check_tokenizer(mps, "scoring.mps.processor")  # a CLIPProcessor: its tokenizer too
    qwen = check_model_dir(config.recaption.model, "recaption.model")
    # AutoProcessor reads the tokenizer and the image processor from the same directory.
    _check_tokenizer(qwen, "recaption.model")
    if not any((qwen / n).is_file() for n in ("preprocessor_config.json", "processor_config.json")):
        raise ModelFileError(f"recaption.model: {qwen / 'preprocessor_config.json'} does not exist "
                             "(nor processor_config.json: the image processor's settings)")


def read_model_index(directory: str | Path, class_name: str, fmt: str, what: str, kind: str,
                     legacy: Exception | None = None) -> dict:
    """A diffusers-style directory's `model_index.json`, parsed, of class `class_name` and format
    `fmt`; `legacy` is raised when the index is missing and the directory has the old layout.
    Errors name `what` and the path; `kind` says what the directory should be ("a Layton tokenizer")."""
    d = Path(directory)
    index_path = d / "model_index.json"
    if not index_path.is_file():
        if legacy is not None:
            raise legacy
        reason = "it does not exist" if not d.exists() else "no model_index.json"
        raise ModelFileError(f"{what}: {d} is not {kind} directory ({reason})")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{what}: {index_path} is not valid JSON ({e})") from None
    if not isinstance(index, dict) or index.get("_class_name") != class_name:
        found = index.get("_class_name") if isinstance(index, dict) else None
        raise ModelFileError(f"{what}: {index_path} describes a {found!r}, not {kind}")
    if index.get("format") != fmt:
        raise ModelFileError(f"{what}: {index_path} has format {index.get('format')!r}, expected {fmt!r}")
    return index


class RefusedPickleError(ValueError):
    """A `.pt` that holds more than tensors: `torch.load(weights_only=True)` refused it; the message names it."""


def refused_pickle_message(what: str, path: str | Path, reason: str = "") -> str:
    """The one message for a refused pickle, wherever it is loaded. torch's own text is left out on
    purpose: it suggests `weights_only=False` or allowlisting the global, i.e. running the file's code."""
    names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", reason)))
    named = f" (it names {', '.join(names)})" if names else ""
    return (f"{what}: {path} holds pickled code or objects that are not plain tensors{named}; refusing to unpickle "
            "it: only weights are loaded from .pt files. Re-save it as a plain state dict of tensors or as "
            "safetensors (`layton convert mps SRC DST` reads the tensors of a pickled module without running its code)")


def load_torch_file(path: str | Path, what: str, map_location="cpu", mmap: bool = False):
    """`torch.load(path, weights_only=True)`: the one place the project unpickles a `.pt`, so that a file
    holding code is refused with one message (`RefusedPickleError`) and an unreadable one names itself."""
    try:
        # LlamaGen's training scripts also pickle their argparse.Namespace ("args"): plain data, allowed.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise RefusedPickleError(refused_pickle_message(what, path, str(err))) from None
    except (RuntimeError, EOFError) as err:  # truncated or not a torch.save file at all
        raise ValueError(f"{what}: {path} cannot be read as a torch checkpoint ({str(err)[:300]})") from None


def load_torch_state_dict(path: str | Path, what: str, map_location="cpu", mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of an upstream `.pt` release, read with `weights_only=True` (no pickled code runs).

    Accepts `{"model": sd}` (LlamaGen), `{"module": sd}` (DeepSpeed), `{"state_dict": sd}` or a bare
    state dict; `module.` / `_orig_mod.` prefixes left by DDP and torch.compile are removed.
    `mmap=True` reads tensors lazily (for a look at shapes without reading the whole file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} checkpoint not found: {path}")
    obj = load_torch_file(path, what, map_location, mmap)
    if isinstance(obj, dict):
        for key in ("model", "module", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: not a {what} checkpoint (expected {{'model': state_dict}}, found {keys})")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}
