"""rFID / PSNR / SSIM / LPIPS-mean metrics: pytorch-fid parity, independent references, mergeable state."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from layton.fid import FeatureStats, FIDInception, fid_from_stats, frechet_distance
from layton.model_files import ModelFileError
from layton.recon_metrics import PSNR_CAP, ReconMetricState, psnr, ssim, to_uint8_rgb

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def with_moments(rng, n: int, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """n samples whose sample mean is exactly mu and unbiased sample covariance exactly sigma (to fp)."""
    z = rng.standard_normal((n, len(mu)))
    z -= z.mean(axis=0)
    u, _, _ = np.linalg.svd(z, full_matrices=False)  # z = u s vt with orthonormal, zero-mean columns u
    w, v = np.linalg.eigh(sigma)
    root = v @ np.diag(np.sqrt(w)) @ v.T
    return mu + np.sqrt(n - 1) * u @ root


def random_cov(rng, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T


def closed_form_fid(mu1, s1, mu2, s2) -> float:
    r1 = psd_sqrt(s1)
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


# --- Fréchet distance ---------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 8, 64])
def test_fid_of_exact_moments_equals_closed_form(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) + 0.5
    s1, s2 = random_cov(rng, d), random_cov(rng, d)
    x1, x2 = with_moments(rng, 4 * d + 50, mu1, s1), with_moments(rng, 3 * d + 70, mu2, s2)
    a, b = FeatureStats.from_features(x1), FeatureStats.from_features(x2)
    m, s = a.mean_cov()
    np.testing.assert_allclose(m, mu1, rtol=0, atol=1e-12)
    np.testing.assert_allclose(s, s1, rtol=0, atol=1e-12)

    expected = closed_form_fid(mu1, s1, mu2, s2)
    assert fid_from_stats(a, b) == pytest.approx(expected, rel=1e-9)
    assert fid_from_stats(a, a) == pytest.approx(0.0, abs=1e-9)
    if d == 1:  # the 1-D formula (μ1−μ2)² + (σ1−σ2)²
        assert expected == pytest.approx((mu1[0] - mu2[0]) ** 2 + (np.sqrt(s1[0, 0]) - np.sqrt(s2[0, 0])) ** 2)


def inception_like(rng, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    """(n, d) features shaped like Inception pool3's: non-negative, mean ~0.3, correlated through a
    decaying low-rank mixing plus noise (FIDs between two such sets: tens to hundreds)."""
    k = min(256, d)
    mix = rng.standard_normal((k, d)) / np.sqrt(k)
    return np.maximum((rng.standard_normal((n, k)) * np.linspace(1, 0.05, k)) @ mix * 0.5 + 0.2 + shift
                      + 0.1 * rng.standard_normal((n, d)), 0)


def fid_from_features(x: np.ndarray, y: np.ndarray) -> float:
    """The exact FID of two feature sets without any d×d matrix: with centred Xc, Yc,
    tr √(Σ1Σ2) = ‖Xc Ycᵀ‖_* / √((n1−1)(n2−1)) (the eigenvalues of Σ1Σ2 are the squared singular values
    of that n1×n2 matrix), and singular values at 0 stay at rounding level instead of their square roots."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    n1, n2 = len(x), len(y)
    tr = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + (xc * xc).sum() / (n1 - 1) + (yc * yc).sum() / (n2 - 1) - 2 * tr)


def pytorch_fid(x: np.ndarray, y: np.ndarray) -> float:
    from pytorch_fid.fid_score import calculate_frechet_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm's disp deprecation, singular-matrix LinAlgWarning
        return float(calculate_frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)))


def ours(x: np.ndarray, y: np.ndarray) -> float:
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))


def check_against_pytorch_fid(d: int, n1: int, n2: int, shift: float) -> None:
    rng = np.random.default_rng(d + n1)
    x, y = inception_like(rng, n1, d), inception_like(rng, n2, d, shift=shift)
    value, theirs, exact = ours(x, y), pytorch_fid(x, y), fid_from_features(x, y)
    assert value == pytest.approx(exact, rel=0, abs=1e-6)
    if min(n1, n2) > d:  # full rank
        assert value == pytest.approx(theirs, rel=0, abs=1e-6)
    else:
        # singular Σ: pytorch-fid's sqrtm turns the ~d−n zero eigenvalues of Σ1Σ2 into rounding noise whose
        # square roots add up (measured 2e-6 at d = 256, n = 6; 7e-6 and 6e-5 for the 2048-d cases)
        assert value == pytest.approx(theirs, rel=0, abs=1e-3)
    assert ours(x, x) == pytest.approx(0.0, abs=1e-9)
    assert pytorch_fid(x, x) == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("d,n1,n2", [(2, 20, 30), (8, 40, 30), (64, 300, 200), (256, 600, 520),  # full rank
                                     (64, 10, 12), (256, 6, 6)])  # n < d: singular covariances
