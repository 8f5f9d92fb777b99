"""Checkpoint I/O: exact loading of model weights, and training state as safetensors + JSON.

`load_exact` puts a checkpoint's tensors into a model only when names and shapes match one to one, with
an error naming the file (the VQ, GPT and scorer loaders use it).

Training state: optimizer moments, LR schedule, step; nothing pickled. torch's optimizer
`state_dict()` is a nest of tensors and plain values; tensors go to `optimizer.safetensors` under
"<param index>.<name>", everything else to `trainer_state.json`, which is written last (a checkpoint
directory without it is incomplete and is refused).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "trainer_state.json"


def load_exact(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """`module.load_state_dict(strict=True, assign=True)` with an error that names the file.

    `assign=True` lets callers build the module on the meta device (no random init of a
    billion parameters) and take the checkpoint's tensors as they are.
    """
    own = module.state_dict()
    expected, found = set(own), set(tensors)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source}: checkpoint keys do not match the model: "
            f"{len(missing)} missing (e.g. {missing[:5]}), {len(unexpected)} unexpected (e.g. {unexpected[:5]})"
        )
    for name, tensor in tensors.items():
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the model expects {tuple(own[name].shape)}"
            )
    module.load_state_dict(tensors, strict=True, assign=True)


def save_training_state(directory: Path, optimizer: torch.optim.Optimizer, lr_scheduler, state: dict) -> None:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    save_file(tensors, Path(directory) / OPTIMIZER_NAME)
    body = {**state, "optimizer": {"param_groups": sd["param_groups"], "scalars": scalars},
            "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None}
    tmp = Path(directory) / (STATE_NAME + ".tmp")
    tmp.write_text(json.dumps(body, indent=1, default=float))
    os.replace(tmp, Path(directory) / STATE_NAME)


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer, lr_scheduler) -> dict:
    directory = Path(directory)
    if not (directory / STATE_NAME).is_file():
        raise FileNotFoundError(f"checkpoint {directory} has no {STATE_NAME}: it is incomplete")
    body = json.loads((directory / STATE_NAME).read_text())
    tensors = load_file(directory / OPTIMIZER_NAME)
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *body["optimizer"]["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    # JSON turns tuples (Adam's betas) into lists; torch keeps them as tuples.
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in body["optimizer"]["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if lr_scheduler is not None and body.get("lr_scheduler"):
        lr_scheduler.load_state_dict(body["lr_scheduler"])
    return {k: v for k, v in body.items() if k not in ("optimizer", "lr_scheduler")}
