"""LTAU inside the model without compiling: the torch readout against LTAUEstimator.predict and
brute-force numpy, the compile command's input checks (nothing compiled here, all fast)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ltau_ase.core.estimator import LTAUEstimator
from ltau_ase.core.fileformat import sha256_file
from ltau_ase.nequip.inmodel import (
    LTAU_FIELDS,
    compressed_accuracy,
    readout_for_estimator,
    readout_predict,
    reference_from_estimator,
)

pytestmark = pytest.mark.slow  # uses the tiny trained model


@pytest.fixture(scope="module")
def tiny_latents(tiny_nequip_run, latent_calc):
    """Descriptors of the tiny run's training frames (rows = atoms) and of rattled copies (queries)."""
    train, queries = [], []
    for i, frame in enumerate(tiny_nequip_run.frames[:24]):
        a = frame.copy()
        a.calc = latent_calc
        a.get_forces()
        train.append(latent_calc.results["descriptors"].copy())
        b = frame.copy()
        b.rattle(0.15, seed=i)
        b.calc = latent_calc
        b.get_forces()
        queries.append(latent_calc.results["descriptors"].copy())
    return np.concatenate(train), np.concatenate(queries)


@pytest.fixture(scope="module")
def tiny_estimator(tiny_latents):
    x, _ = tiny_latents
    rng = np.random.default_rng(0)
    # errors that vary smoothly with the latent position (as real ones do) plus noise, 6 epochs
    base = 0.05 + 0.02 * np.abs(x[:, 0] - x[:, 0].mean())
    errors = base[None, :] * rng.lognormal(0.0, 0.3, size=(6, x.shape[0]))
    return LTAUEstimator(k=7, scale=1.3).fit(x, errors)


