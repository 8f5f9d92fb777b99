"""Where a training job's workers go and what they leave for Ray Data: a job whose workers would
take every CPU that Ray Data's read tasks need fails at check time, naming the numbers, instead of
waiting forever (the workers for rows, the read tasks for a CPU)."""

from __future__ import annotations

import os

import ray
import torch

from layton.ray_cluster import is_local

def free_after_placement(nodes: list[dict], workers: int, bundle: dict, strategy: str) -> list[dict] | None:
    """Each node's resources left once the workers' bundles are placed as `strategy` places them, or
    None when they do not fit. A model of Ray's placement: PACK fills the largest nodes first,
    SPREAD goes to the node with fewest bundles then most CPUs, the STRICT forms on one / distinct nodes."""
    free = sorted((dict(n) for n in nodes), key=lambda n: -n.get("CPU", 0))
    placed = [0] * len(free)

    def fits(i: int, k: int = 1) -> bool:
        return all(free[i].get(r, 0) + 1e-9 >= v * k for r, v in bundle.items())

    def take(i: int, k: int = 1) -> None:
        for r, v in bundle.items():
            free[i][r] = free[i].get(r, 0) - v * k
        placed[i] += k

    if strategy == "STRICT_PACK":
        i = next((i for i in range(len(free)) if fits(i, workers)), None)
        if i is None:
            return None
        take(i, workers)
        return free
    for _ in range(workers):
        ok = [i for i in range(len(free)) if fits(i) and not (strategy == "STRICT_SPREAD" and placed[i])]
        if not ok:
            return None
        take(ok[0] if strategy == "PACK" else min(ok, key=lambda i: (placed[i], -free[i].get("CPU", 0))))
    return free


def check_data_cpus(nodes: list[dict], *, workers: int, cpus_per_worker: float, gpus_per_worker: float = 0,
                    strategy: str = "PACK", read_cpus: float = 1.0) -> None:
    """Fail, naming the numbers, when the training workers leave no node with `read_cpus` free CPUs:
    Ray Data's read tasks would then wait forever for a CPU while the workers wait for their rows."""
    bundle = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    what = f"{workers} worker(s) × {cpus_per_worker:g} CPU(s)" + (f" + {gpus_per_worker:g} GPU" if gpus_per_worker else "")
    sizes = ", ".join(f"{n.get('CPU', 0):g}" + (f" (+{n['GPU']:g} GPU)" if gpus_per_worker and n.get("GPU") else "")
                      for n in nodes) or "none"
    fix = "lower run.cpus_per_worker or run.num_workers, or add CPUs (ray.num_cpus for a local instance)"
    free = free_after_placement(nodes, workers, bundle, strategy)
    if free is None:
        raise ValueError(f"{what} ({strategy}) do not fit on nodes of {sizes} CPUs: {fix}")
    most = max(n.get("CPU", 0) for n in free)
    if most + 1e-9 < read_cpus:
        raise ValueError(f"{what} ({strategy}) on nodes of {sizes} CPUs leave at most {max(most, 0):g} CPU on a node; "
                         f"Ray Data's read tasks need {read_cpus:g} CPU (data.read_cpus): {fix}")


def alive_nodes() -> list[dict]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def check_cluster_cpus(config, nodes: list[dict] | None = None) -> None:
    """`check_data_cpus` for a training config (`run`, `data`, `ray`) on `nodes`: by default the
    cluster Ray is connected to, or the local instance `config.ray` will start; a cluster not yet
    connected to is checked once connected (`fit`)."""
    if nodes is None:
        if ray.is_initialized():
            nodes = alive_nodes()
        elif is_local(config.ray):
            gpus = config.ray.num_gpus if config.ray.num_gpus is not None else torch.cuda.device_count()
            nodes = [{"CPU": config.ray.num_cpus or os.cpu_count() or 1, "GPU": gpus}]
        else:
            return
    run = config.run
    check_data_cpus(nodes, workers=run.num_workers, cpus_per_worker=run.cpus_per_worker,
                    gpus_per_worker=1 if run.use_gpu else 0, strategy=run.placement_strategy,
                    read_cpus=config.data.read_cpus)
