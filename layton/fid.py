"""FID / rFID: pytorch-fid's Inception network read from a local file, and mergeable feature statistics.

Why pytorch-fid's network and not torchvision's `inception_v3(weights="IMAGENET1K_V1")`
----------------------------------------------------------------------------------------
A Fréchet distance is only comparable with another one computed by the same feature extractor.
Published FIDs/rFIDs (LlamaGen, Layton, ADM's evaluation suite, clean-fid's "legacy" mode) use the
TensorFlow Inception graph `inception-2015-12-05` (1008 classes, pool3 = 2048-d). pytorch-fid
ports those weights (`pt_inception-2015-12-05-6726825d.pth`) together with the TF graph's quirks:
average pools that ignore the padded zeros (`count_include_pad=False`) in the A/C/E blocks and a
*max* pool in the last E block. torchvision's ImageNet Inception has other weights, 1000 classes and
the standard pools; its features give FIDs that are systematically different (not just noisier), so
numbers computed with it cannot be put beside the papers' numbers. Hence: the FID-specific module tree
of `pytorch_fid.inception` (its `FIDInceptionA/C/E_1/E_2` classes on torchvision's `Inception3`
with 1008 classes), filled from the release file given by path.

`pytorch_fid.inception.fid_inception_v3()` downloads that file from GitHub; nothing here calls it.
`FIDInception.from_file(path)` builds the same tree on the meta device and loads the file with
`torch.load(weights_only=True)`, so a file holding pickled code is refused and a missing file is an
error naming the path.

Input handling is pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`: RGB in [0, 1],
bilinear resize to 299×299 (`align_corners=False`, no antialiasing), scaled to [-1, 1]; the output is
the final average pool (block 3), 2048 values per image.

Mergeable statistics
--------------------
FID needs only the mean and covariance of each feature set, so each Ray worker keeps
`FeatureStats(n, sum, outer)` — Σx and Σxxᵀ in float64, O(d²) memory whatever the number of images —
and the driver adds them up (`merge`, associative and commutative). Results for 1 and N workers are
equal up to float64 summation order (relative differences ~1e-12 on the stats). `to_dict()` gives a
dict of a Python int and numpy arrays (`outer` packed as its upper triangle, 16.8 MB at d=2048): Ray
ships numpy arrays out of band (zero-copy from the object store) and needs none of this module's
classes to unpickle it; `to_bytes()` is the same as one `.npz` blob for files. It is deliberately not
JSON: 2.1M floats as text would be ~40 MB and slow.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from layton.model_files import ModelFileError, load_torch_state_dict

RELEASE_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch_fid.inception.FID_WEIGHTS_URL's file
FEATURE_DIM = 2048
INPUT_SIZE = 299


def build_fid_inception_tree() -> nn.Module:
    """pytorch-fid's `fid_inception_v3()` module tree (torchvision `Inception3`, 1008 classes, no aux
    logits, FID blocks), with uninitialised weights and without its download. Build it under
    `torch.device("meta")` to skip allocation."""
    from pytorch_fid.inception import (
        FIDInceptionA,
        FIDInceptionC,
        FIDInceptionE_1,
        FIDInceptionE_2,
        _inception_v3,
    )

    inception = _inception_v3(num_classes=1008, aux_logits=False, weights=None)  # init_weights=False
    inception.Mixed_5b = FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = FIDInceptionE_1(1280)
    inception.Mixed_7c = FIDInceptionE_2(2048)
    return inception


def load_fid_inception_state(inception: nn.Module, path: str | Path) -> None:
    """Fill `inception` (from `build_fid_inception_tree`, possibly on meta) from the release file.

    Every tensor the pool3 features use must be in the file; `fc.*` (the 1008-way classifier) may be
    absent, and BatchNorm's `num_batches_tracked` counters (unused in eval) are filled with 0 when the
    port lacks them.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"FID Inception weights: {path} does not exist (pytorch-fid's {RELEASE_FILE})")
    state = load_torch_state_dict(path, "FID Inception")  # weights_only=True; ValueError on pickled code
    wanted = inception.state_dict(keep_vars=True)
    for key in wanted:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    optional = {k for k in wanted if k.startswith("fc.")}
    missing = sorted(wanted.keys() - state.keys() - optional)
    unexpected = sorted(state.keys() - wanted.keys())
    if missing or unexpected:
        raise ValueError(
            f"{path}: not pytorch-fid's FID Inception state dict: missing {missing[:4]} ({len(missing)}), "
            f"unexpected {unexpected[:4]} ({len(unexpected)})"
        )
    for key, value in wanted.items():
        if key in state and tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")
    if not all(k in state for k in optional):  # no classifier in the file: drop it rather than keep meta
        inception.fc = nn.Identity()
        state = {k: v for k, v in state.items() if k not in optional}
    inception.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                              strict=True, assign=True)


