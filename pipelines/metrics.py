"""Live synthesis counters and histograms for the Ray dashboard's metrics view.

Metrics are created lazily in the process that records them (driver or stage actor) and only
when Ray is running, so the stage classes also run without Ray. Names are prefixed `layton_synth_`;
Ray exports them as `ray_layton_synth_*` to Prometheus.
"""

from __future__ import annotations

import ray

# Histogram boundaries must be positive: scores are shifted into a positive range first.
IR_SHIFT, IR_BOUNDS = 3.0, [0.5 * i for i in range(1, 13)]  # ImageReward ~ N(0,1): [-2.5, 3]
MPS_SHIFT, MPS_BOUNDS = 0.0, [float(b) for b in range(1, 25)]
LATENCY_BOUNDS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]


class SynthMetrics:
    def __init__(self):
        self._enabled = ray.is_initialized()
        self._made: dict[str, object] = {}

    def _metric(self, kind: str, name: str, description: str, tag_keys=(), boundaries=None):
        if name not in self._made:
            from ray.util import metrics

            kwargs = {"description": description, "tag_keys": tuple(tag_keys)}
            if boundaries is not None:
                kwargs["boundaries"] = boundaries
            self._made[name] = getattr(metrics, kind)(name, **kwargs)
        return self._made[name]

    def count(self, name: str, n: int = 1, description: str = "", **tags: str) -> None:
        if self._enabled and n:
            self._metric("Counter", f"layton_synth_{name}", description, tags).inc(n, tags=tags or None)

    def latency(self, stage: str, seconds: float, items: int) -> None:
        """Per-stage latency of one model call, and the per-item time."""
        if self._enabled:
            h = self._metric("Histogram", "layton_synth_stage_seconds", "model call latency", ("stage",), LATENCY_BOUNDS)
            h.observe(seconds, tags={"stage": stage})
            self.count("items_processed", items, "items through a stage", stage=stage)

    def scores(self, imagereward: list[float], mps: list[float]) -> None:
        if self._enabled:
            hi = self._metric("Histogram", "layton_synth_imagereward_shifted", f"ImageReward + {IR_SHIFT}", (), IR_BOUNDS)
            hm = self._metric("Histogram", "layton_synth_mps", "MPS score", (), MPS_BOUNDS)
            for v in imagereward:
                hi.observe(max(v + IR_SHIFT, 0.0))
            for v in mps:
                hm.observe(max(v + MPS_SHIFT, 0.0))
