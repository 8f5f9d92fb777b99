"""Reconstruction metrics of the tokenizer (PSNR, SSIM, LPIPS, rFID) as state that merges across Ray workers.

Each worker keeps one `ReconMetricState`, updates it batch by batch and ships it to the driver, which
merges the states; memory is constant in the number of images and of workers (a few scalars plus two
`layton.fid.FeatureStats`, 2 × 32 MB at d = 2048).

"Identical for 1 and N workers" means:
- n, the per-metric counts and the skip counts are equal;
- psnr, ssim, lpips are bitwise equal: each per-image value is added to an exact rational sum
  (`fractions.Fraction` of the float64 value), so the order of additions cannot matter; the mean is
  rounded to float64 once, in `result()`. (Per-image values are deterministic for PSNR/SSIM; LPIPS
  values are whatever the caller computed, e.g. batch-size-dependent GPU kernels are out of scope.)
- rfid agrees to ~1e-9 relative: the feature sums are float64 running sums (relative differences
  ~1e-15 from summation order), and `layton.fid.frechet_distance` turns those into FID differences of
  about 1e-12..1e-9 relative for well-conditioned covariances (more when n < 2048 leaves them singular).

PSNR and SSIM are scikit-image's, on uint8 RGB at the evaluation size (1024² in the design, §3):
- `psnr` = `peak_signal_noise_ratio(a, b, data_range=255)`; identical images give +inf, which the
  state caps at `PSNR_CAP` dB before averaging (a mean over an infinite value is useless).
- `ssim` = `structural_similarity(a, b, channel_axis=-1, data_range=255)` with its defaults (7×7
  uniform window, K1 = 0.01, K2 = 0.03, sample covariance, mean over the valid windows, averaged over
  channels). Both are deterministic functions of the two images, which the exact sums need.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from layton.fid import FeatureStats, fid_from_stats
from layton.vq import preprocess

PSNR_CAP = 100.0  # dB, for identical images (PSNR = inf)
DATA_RANGE = 255
METRICS = ("psnr", "ssim", "lpips")


# --- per-image metrics ------------------------------------------------------------------------------


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    # skimage would accept floats and other shapes silently (guessing a data range); the metrics are
    # defined on uint8 pairs only.
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images have different shapes: {a.shape} vs {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"expected uint8 images in [0, 255], got {a.dtype} and {b.dtype}")
    return a, b


def psnr(a, b) -> float:
    """skimage's `peak_signal_noise_ratio(a, b, data_range=255)` of two uint8 images of one shape, in dB;
    +inf when they are equal."""
    from skimage.metrics import peak_signal_noise_ratio

    a, b = _pair(a, b)
    with np.errstate(divide="ignore"):  # identical images: log10(x / 0) = inf, as intended
        return float(peak_signal_noise_ratio(a, b, data_range=DATA_RANGE))


def ssim(a, b) -> float:
    """skimage's `structural_similarity(a, b, channel_axis=-1, data_range=255)` of uint8 (H, W, C) images
    (or of (H, W) grey ones, without a channel axis); at least 7×7 pixels (ValueError otherwise)."""
    from skimage.metrics import structural_similarity

    a, b = _pair(a, b)
    if a.ndim not in (2, 3):
        raise ValueError(f"SSIM needs (H, W, C) or (H, W) images, got {a.shape}")
    return float(structural_similarity(a, b, channel_axis=-1 if a.ndim == 3 else None, data_range=DATA_RANGE))


def to_uint8_rgb(image, size: int) -> np.ndarray:
    """Any PIL image (L, RGBA, P, CMYK, I;16, ...) or uint8 HW/HWC array -> (size, size, 3) uint8 RGB,
    exactly as `layton.tokenizer.images_to_tensor` prepares tokenizer inputs (`layton.vq.preprocess`:
    PIL `convert("RGB")` — alpha dropped, not composited; P goes through RGBA —, then LlamaGen's
    `center_crop_arr`), mapped back from [-1, 1] to uint8 by rounding."""
    x = preprocess([image], size)[0]
    return ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


# --- mergeable state --------------------------------------------------------------------------------


def _exact(values) -> tuple[Fraction, int]:
    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(vals).all():
        raise ValueError(f"non-finite metric values: {vals[~np.isfinite(vals)][:4]}")
    return sum((Fraction(float(v)) for v in vals), Fraction(0)), int(vals.size)


def _feature_rows(features) -> np.ndarray:
    f = np.asarray(features.detach().cpu().double() if hasattr(features, "detach") else features, np.float64)
    if f.ndim != 2 or not np.isfinite(f).all():
        raise ValueError(f"features must be finite (B, d) rows, got shape {f.shape}")
    return f


@dataclass
class ReconMetricState:
    """Sums and counts of the reconstruction metrics; see the module docstring.

    `sums[m]` is the exact sum of metric m over `counts[m]` images; `skipped[reason]` counts images the
    caller could not evaluate (`skip`); `real` / `recon` are the Inception feature stats for rFID.
    """

    sums: dict[str, Fraction] = field(default_factory=lambda: {m: Fraction(0) for m in METRICS})
    counts: dict[str, int] = field(default_factory=lambda: {m: 0 for m in METRICS})
    skipped: dict[str, int] = field(default_factory=dict)
    real: FeatureStats | None = None
    recon: FeatureStats | None = None

    def update(self, real_uint8_batch, recon_uint8_batch, lpips_values=None, real_feats=None,
               recon_feats=None) -> ReconMetricState:
        """Add a batch in place; returns self.

        `real_uint8_batch`, `recon_uint8_batch`: (B, H, W, 3) uint8 arrays or lists of (H, W, 3) arrays,
        pairwise of one size. `lpips_values`: B floats (numpy/torch/list) or None. `real_feats`,
        `recon_feats`: (B, d) Inception features (`FIDInception.features`) or None — both or neither.
        """
        real = list(real_uint8_batch)
        recon = list(recon_uint8_batch)
        if len(real) != len(recon):
            raise ValueError(f"{len(real)} real images but {len(recon)} reconstructions")
        b = len(real)
        if lpips_values is not None:
            lp = np.asarray(lpips_values.detach().cpu() if hasattr(lpips_values, "detach") else lpips_values,
                            dtype=np.float64).reshape(-1)
            if lp.size != b:
                raise ValueError(f"{lp.size} LPIPS values for {b} images")
        if (real_feats is None) != (recon_feats is None):
            raise ValueError("give the Inception features of both the real and the reconstructed images, or neither")
        if real_feats is not None and not (len(real_feats) == len(recon_feats) == b):
            raise ValueError(f"{len(real_feats)} / {len(recon_feats)} feature rows for {b} images")

        # everything is computed and checked before the state changes: a bad batch leaves it as it was
        adds = {"psnr": _exact([min(psnr(x, y), PSNR_CAP) for x, y in zip(real, recon)]),
                "ssim": _exact([ssim(x, y) for x, y in zip(real, recon)])}
        if lpips_values is not None:
            adds["lpips"] = _exact(lp)
        if real_feats is not None:
            feats = [_feature_rows(real_feats), _feature_rows(recon_feats)]
            dim = self.real.dim if self.real is not None else feats[0].shape[1]
            if any(f.shape[1] != dim for f in feats):
                raise ValueError(f"feature dimensions {[f.shape[1] for f in feats]}, expected {dim}")
        for metric, (total, count) in adds.items():
            self.sums[metric] += total
            self.counts[metric] += count
        if real_feats is not None:
            if self.real is None:
                self.real, self.recon = FeatureStats.empty(dim), FeatureStats.empty(dim)
            self.real.update(feats[0])
            self.recon.update(feats[1])
        return self

    def skip(self, reason: str, count: int = 1) -> ReconMetricState:
        """Count `count` images that could not be evaluated, by reason (e.g. "unreadable"); returns self."""
        self.skipped[reason] = self.skipped.get(reason, 0) + int(count)
        return self

    def merge(self, other: ReconMetricState) -> ReconMetricState:
        """A new state of both (associative, commutative; neither input is changed)."""
        out = ReconMetricState(
            sums={m: self.sums[m] + other.sums[m] for m in METRICS},
            counts={m: self.counts[m] + other.counts[m] for m in METRICS},
            skipped={r: self.skipped.get(r, 0) + other.skipped.get(r, 0)
                     for r in sorted(self.skipped.keys() | other.skipped.keys())},
        )
        for side in ("real", "recon"):
            a, b = getattr(self, side), getattr(other, side)
            if a is not None and b is not None:
                setattr(out, side, a.merge(b))
            elif a is not None or b is not None:
                c = a if a is not None else b
                setattr(out, side, FeatureStats(c.n, c.sum.copy(), c.outer.copy()))
        return out

    @classmethod
    def merge_all(cls, states) -> ReconMetricState:
        out = cls()
        for s in states:
            out = out.merge(s)
        return out

    def result(self) -> dict:
        """{"psnr", "ssim", "lpips", "rfid", "n", "skipped", "counts"}: means over images (None where
        nothing was added; rfid needs ≥ 2 feature rows), n = images with PSNR/SSIM."""
        def mean(m):
            return float(self.sums[m] / self.counts[m]) if self.counts[m] else None

        rfid = None
        if self.real is not None and self.real.n >= 2 and self.recon.n >= 2:
            rfid = fid_from_stats(self.real, self.recon)
        return {"psnr": mean("psnr"), "ssim": mean("ssim"), "lpips": mean("lpips"), "rfid": rfid,
                "n": self.counts["psnr"], "skipped": dict(sorted(self.skipped.items())),
                "counts": dict(self.counts)}

    # Transport. to_dict(): JSON-able scalars (exact sums as "p/q" strings) plus the two FeatureStats as
    # dicts of numpy arrays — what Ray ships cheaply (out-of-band buffers). to_bytes(): one .npz blob
    # (scalars as a JSON string inside) for files. A state without features is entirely JSON-able.
    def to_dict(self) -> dict:
        return {
            "sums": {m: f"{s.numerator}/{s.denominator}" for m, s in self.sums.items()},
            "counts": dict(self.counts),
            "skipped": dict(self.skipped),
            "real": None if self.real is None else self.real.to_dict(),
            "recon": None if self.recon is None else self.recon.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ReconMetricState:
        return cls(
            sums={m: Fraction(d["sums"][m]) for m in METRICS},
            counts={m: int(d["counts"][m]) for m in METRICS},
            skipped={str(r): int(c) for r, c in d["skipped"].items()},
            real=None if d.get("real") is None else FeatureStats.from_dict(d["real"]),
            recon=None if d.get("recon") is None else FeatureStats.from_dict(d["recon"]),
        )

    def to_bytes(self) -> bytes:
        d = self.to_dict()
        arrays = {}
        for side in ("real", "recon"):
            if d[side] is not None:
                stats = d.pop(side)
                arrays |= {f"{side}_n": np.int64(stats["n"]), f"{side}_sum": stats["sum"],
                           f"{side}_outer_triu": stats["outer_triu"]}
        buf = io.BytesIO()
        np.savez(buf, scalars=np.array(json.dumps(d)), **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> ReconMetricState:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            d = json.loads(str(z["scalars"]))
            for side in ("real", "recon"):
                d[side] = ({"n": int(z[f"{side}_n"]), "sum": z[f"{side}_sum"], "outer_triu": z[f"{side}_outer_triu"]}
                           if f"{side}_sum" in z.files else None)
        return cls.from_dict(d)


__all__ = ["PSNR_CAP", "ReconMetricState", "psnr", "ssim", "to_uint8_rgb"]