class FIDInception(nn.Module):
    """pytorch-fid's `InceptionV3(output_blocks=[3], resize_input=True, normalize_input=True)` with the
    FID weights read from a file. `forward`: (B, 3, H, W) RGB in [0, 1] -> (B, 2048) pool3 features."""

    def __init__(self, inception: nn.Module):
        super().__init__()
        # The same four blocks as pytorch_fid.inception.InceptionV3 (it returns after block 3).
        self.blocks = nn.ModuleList([
            nn.Sequential(inception.Conv2d_1a_3x3, inception.Conv2d_2a_3x3, inception.Conv2d_2b_3x3,
                          nn.MaxPool2d(kernel_size=3, stride=2)),
            nn.Sequential(inception.Conv2d_3b_1x1, inception.Conv2d_4a_3x3, nn.MaxPool2d(kernel_size=3, stride=2)),
            nn.Sequential(inception.Mixed_5b, inception.Mixed_5c, inception.Mixed_5d, inception.Mixed_6a,
                          inception.Mixed_6b, inception.Mixed_6c, inception.Mixed_6d, inception.Mixed_6e),
            nn.Sequential(inception.Mixed_7a, inception.Mixed_7b, inception.Mixed_7c,
                          nn.AdaptiveAvgPool2d(output_size=(1, 1))),
        ])

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> FIDInception:
        """A frozen, eval-mode network from `pt_inception-2015-12-05-6726825d.pth` (a plain state dict)."""
        with torch.device("meta"):  # no random init: every tensor comes from the file
            inception = build_fid_inception_tree()
        load_fid_inception_state(inception, path)
        return cls(inception).to(device).eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # (0, 1) -> (-1, 1)
        for block in self.blocks:
            x = block(x)
        return x.flatten(1)  # (B, 2048, 1, 1) -> (B, 2048)

    @torch.no_grad()
    def features(self, images) -> np.ndarray:
        """uint8 RGB images -> (B, 2048) float32 numpy features.

        `images`: a (B, H, W, 3) uint8 array / tensor or a list of (H, W, 3) uint8 arrays of one size
        (see `layton.recon_metrics.to_uint8_rgb` for PIL images of any mode). Scaled by 1/255 like
        pytorch-fid's `ToTensor()`.
        """
        if isinstance(images, (list, tuple)):
            images = np.stack([np.asarray(im) for im in images])
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected (B, H, W, 3) uint8 RGB images, got {tuple(x.shape)} {x.dtype}")
        param = next(self.parameters())
        x = x.to(param.device).permute(0, 3, 1, 2).to(param.dtype) / 255
        return self(x).float().cpu().numpy()


def load_fid_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInception:
    return FIDInception.from_file(path, device)


# --- statistics -----------------------------------------------------------------------------------