def test_frechet_distance_is_pytorch_fids(d, n1, n2):
    check_against_pytorch_fid(d, n1, n2, shift=0.03)


@pytest.mark.slow  # six scipy sqrtm at d = 2048: ~10-20 s each on 2 cores
@pytest.mark.parametrize("n1,n2", [(4200, 5000),  # N ≥ 2d: full rank
                                   (1000, 1500),  # N < d: singular covariances
                                   (6, 6)])  # the tiny zoo's recon eval: 6 images, d = 2048
def test_frechet_distance_is_pytorch_fids_at_2048(n1, n2):
    check_against_pytorch_fid(2048, n1, n2, shift=0.02)


def test_frechet_distance_rejects_bad_statistics():
    mu, cov = np.zeros(4), np.eye(4)
    assert frechet_distance(mu, cov, mu + 1, np.zeros((4, 4))) == pytest.approx(8.0)  # Σ2 = 0: ‖Δμ‖² + tr Σ1
    assert frechet_distance(mu, np.zeros((4, 4)), mu, cov) == pytest.approx(4.0)  # Σ1 = 0
    with pytest.raises(ValueError):
        frechet_distance(mu, cov, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError):
        frechet_distance(mu, cov, mu, np.full((4, 4), np.nan))


# --- FeatureStats ---------------------------------------------------------------------------------------


def test_feature_stats_merge_equals_whole_and_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 16)) * rng.uniform(0.5, 2, 16) + rng.uniform(0, 3, 16)  # features ≥ 0-ish, offset
    whole = FeatureStats.empty(16)
    for batch in np.array_split(x, 7):  # batches of the single worker
        whole.update(batch)
    np.testing.assert_allclose(whole.mean_cov()[0], np.mean(x, axis=0), rtol=1e-13)
    np.testing.assert_allclose(whole.mean_cov()[1], np.cov(x, rowvar=False), rtol=1e-11, atol=1e-13)

    ref = FeatureStats.empty(16).update(torch.from_numpy(np.ascontiguousarray(x[500:])).float())  # torch input ok
    for k in (1, 2, 5):
        cuts = np.sort(rng.choice(np.arange(1, 1000), size=k - 1, replace=False))  # uneven shards
        shards = [FeatureStats.from_features(s) for s in np.split(x, cuts)]
        merged = shards[0]
        for s in shards[1:]:
            merged = merged.merge(s)
        assert merged.n == whole.n == 1000
        np.testing.assert_allclose(merged.sum, whole.sum, rtol=1e-14)
        np.testing.assert_allclose(merged.outer, whole.outer, rtol=1e-14)
        assert fid_from_stats(merged, ref) == pytest.approx(fid_from_stats(whole, ref), rel=1e-9)
    a, b, c = (FeatureStats.from_features(s) for s in np.split(x, [100, 700]))
    np.testing.assert_allclose(a.merge(b).merge(c).outer, a.merge(b.merge(c)).outer, rtol=1e-14)
    assert a.n == 100  # merge does not change its inputs

    for back in (FeatureStats.from_dict(whole.to_dict()), FeatureStats.from_bytes(whole.to_bytes())):
        assert back.n == whole.n
        np.testing.assert_array_equal(back.sum, whole.sum)
        np.testing.assert_array_equal(back.outer, np.triu(whole.outer) + np.triu(whole.outer, 1).T)  # upper half kept
    with pytest.raises(ValueError):
        whole.merge(FeatureStats.empty(8))
    with pytest.raises(ValueError):
        FeatureStats.empty(16).update(np.full((2, 16), np.nan))


# --- PSNR / SSIM ------------------------------------------------------------------------------------------


def jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    return np.array(Image.open(buf).convert(Image.fromarray(a).mode))


def psnr_reference(a: np.ndarray, b: np.ndarray) -> float:
    d = a.astype(np.int64) - b.astype(np.int64)
    return 10 * np.log10(255**2 / np.mean(d * d))


def ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s SSIM as skimage defines it by default: 7×7 uniform windows wholly inside the image,
    sample (co)variances (×49/48), C1 = (0.01·255)², C2 = (0.03·255)², mean over windows and channels.
    Window sums from integral images (exact in float64 for uint8 inputs)."""
    a, b = (np.atleast_3d(v).astype(np.float64) for v in (a, b))

    def window_mean(z):
        c = np.pad(z.cumsum(0).cumsum(1), ((1, 0), (1, 0), (0, 0)))
        return (c[7:, 7:] - c[:-7, 7:] - c[7:, :-7] + c[:-7, :-7]) / 49

    ux, uy = window_mean(a), window_mean(b)
    vx, vy = (window_mean(a * a) - ux * ux) * 49 / 48, (window_mean(b * b) - uy * uy) * 49 / 48
    vxy = (window_mean(a * b) - ux * uy) * 49 / 48
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(np.mean([s[..., ch].mean() for ch in range(s.shape[-1])]))


def test_psnr_ssim_match_an_independent_reference():
    from skimage import data

    astronaut, camera = data.astronaut(), data.camera()
    rng = np.random.default_rng(0)
    noised = np.clip(astronaut + rng.normal(0, 12, astronaut.shape), 0, 255).astype(np.uint8)
    pairs = [(astronaut, jpeg(astronaut, 20)), (astronaut, noised), (astronaut[:300, 40:200], noised[:300, 40:200]),
             (camera, jpeg(camera, 10))]  # the last one grey (H, W)
    for a, b in pairs:
        assert psnr(a, b) == pytest.approx(psnr_reference(a, b), rel=0, abs=1e-9)
        assert ssim(a, b) == pytest.approx(ssim_reference(a, b), rel=0, abs=1e-9)
        assert ssim(a, b) == ssim(b, a) and psnr(a, b) == psnr(b, a)
    assert ssim(astronaut, jpeg(astronaut, 5)) < ssim(astronaut, jpeg(astronaut, 50)) < 1
    assert psnr(astronaut, astronaut) == float("inf")
    assert ssim(astronaut, astronaut) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError):
        ssim(astronaut.astype(np.float32), astronaut.astype(np.float32))
    with pytest.raises(ValueError):
        psnr(astronaut, astronaut[:-1])
    with pytest.raises(ValueError):
        ssim(astronaut[:6, :6], astronaut[:6, :6])  # smaller than one 7×7 window


# --- ReconMetricState -----------------------------------------------------------------------------------------


def test_recon_metric_state_merge_equals_single_state():
    from skimage import data

    rng = np.random.default_rng(2)
    photo = data.astronaut()
    real = np.stack([photo[i * 40 : i * 40 + 64, i * 30 : i * 30 + 64] for i in range(10)])
    recon = np.clip(real + rng.normal(0, 8, real.shape), 0, 255).astype(np.uint8)
    recon[3] = real[3]  # a perfect reconstruction: PSNR capped
    lp = rng.uniform(0, 0.5, 10)
    f_real, f_recon = rng.normal(size=(10, 6)), rng.normal(size=(10, 6)) + 0.3

    single = ReconMetricState()
    for s in (slice(0, 4), slice(4, 10)):
        single.update(real[s], recon[s], lp[s], f_real[s], f_recon[s])
    single.skip("unreadable", 2).skip("too_small")

    workers = [ReconMetricState() for _ in range(3)]
    for i in range(10):  # round-robin, batches of one image
        workers[i % 3].update(real[i : i + 1], recon[i : i + 1], torch.tensor(lp[i : i + 1]), f_real[i : i + 1],
                              f_recon[i : i + 1])
    workers[0].skip("too_small")
    workers[2].skip("unreadable", 2)
    for order in ([0, 1, 2], [2, 0, 1]):
        merged = ReconMetricState.merge_all(workers[j] for j in order)
        r, s = merged.result(), single.result()
        assert {k: r[k] for k in ("psnr", "ssim", "lpips", "n", "skipped", "counts")} == \
               {k: s[k] for k in ("psnr", "ssim", "lpips", "n", "skipped", "counts")}  # bitwise
        assert r["rfid"] == pytest.approx(s["rfid"], rel=1e-9)

    r = single.result()
    assert r["n"] == 10 and r["skipped"] == {"too_small": 1, "unreadable": 2}
    per_image_psnr = [min(psnr(a, b), PSNR_CAP) for a, b in zip(real, recon)]
    assert r["psnr"] == pytest.approx(np.mean(per_image_psnr), rel=1e-15)
    assert r["ssim"] == pytest.approx(np.mean([ssim(a, b) for a, b in zip(real, recon)]), rel=1e-15)
    assert r["lpips"] == pytest.approx(lp.mean(), rel=1e-15)
    assert r["rfid"] == pytest.approx(fid_from_stats(FeatureStats.from_features(f_real),
                                                     FeatureStats.from_features(f_recon)), rel=1e-9)

    for back in (ReconMetricState.from_dict(single.to_dict()), ReconMetricState.from_bytes(single.to_bytes())):
        assert back.result() == r
    plain = ReconMetricState().update(real[:2], recon[:2], lp[:2]).skip("unreadable")
    assert ReconMetricState.from_dict(json.loads(json.dumps(plain.to_dict()))).result() == plain.result()
    assert plain.result()["rfid"] is None
    with pytest.raises(ValueError):
        ReconMetricState().update(real[:2], recon[:2], lp[:3])
    before = single.result()
    with pytest.raises(ValueError):  # a bad batch leaves the state as it was
        single.update(real[:2], recon[:2], [0.1, float("nan")], f_real[:2], f_recon[:2])
    with pytest.raises(ValueError):
        single.update(real[:2], recon[:2], lp[:2], f_real[:2], f_recon[:2, :3])
    assert single.result() == before


# --- FID Inception ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory, one_torch_thread):
    from layton.zoo.inception import write_tiny_inception

    return write_tiny_inception(tmp_path_factory.mktemp("inception"))


def test_to_uint8_rgb_any_mode_matches_images_to_tensor():
    from skimage import data

    from layton.tokenizer import images_to_tensor

    rgb = Image.fromarray(data.astronaut()[:400, :300])
    images = [rgb, rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("P"), rgb.convert("CMYK"),
              Image.fromarray(data.camera())]
    for im in images:
        out = to_uint8_rgb(im, 96)
        assert out.shape == (96, 96, 3) and out.dtype == np.uint8
        ref = ((images_to_tensor([im], 96)[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(out, ref)
    grey = to_uint8_rgb(images[1], 96)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    np.testing.assert_array_equal(to_uint8_rgb(rgb.crop((0, 0, 128, 128)), 128), np.array(rgb)[:128, :128])


def test_fid_inception_loads_tiny_weights_like_pytorch_fid(inception_file, monkeypatch):
    import pytorch_fid.inception as pfi
    from skimage import data

    model = FIDInception.from_file(inception_file)
    photo = Image.fromarray(data.astronaut())
    images = np.stack([to_uint8_rgb(photo.convert("L"), 160), to_uint8_rgb(photo.convert("RGBA").rotate(30), 160)])
    feats = model.features(images)
    assert feats.shape == (2, 2048) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and feats.std() > 0 and not np.allclose(feats[0], feats[1])

    # pytorch-fid's own InceptionV3 around the same weights (its download replaced by our loader)
    def no_download():
        from layton.fid import build_fid_inception_tree, load_fid_inception_state

        with torch.device("meta"):
            tree = build_fid_inception_tree()
        load_fid_inception_state(tree, inception_file)
        return tree

    monkeypatch.setattr(pfi, "fid_inception_v3", no_download)
    theirs = pfi.InceptionV3([3]).eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expected = theirs(x)[0].squeeze(-1).squeeze(-1).numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)


def test_fid_inception_file_errors(tmp_path, inception_file):
    missing = tmp_path / "nowhere" / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(ModelFileError, match=str(missing)):
        FIDInception.from_file(missing)

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (marker.write_text, ("pickled code ran",))

    evil = tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3), "x": Payload()}, evil)
    with pytest.raises(ValueError, match="refusing"):
        FIDInception.from_file(evil)
    assert not marker.exists()

    wrong = tmp_path / "alexnet.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11)}, wrong)
    with pytest.raises(ValueError, match="missing"):
        FIDInception.from_file(wrong)

    # a port without the classifier and without BatchNorm counters loads too
    state = torch.load(inception_file, weights_only=True)
    slim = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    torch.save(slim, tmp_path / "slim.pth")
    model = FIDInception.from_file(tmp_path / "slim.pth")
    assert torch.equal(model.blocks[3][2].branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
