"""Checks that every configured weight file is present and readable, before any cluster work.

The checks are cheap (headers and directory listings, no weights loaded) so a run with a typo in
a path or a truncated download fails in seconds with the path in the message, instead of after
Ray has started actors.
"""

from __future__ import annotations

import argparse
import json
import pickle
import zipfile
from pathlib import Path

import torch

from safetensors import safe_open


class ModelFileError(FileNotFoundError):
    """A configured model path that is absent or unreadable; the message names it."""


def _check_json(path: Path, what: str) -> None:
    try:
        json.loads(path.read_text())
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


def check_model_dir(path: str | Path, what: str, marker: str = "config.json") -> Path:
    """A `save_pretrained` directory: `marker` must parse and every safetensors header must read."""
    p = Path(path)
    if not p.exists():
        looks_like_hub_id = str(path).count("/") == 1 and not str(path).startswith((".", "/"))
        if not looks_like_hub_id:
            raise ModelFileError(f"{what}: {p} does not exist")
        p = _hub_snapshot(str(path), what)
    if not p.is_dir():
        raise ModelFileError(f"{what}: {p} is not a directory")
    _check_json(p / marker, what)
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
    check_model_dir(config.scoring.mps.processor, "scoring.mps.processor", marker="preprocessor_config.json")
    check_model_dir(config.recaption.model, "recaption.model")


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


def load_torch_state_dict(path: str | Path, what: str, map_location="cpu", mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of an upstream `.pt` release, read with `weights_only=True` (no pickled code runs).

    Accepts `{"model": sd}` (LlamaGen), `{"module": sd}` (DeepSpeed), `{"state_dict": sd}` or a bare
    state dict; `module.` / `_orig_mod.` prefixes left by DDP and torch.compile are removed.
    `mmap=True` reads tensors lazily (for a look at shapes without reading the whole file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} checkpoint not found: {path}")
    try:
        # LlamaGen's training scripts also pickle their argparse.Namespace ("args"): plain data, allowed.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[-1][:300]
        raise ValueError(f"{path}: refusing to unpickle a checkpoint that holds more than tensors ({reason})") from err
    except (RuntimeError, EOFError) as err:  # truncated or not a torch.save file at all
        raise ValueError(f"{path}: cannot read as a torch checkpoint ({str(err)[:300]})") from err
    if isinstance(obj, dict):
        for key in ("model", "module", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: not a {what} checkpoint (expected {{'model': state_dict}}, found {keys})")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}