@dataclass
class FeatureStats:
    """Running n, Σx (d,) and Σxxᵀ (d, d) of feature vectors, in float64.

    `merge` adds the three fields, so it is associative and commutative: the stats of a data set are
    the same (to float64 summation order) however it was split across workers and batches.
    """

    n: int
    sum: np.ndarray
    outer: np.ndarray

    @classmethod
    def empty(cls, dim: int = FEATURE_DIM) -> FeatureStats:
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    @classmethod
    def from_features(cls, features) -> FeatureStats:
        f = _as_f64(features)
        return cls.empty(f.shape[1]).update(f)

    @property
    def dim(self) -> int:
        return int(self.sum.shape[0])

    def update(self, features) -> FeatureStats:
        """Add a (B, d) batch (numpy or torch, any float dtype) in place; returns self."""
        f = _as_f64(features)
        if f.shape[1] != self.dim:
            raise ValueError(f"features have dimension {f.shape[1]}, these stats {self.dim}")
        if not np.isfinite(f).all():
            raise ValueError("features are not all finite")
        self.n += int(f.shape[0])
        self.sum += f.sum(axis=0)
        self.outer += f.T @ f
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """A new FeatureStats of both sets (neither input is changed)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge feature stats of dimension {self.dim} and {other.dim}")
        return FeatureStats(self.n + other.n, self.sum + other.sum, self.outer + other.outer)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(μ, Σ) as pytorch-fid computes them (`np.mean(axis=0)`, `np.cov(rowvar=False)`: unbiased)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, have {self.n}")
        mu = self.sum / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, (cov + cov.T) / 2  # exactly symmetric, as np.cov's

    # Transport: a dict of an int and numpy arrays (Ray: out-of-band buffers), or one .npz blob.
    def to_dict(self) -> dict:
        return {"n": int(self.n), "sum": self.sum.copy(), "outer_triu": self.outer[np.triu_indices(self.dim)]}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureStats:
        s = np.asarray(d["sum"], np.float64)
        dim = s.shape[0]
        packed = np.asarray(d["outer_triu"], np.float64)
        if packed.shape != (dim * (dim + 1) // 2,):
            raise ValueError(f"outer_triu has {packed.shape} values, expected {dim * (dim + 1) // 2} for dim {dim}")
        outer = np.zeros((dim, dim), np.float64)
        outer[np.triu_indices(dim)] = packed
        outer = outer + np.triu(outer, 1).T
        return cls(int(d["n"]), s.copy(), outer)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        d = self.to_dict()
        np.savez(buf, n=np.int64(d["n"]), sum=d["sum"], outer_triu=d["outer_triu"])
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> FeatureStats:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            return cls.from_dict({"n": int(z["n"]), "sum": z["sum"], "outer_triu": z["outer_triu"]})


def _as_f64(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (B, d), got {f.shape}")
    return f


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr √(Σ1Σ2) of two symmetric PSD matrices, from a symmetric eigenvalue problem.

    For any B with B Bᵀ = Σ1, Σ1Σ2 = B·(BᵀΣ2), and XY and YX have the same non-zero eigenvalues, so those
    of Σ1Σ2 are the eigenvalues μ_i ≥ 0 of the symmetric PSD M = BᵀΣ2B, and the trace of the square
    root is Σ √μ_i. B = P·L is LAPACK's pivoted Cholesky factor of Σ1 (`dpstrf`), a fraction of the
    cost of `eigh(Σ1)` with eigenvectors, and rank-revealing: it stops where every remaining pivot is
    below d·ε·max(diag Σ1), so a singular Σ1 (n ≤ d samples) gives the d×r factor of its rank r and M
    is r×r, instead of ~d−r directions of rounding noise that would each add ~1e-8·√‖Σ‖ to the trace
    (pytorch-fid's `sqrtm` carries that noise). Eigenvalues of M below r·ε·max μ are rounding noise
    too (numpy's `matrix_rank` tolerance) and count as 0. Only the lower triangles are read.
    """
    from scipy.linalg import lapack

    factor, piv, rank, info = lapack.dpstrf(sigma1, lower=1)  # Pᵀ Σ1 P = L Lᵀ, L in the lower triangle
    if info < 0:
        raise ValueError(f"LAPACK dpstrf: argument {-info} is invalid")
    if rank == 0:  # Σ1 = 0
        return 0.0
    perm = piv - 1
    s2 = sigma2[np.ix_(perm, perm)]  # Pᵀ Σ2 P, so that M = Lᵀ (Pᵀ Σ2 P) L
    if rank == len(perm):
        # dsygst forms Lᵀ S L (lower triangle) in half the flops of two triangular products; S is
        # symmetric, so its transpose is the same matrix in the Fortran order LAPACK works in, in place
        m, info = lapack.dsygst(s2.T, factor, itype=2, lower=1, overwrite_a=1)
        if info < 0:
            raise ValueError(f"LAPACK dsygst: argument {-info} is invalid")
    else:
        low = np.tril(factor)[:, :rank]
        m = low.T @ (s2 @ low)
    mu = np.linalg.eigvalsh(m, UPLO="L")
    mu = np.where(mu > rank * np.finfo(np.float64).eps * max(mu.max(), 0.0), mu, 0.0)
    return float(np.sqrt(mu).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1−μ2‖² + tr(Σ1 + Σ2 − 2√(Σ1Σ2)) in float64, the value of pytorch-fid's `calculate_frechet_distance`.

    pytorch-fid takes `scipy.linalg.sqrtm` of the non-symmetric product Σ1Σ2 (a complex Schur
    decomposition; eps·I added when the result is not finite). Only the trace of that root is needed,
    and `trace_sqrt_product` gets it from a pivoted Cholesky and a symmetric eigenvalue problem:
    real, never failing on singular covariances, ~10× faster at d = 2048 (`benchmarks/fid.py`). For
    full-rank covariances (n > d samples) both agree to ~1e-11. For singular ones pytorch-fid's value
    is off by its `sqrtm` noise (~1e-5..1e-4 at d = 2048 on features of Inception's scale, and −1e-4
    rather than 0 for identical stats); this one stays within ~1e-9 of the exact value, which
    `tests/eval/test_metrics.py` checks against the n×n problem computed from the features.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"covariances of shapes {sigma1.shape}, {sigma2.shape} for means of length {mu1.shape[0]}")
    if not all(np.isfinite(x).all() for x in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("Fréchet distance of non-finite statistics")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    mu1, sigma1 = a.mean_cov()
    mu2, sigma2 = b.mean_cov()
    return frechet_distance(mu1, sigma1, mu2, sigma2)


__all__ = [
    "FEATURE_DIM",
    "RELEASE_FILE",
    "FIDInception",
    "FeatureStats",
    "build_fid_inception_tree",
    "fid_from_stats",
    "frechet_distance",
    "load_fid_inception",
    "load_fid_inception_state",
    "trace_sqrt_product",
]