@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_exact_readout_equals_estimator_predict(tiny_latents, tiny_estimator, weights):
    x, q = tiny_latents
    est = tiny_estimator
    est.set_params(weights=weights)
    try:
        expected = est.predict(q)
        # blocks much smaller than N: the candidates of several blocks are merged
        got = readout_predict(readout_for_estimator(est, block_size=37), q)
    finally:
        est.set_params(weights="uniform")
    for key in ("uncertainty", "confidence", "expected_error", "distance"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_exact_readout_against_brute_force_numpy(tiny_latents, tiny_estimator):
    x, q = tiny_latents
    est = tiny_estimator
    d = np.sqrt(((q[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1))
    nn = np.argsort(d, axis=1, kind="stable")[:, : est.k]
    p = est.distributions_.confidence(est.atol_ / est.scale)
    got = readout_predict(readout_for_estimator(est), q)
    np.testing.assert_allclose(got["confidence"], p[nn].mean(1), rtol=1e-6)
    np.testing.assert_allclose(got["expected_error"], est.scale * est.mean_error_train_[nn].mean(1), rtol=1e-6)
    np.testing.assert_allclose(got["distance"], np.take_along_axis(d, nn, 1).mean(1), rtol=1e-5)


def test_compressed_readout_pools_counts_like_numpy(tiny_latents, tiny_estimator):
    """Nearest centroids fill the k member slots; the last contributes only the missing count."""
    _, q = tiny_latents
    est = tiny_estimator
    ref = reference_from_estimator(est, "compressed", n_centroids=20)
    c, counts = ref["reference"].astype(np.float64), ref["counts"]
    assert counts.sum() == est.n_train_atoms_ and np.all(counts >= 1)
    np.testing.assert_allclose(np.bincount(ref["assignment"], minlength=len(counts)), counts)
    got = readout_predict(readout_for_estimator(est, "compressed", n_centroids=20), q)
    k = est.k
    for i in range(0, len(q), 17):
        dist = np.sqrt(((c - q[i]) ** 2).sum(1))
        w, conf, err, dd = 0.0, 0.0, 0.0, 0.0
        for j in np.argsort(dist, kind="stable"):
            take = min(counts[j], k - w)
            conf += take * ref["confidence"][j]
            err += take * ref["mean_error"][j]
            dd += take * dist[j]
            w += take
            if w >= k:
                break
        assert got["confidence"][i] == pytest.approx(conf / k, rel=1e-6)
        assert got["expected_error"][i] == pytest.approx(err / k, rel=1e-6)
        assert got["distance"][i] == pytest.approx(dd / k, rel=1e-5)


def test_compressed_accuracy_reports_spearman_and_recall(tiny_latents, tiny_estimator):
    _, q = tiny_latents
    acc = compressed_accuracy(tiny_estimator, q, n_centroids=40)
    assert -1.0 <= acc["spearman"] <= 1.0 and 0.0 <= acc["recall"] <= 1.0
    assert acc["n_centroids"] <= 40 and acc["k"] == tiny_estimator.k
    # one centroid per atom: recall is 1 and the compressed result is the exact one
    x, _ = tiny_latents
    full = compressed_accuracy(tiny_estimator, q, n_centroids=len(x))
    if full["n_centroids"] == len(x):  # k-means placed one centroid on every atom
        assert full["recall"] == pytest.approx(1.0) and full["max_abs_uncertainty_diff"] < 1e-6


def test_readout_refuses_ivfpq_and_wrong_dimension(tiny_latents, tiny_estimator, tiny_nequip_run, latent_calc):
    from ltau_ase.nequip.inmodel import readout_from_estimator

    x, _ = tiny_latents
    rng = np.random.default_rng(1)
    pq = LTAUEstimator(k=3, index="ivfpq", index_params={"nlist": 2, "m": 2, "nbits": 4, "refine": 0}).fit(
        x, rng.lognormal(size=(3, len(x))))
    with pytest.raises(ValueError, match="compressed codes"):
        reference_from_estimator(pq)
    other = LTAUEstimator(k=3).fit(rng.normal(size=(50, 5)), rng.lognormal(size=(3, 50)))
    with pytest.raises(ValueError, match="5-dimensional"):
        readout_from_estimator(latent_calc.model, other)


# ---------------------------------------------------------------------------- compile: bad input, no compile
@pytest.fixture(scope="module")
def matching_estimator_file(tiny_nequip_run, tiny_latents, tmp_path_factory):
    x, _ = tiny_latents
    rng = np.random.default_rng(2)
    est = LTAUEstimator(k=5, metadata={"model_sha256": sha256_file(tiny_nequip_run.checkpoint)})
    est.fit(x, rng.lognormal(-3, 0.5, size=(4, len(x))))
    path = tmp_path_factory.mktemp("est") / "est.ltau"
    est.save(str(path))
    return path


def _cli(*args):
    from ltau_ase.cli import main

    return main(["compile", *map(str, args)])


def test_compile_refuses_existing_output_and_keeps_it(tiny_nequip_run, matching_estimator_file, tmp_path, capsys):
    out = tmp_path / "m.nequip.pt2"
    out.write_bytes(b"keep me")
    assert _cli(tiny_nequip_run.checkpoint, matching_estimator_file, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    assert out.read_bytes() == b"keep me"


def test_compile_refuses_cuda_without_gpu_and_torchscript_on_new_torch(tiny_nequip_run, matching_estimator_file,
                                                                       tmp_path, capsys):
    from ltau_ase.nequip.compiled import torchscript_supported

    if not torch.cuda.is_available():
        assert _cli(tiny_nequip_run.checkpoint, matching_estimator_file, tmp_path / "m.nequip.pt2", "--device", "cuda") == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    if not torchscript_supported():
        assert _cli(tiny_nequip_run.checkpoint, matching_estimator_file, tmp_path / "m.nequip.pth",
                    "--mode", "torchscript") == 2
        assert "TorchScript compilation is not supported" in capsys.readouterr().err
    assert _cli(tiny_nequip_run.checkpoint, matching_estimator_file, tmp_path / "m.pt2") == 2
    assert "must end with .nequip.pt2" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_compile_refuses_estimator_of_another_model(tiny_nequip_run, tiny_latents, tmp_path, capsys):
    x, _ = tiny_latents
    rng = np.random.default_rng(3)
    est = LTAUEstimator(k=3, metadata={"model_sha256": "0" * 64}).fit(x, rng.lognormal(size=(3, len(x))))
    est.save(str(tmp_path / "other.ltau"))
    assert _cli(tiny_nequip_run.checkpoint, tmp_path / "other.ltau", tmp_path / "m.nequip.pt2") == 2
    assert "belongs to another model" in capsys.readouterr().err
    # right hash recorded, wrong descriptor dimension
    est5 = LTAUEstimator(k=3, metadata={"model_sha256": sha256_file(tiny_nequip_run.checkpoint)})
    est5.fit(rng.normal(size=(40, 5)), rng.lognormal(size=(3, 40))).save(str(tmp_path / "d5.ltau"))
    assert _cli(tiny_nequip_run.checkpoint, tmp_path / "d5.ltau", tmp_path / "m.nequip.pt2") == 2
    assert "D mismatch" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d5.ltau", "other.ltau"]


def test_failed_compile_leaves_nothing_at_output(tiny_nequip_run, matching_estimator_file, tmp_path, monkeypatch):
    import ltau_ase.nequip.compiled as compiled

    def half_written(model, data, outputs, metadata, path, device):
        assert set(LTAU_FIELDS) <= set(outputs) and "node_features" in outputs
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("compiler crashed")

    monkeypatch.setattr(compiled, "_export_aoti", half_written)
    with pytest.raises(RuntimeError, match="compiler crashed"):
        compiled.compile_model(tiny_nequip_run.checkpoint, tmp_path / "m.nequip.pt2", estimator=matching_estimator_file)
    assert list(tmp_path.iterdir()) == []


def test_readout_applies_the_fitted_scale_like_predict(tiny_latents):
    """A scale_ fitted by fit_scale (not the scale parameter) is what predict applies: so must the readout."""
    x, q = tiny_latents
    rng = np.random.default_rng(4)
    est = LTAUEstimator(k=4).fit(x, rng.lognormal(-3, 0.4, size=(5, len(x))))
    est.fit_scale(q, 3.0 * rng.lognormal(-3, 0.4, size=len(q)))
    assert abs(est.effective_scale - 1.0) > 0.5 and est.scale == 1.0
    expected = est.predict(q)
    got = readout_predict(readout_for_estimator(est), q)
    for key in ("confidence", "expected_error"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-9)


def _calibrated(tiny_nequip_run, tiny_latents, distribution, seed=5):
    """An estimator fitted on the tiny latents and calibrated (per-element factors, conformal), with
    the queries' atomic numbers: 24 rattled frames of 13 atoms, exchangeable with the calibration set."""
    x, q = tiny_latents
    z_train = np.concatenate([f.numbers for f in tiny_nequip_run.frames[:24]])
    rng = np.random.default_rng(seed)
    est = LTAUEstimator(k=3, distribution=distribution,
                        metadata={"model_sha256": sha256_file(tiny_nequip_run.checkpoint)})
    est.fit(x, rng.lognormal(-3, 0.4, size=(4, len(x))), atomic_numbers=z_train)
    cal = np.concatenate([q, x + 0.01])
    z_cal = np.concatenate([z_train, z_train])
    # errors that grow with the distance to the training set, so g(r) is not flat
    d = est.predict(cal)["distance"]
    errors = rng.lognormal(-3, 0.3, size=len(cal)) * (1.0 + 4.0 * d / d.max())
    commonest = np.bincount(z_cal).argmax()
    errors[z_cal == commonest] *= 4.0  # one element errs more: it earns a factor of its own
    errors[z_cal != commonest] *= 0.5
    est.fit_calibration(cal, errors, atomic_numbers=z_cal, frame_ids=np.arange(len(cal)) // 13)
    return est, q, z_train


@pytest.mark.parametrize("distribution,weights", [("compact", "uniform"), ("exact", "uniform"),
                                                  ("compact", "distance")])
def test_distance_aware_readout_equals_predict_with_atomic_numbers(tiny_nequip_run, tiny_latents, latent_calc,
                                                                    distribution, weights):
    """A calibrated estimator compiles in its distance-aware form: per-atom scale c_Z · g(d / d_ref) and
    each neighbour's error distribution at threshold / s_j, as predict computes with atomic numbers."""
    from ltau_ase.nequip.inmodel import DISTANCE_AWARE_FIELDS, readout_from_estimator

    est, q, z = _calibrated(tiny_nequip_run, tiny_latents, distribution)
    est.set_params(weights=weights)
    assert est.element_factor_z_.size > 0  # per-element factors are exercised
    type_names = list(latent_calc.model.type_names)
    types = np.array([type_names.index(sym) for f in tiny_nequip_run.frames[:24] for sym in f.get_chemical_symbols()])
    readout = readout_from_estimator(latent_calc.model, est)
    assert readout.provenance["form"] == "distance_aware"
    assert readout.provenance["fields"] == list(DISTANCE_AWARE_FIELDS)
    expected = est.predict(q, atomic_numbers=z)
    got = readout_predict(readout, q, atom_types=types)
    # issue 12's tolerance (1e-5): the float32 latent distances (torch vs FAISS round-off, ~1e-7) enter
    # the scale, and through it the point at which each neighbour's CDF is read
    for key in ("confidence", "uncertainty", "expected_error", "distance", "distance_ratio"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # far from the training set: the power-law tail of g, still equal
    far = q[:13] + 3.0 * np.abs(q).max()
    got_far, want_far = readout_predict(readout, far, atom_types=types[:13]), est.predict(far, atomic_numbers=z[:13])
    assert np.all(want_far["distance_ratio"] > np.exp(est.distance_scale_.log_ratio[-1]))
    for key in ("confidence", "expected_error"):
        np.testing.assert_allclose(got_far[key], want_far[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # the paper's form on request, equal to predict(distance_aware=False)
    paper = readout_from_estimator(latent_calc.model, est, paper_form=True)
    assert paper.provenance["form"] == "paper" and not paper.distance_aware
    np.testing.assert_allclose(readout_predict(paper, q)["confidence"],
                               est.predict(q, distance_aware=False)["confidence"], rtol=1e-6, atol=1e-9)


def test_compile_refuses_the_compressed_reference_for_a_calibrated_estimator(tiny_nequip_run, tiny_latents,
                                                                            latent_calc, tmp_path, capsys):
    """The distance-aware form needs every training atom's distribution: the compressed reference of a
    calibrated estimator is refused (one line, exit 2, nothing written) unless --paper-form."""
    from ltau_ase.nequip.inmodel import readout_from_estimator

    est, q, _ = _calibrated(tiny_nequip_run, tiny_latents, "compact")
    est.save(str(tmp_path / "cal.ltau"))
    out = tmp_path / "m.nequip.pt2"
    assert _cli(tiny_nequip_run.checkpoint, tmp_path / "cal.ltau", out, "--reference", "compressed") == 2
    err = capsys.readouterr().err
    assert "calibrated" in err and "--paper-form" in err and "exact" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.ltau"]
    readout = readout_from_estimator(latent_calc.model, est, mode="compressed", paper_form=True)
    assert readout.provenance["form"] == "paper" and readout.compressed


def test_compressed_accuracy_of_a_calibrated_estimator_compares_the_paper_form(tiny_nequip_run, tiny_latents):
    """The compressed readout is the paper's form; a calibrated estimator's default predict is distance-aware.
    With one centroid per training atom the compressed result must equal the exact paper form, and a query-time
    k changed after the calibration (benchmarks/compressed_reference.py --k) leaves the paper form usable."""
    est, q, _ = _calibrated(tiny_nequip_run, tiny_latents, "compact")
    x, _ = tiny_latents
    est.set_params(k=2)
    with pytest.raises(ValueError, match="fitted with k=3"):
        est.predict(q)
    full = compressed_accuracy(est, q, n_centroids=len(x))
    if full["n_centroids"] == len(x):  # k-means placed one centroid on every atom
        assert full["k"] == 2 and full["max_abs_uncertainty_diff"] < 1e-6


def test_readout_compiles_conformal_bounds_like_predict(tiny_nequip_run, tiny_latents, latent_calc):
    """``coverage=q`` adds ltau_force_error_bound = q_Z × expected error, q_Z the element's conformal
    quantile (hand-computed from the calibration scores), equal to predict(..., coverage=q)."""
    import math

    from ltau_ase.nequip.inmodel import BOUNDED_FIELDS, readout_from_estimator

    est, q, z = _calibrated(tiny_nequip_run, tiny_latents, "compact")
    type_names = list(latent_calc.model.type_names)
    types = np.array([type_names.index(sym) for f in tiny_nequip_run.frames[:24] for sym in f.get_chemical_symbols()])
    readout = readout_from_estimator(latent_calc.model, est, coverage=0.9)
    assert readout.provenance["fields"] == list(BOUNDED_FIELDS) and readout.provenance["coverage"] == 0.9
    got = readout_predict(readout, q, atom_types=types)
    expected = est.predict(q, atomic_numbers=z, coverage=0.9)
    np.testing.assert_allclose(got["error_bound"], expected["error_bound"], rtol=1e-5, atol=1e-7)
    # the quantile per element, from the sorted calibration scores: rank ceil((n + 1) q)
    conformal = est.conformal_
    assert conformal.groups_.size >= 1  # Mondrian groups are exercised
    for zz in np.unique(z):
        hit = np.flatnonzero(conformal.groups_ == zz)
        scores = np.sort(conformal.scores_[hit[0]] if hit.size else conformal.pooled_)
        rank = math.ceil((scores.size + 1) * 0.9)
        want = scores[rank - 1] if rank <= scores.size else math.inf
        atoms = z == zz
        np.testing.assert_allclose(got["error_bound"][atoms] / got["expected_error"][atoms], want, rtol=1e-9)
    # without a coverage, no bound field; bounds need the distance-aware form and a calibrated estimator
    assert not readout_from_estimator(latent_calc.model, est).error_bounds
    with pytest.raises(ValueError, match="distance-aware form"):
        readout_from_estimator(latent_calc.model, est, paper_form=True, coverage=0.9)
    est_plain = LTAUEstimator(k=3).fit(tiny_latents[0], np.full((2, len(tiny_latents[0])), 0.1))
    with pytest.raises(ValueError, match="calibrated"):
        readout_from_estimator(latent_calc.model, est_plain, coverage=0.9)
    with pytest.raises(ValueError, match="open interval"):
        readout_from_estimator(latent_calc.model, est, coverage=1.5)


def test_in_model_bounds_reach_the_calculator(tiny_nequip_run, tiny_latents, latent_calc):
    """LTAUCalculator over a model carrying bounds reports force_error_bounds (the eager estimator's at
    the same coverage) and refuses another coverage."""
    import copy

    from ltau_ase.nequip.inmodel import InModelLTAUCalculator, append_ltau, readout_from_estimator
    from ltau_ase.simulate.calculator import LTAUCalculator

    est, _, _ = _calibrated(tiny_nequip_run, tiny_latents, "exact")
    model = append_ltau(copy.deepcopy(latent_calc.model), readout_from_estimator(latent_calc.model, est, coverage=0.8))
    inner = InModelLTAUCalculator(model, transforms=latent_calc.transforms)
    calc = LTAUCalculator(inner, None)
    assert calc.coverage == 0.8 and "force_error_bounds" in calc.implemented_properties
    eager = LTAUCalculator(copy.deepcopy(latent_calc), est, coverage=0.8)
    atoms = tiny_nequip_run.frames[3].copy()
    atoms.rattle(0.05, seed=4)
    got = calc.get_property("force_error_bounds", atoms.copy())
    want = eager.get_property("force_error_bounds", atoms.copy())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert np.all(got > 0)
    with pytest.raises(ValueError, match="compiled with coverage 0.8"):
        LTAUCalculator(inner, None, coverage=0.9)
    assert LTAUCalculator(inner, None, coverage=0.8).coverage == 0.8
    plain = append_ltau(copy.deepcopy(latent_calc.model), readout_from_estimator(latent_calc.model, est))
    with pytest.raises(ValueError, match="without error bounds"):
        LTAUCalculator(InModelLTAUCalculator(plain, transforms=latent_calc.transforms), None, coverage=0.8)


def test_compile_cli_refuses_bad_coverage_before_compiling(tiny_nequip_run, tiny_latents, matching_estimator_file,
                                                           tmp_path, capsys):
    est, _, _ = _calibrated(tiny_nequip_run, tiny_latents, "compact")
    est.save(str(tmp_path / "cal.ltau"))
    out = tmp_path / "m.nequip.pt2"
    for bad in ("1.5", "nan", "0"):  # argparse: usage line + error line, exit 2
        with pytest.raises(SystemExit) as exc:
            _cli(tiny_nequip_run.checkpoint, tmp_path / "cal.ltau", out, "--coverage", bad)
        assert exc.value.code == 2 and "(0, 1)" in capsys.readouterr().err
    for est_path, extra, needle in ((tmp_path / "cal.ltau", ["--coverage", "0.9", "--paper-form"], "distance-aware"),
                                    (matching_estimator_file, ["--coverage", "0.9"], "calibrated")):
        assert _cli(tiny_nequip_run.checkpoint, est_path, out, *extra) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.ltau"]
