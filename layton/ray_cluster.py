"""Connecting to Ray: the configured cluster, a Ray Job's cluster, or a local instance."""

from __future__ import annotations

import os
from contextlib import contextmanager

import ray


def is_local(ray_cfg) -> bool:
    """Whether `ray_cfg` means a local instance started by this process (no cluster address)."""
    return not (ray_cfg.address or os.environ.get("RAY_ADDRESS"))


def init_ray(ray_cfg) -> bool:
    """Connect as `ray_cfg` (a RayConfig) says. Returns True when this call started a local instance."""
    if ray.is_initialized():
        return False
    if not is_local(ray_cfg):
        ray.init(address=ray_cfg.address)  # None here means RAY_ADDRESS: a Ray Job's cluster
        return False
    # Local instance; the dashboard (and the metrics it shows) listens on 127.0.0.1 only.
    ray.init(num_cpus=ray_cfg.num_cpus, num_gpus=ray_cfg.num_gpus, include_dashboard=ray_cfg.dashboard,
             dashboard_host="127.0.0.1")
    return True


@contextmanager
def ray_session(ray_cfg):
    """Ray for the duration of a block: connected as `init_ray` does; a local instance started here
    is shut down at the end. Inside a workflow (Ray already up) it neither starts nor stops anything."""
    started_here = init_ray(ray_cfg)
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()
