"""Connecting to Ray: the configured cluster, a Ray Job's cluster, or a local instance."""

from __future__ import annotations

import os

import ray


def init_ray(ray_cfg) -> bool:
    """Connect as `ray_cfg` (a RayConfig) says. Returns True when this call started a local instance."""
    if ray.is_initialized():
        return False
    if ray_cfg.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=ray_cfg.address)  # None here means RAY_ADDRESS: a Ray Job's cluster
        return False
    # Local instance; the dashboard (and the metrics it shows) listens on 127.0.0.1 only.
    ray.init(num_cpus=ray_cfg.num_cpus, num_gpus=ray_cfg.num_gpus, include_dashboard=ray_cfg.dashboard,
             dashboard_host="127.0.0.1")
    return True
