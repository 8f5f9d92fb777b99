"""Training state as safetensors + JSON: optimizer moments, LR schedule, step. Nothing pickled.

torch's optimizer `state_dict()` is a nest of tensors and plain values; tensors go to
`optimizer.safetensors` under "<param index>.<name>", everything else to `trainer_state.json`,
which is written last (a checkpoint directory without it is incomplete and is refused).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "trainer_state.json"


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
