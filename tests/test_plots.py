"""Every figure function writes a valid, non-empty PNG; the numbers behind them are checked."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from scipy import stats

from ltau_ase import plots
from ltau_ase.core.calibration import calibration_curve
from ltau_ase.is2rs import uq_rmsd_analysis

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert np.ptp(img[..., :3]) > 0  # not a blank canvas


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_calibration_curves_png(tmp_path, rng):
    conf = rng.uniform(size=300)
    err = rng.exponential(size=300)
    curves = {"300 K": calibration_curve(conf, err, 1.0), "600 K": calibration_curve(conf, err * 2, 1.0)}
    out = plots.plot_calibration_curves(curves, tmp_path / "sub" / "cal.png", title="k = 2")
    assert out == tmp_path / "sub" / "cal.png"
    assert_png(out)
    with pytest.raises(ValueError, match="no calibration curves"):
        plots.plot_calibration_curves({}, tmp_path / "x.png")
    with pytest.raises(TypeError, match="CalibrationCurve"):
        plots.plot_calibration_curves({"a": [0.1, 0.2]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="PNG"):
        plots.plot_calibration_curves(curves, tmp_path / "x.pdf")


def test_rmsd_vs_uq_png(tmp_path, rng):
    table = [
        dict(name=f"s{i}", group="ID" if i % 2 else "OOD", uq_initial=u, uq_final=u / 2, uq_max=u, uq_mean=u,
             rmsd=u + 0.1, d_mean=u)
        for i, u in enumerate(rng.uniform(size=30))
    ]
    binned = uq_rmsd_analysis(table)["binned"]
    assert_png(plots.plot_rmsd_vs_uq(binned, tmp_path / "fig4.png"))
    with pytest.raises(ValueError, match="empty"):
        plots.plot_rmsd_vs_uq({}, tmp_path / "fig4.png")


def test_cartography_png(tmp_path, rng):
    mu = rng.uniform(size=500)
    sigma = rng.uniform(size=500) * np.sqrt(mu * (1 - mu))
    assert_png(plots.plot_cartography(mu, sigma, tmp_path / "map.png"))
    groups = rng.choice(["bulk", "surface", "adsorbate"], size=500)
    thresholds = {"easy_threshold": 0.5, "hard_threshold": 0.5, "ambiguous_variability": 0.2}
    assert_png(plots.plot_cartography(mu, sigma, tmp_path / "map_g.png", groups=groups, thresholds=thresholds))
    with pytest.raises(ValueError, match="one per atom"):
        plots.plot_cartography(mu, sigma, tmp_path / "m.png", groups=groups[:-1])
    with pytest.raises(ValueError, match="variability has 499"):
        plots.plot_cartography(mu, sigma[:-1], tmp_path / "m.png")


def test_pca_matches_covariance_eigenvectors(rng):
    x = rng.normal(size=(400, 5)) @ np.diag([5.0, 3.0, 1.0, 0.5, 0.1]) + 7.0
    proj = plots.pca_2d(x)
    evals, evecs = np.linalg.eigh(np.cov(x.T))
    ref = (x - x.mean(0)) @ evecs[:, ::-1][:, :2]
    for k in range(2):  # principal axes are defined up to sign
        assert np.allclose(proj[:, k], ref[:, k], atol=1e-8) or np.allclose(proj[:, k], -ref[:, k], atol=1e-8)


def test_latent_map_png(tmp_path, rng):
    x = rng.normal(size=(300, 8))
    assert_png(plots.plot_latent_map(x, rng.uniform(size=300), tmp_path / "latent.png", max_points=200))
    with pytest.raises(ValueError, match="299 entries but there are 300"):
        plots.plot_latent_map(x, rng.uniform(size=299), tmp_path / "latent.png")
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        plots.plot_latent_map(x, rng.uniform(size=300), tmp_path / "latent.png")


def test_mean_and_ci95_hand_computed():
    runs = np.array([[1.0, 2.0, 5.0], [3.0, 4.0, np.nan], [2.0, 6.0, np.nan]])
    mean, lo, hi = plots.mean_and_ci95(runs)
    np.testing.assert_allclose(mean, [2.0, 4.0, 5.0])
    # epoch 0: sample std 1, n = 3 -> t(0.975, 2) * 1 / sqrt(3); epoch 2: one run, no band
    half0 = stats.t.ppf(0.975, 2) / np.sqrt(3)
    np.testing.assert_allclose(hi - mean, [half0, 2 * half0, 0.0])
    np.testing.assert_allclose(mean - lo, hi - mean)
    with pytest.raises(ValueError, match="no value in any run"):
        plots.mean_and_ci95(np.array([[1.0, np.nan]]))


def test_training_curves_png(tmp_path, rng):
    curve = np.exp(-np.linspace(0, 2, 12))
    curves = {
        s: {"train": curve * rng.uniform(0.9, 1.1, (3, 12)), "val": 1.3 * curve * rng.uniform(0.9, 1.1, (3, 12))}
        for s in ("uniform", "easy", "hard")
    }
    assert_png(plots.plot_training_curves(curves, tmp_path / "fig3.png"))
    with pytest.raises(ValueError, match="lacks \\['val'\\]"):
        plots.plot_training_curves({"easy": {"train": curve[None]}}, tmp_path / "fig3.png")


def test_error_distributions_png(tmp_path, rng):
    errors = {"uniform": rng.exponential(size=400), "hard": np.r_[0.0, rng.exponential(2.0, size=400)]}
    assert_png(plots.plot_error_distributions(errors, tmp_path / "e2.png"))
    assert_png(plots.plot_error_distributions(errors, tmp_path / "e2c.png", clip=2.0))
    with pytest.raises(ValueError, match="negative"):
        plots.plot_error_distributions({"x": np.array([-1.0, 1.0])}, tmp_path / "e.png")


def test_convergence_with_M_brute_force(tmp_path, rng):
    p = rng.uniform(size=(4, 50))
    c = plots.convergence_with_M(p, n_permutations=3, seed=7)
    # brute force with the same run orders
    perm_rng = np.random.default_rng(7)
    ref = np.zeros((4, 4))
    for _ in range(3):
        q = p[perm_rng.permutation(4)]
        for m in range(1, 5):
            mu, sd = q[:m].mean(0), q[:m].std(0)
            ref[:, m - 1] += [mu.mean(), sd.mean(), np.abs(mu - p.mean(0)).mean(), np.abs(sd - p.std(0)).mean()]
    ref /= 3
    for row, key in enumerate(("mean_mu", "mean_sigma", "mad_mu", "mad_sigma")):
        np.testing.assert_allclose(c[key], ref[row], atol=1e-12)
    assert c["mad_mu"][-1] == pytest.approx(0.0, abs=1e-12)  # all M runs: identical to the full ensemble
    assert_png(plots.plot_convergence_with_M(p, tmp_path / "c3.png", n_permutations=3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plots.convergence_with_M(p + 1.0)
