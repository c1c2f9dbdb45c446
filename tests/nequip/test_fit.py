"""``ltau fit`` / fit_estimator_from_runs and the checkpoint-ensemble mode on tiny real runs."""
from __future__ import annotations

import hashlib

import ase.io
import numpy as np
import pytest

from ltau_ase.cli import main as ltau_main
from ltau_ase.core.atom_ids import global_atom_ids
from ltau_ase.core.errorlog import ErrorLog
from ltau_ase.core.estimator import LTAUEstimator
from ltau_ase.nequip.fit import error_logs_from_checkpoints, find_error_log, fit_estimator_from_runs

pytestmark = pytest.mark.slow


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ltau_fit_cli_end_to_end(tiny_nequip_ensemble, tmp_path, capsys):
    ens = tiny_nequip_ensemble
    out = tmp_path / "est.ltau"
    argv = ["fit", *(str(r.run_dir) for r in ens.runs), "--train-file", *(str(f) for f in ens.train_files)]
    argv += ["--output", str(out), "--k", "5", "--skip-epochs", "1", "--atol", "0.5", "--no-progress"]
    assert ltau_main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    est = LTAUEstimator.load(str(out))
    meta = est.metadata
    # default model: the first run's last checkpoint (the file README step 3 and `ltau relax` load),
    # hashed independently here, although the run also wrote a different best.ckpt
    last, best = ens.runs[0].run_dir / "last.ckpt", ens.runs[0].run_dir / "best.ckpt"
    assert best.is_file() and _sha256(best) != _sha256(last)
    assert meta["model_sha256"] == _sha256(last)
    assert meta["model_path"] == str(last.resolve())
    # the README's pairing works; the other checkpoint (another latent space) is refused by name
    from ltau_ase.simulate.calculator import LTAUCalculator

    calc = LTAUCalculator.from_model(last, out, chemical_species_to_atom_type_map=True)
    assert calc.estimator.metadata["model_sha256"] == _sha256(last)
    with pytest.raises(ValueError, match=r"fitted for a model with sha256 .*last\.ckpt"):
        LTAUCalculator.from_nequip(best, out)
    assert meta["k"] == 5 and est.k == 5
    assert meta["index"] == "flat" and est.index == "flat"  # auto: far below 1e5 atoms
    assert meta["atol"] == 0.5 and est.atol_ == 0.5
    assert meta["epoch_window"] == {"skip": 1, "last": None}
    assert meta["run_dirs"] == [str(r.run_dir.resolve()) for r in ens.runs]
    assert meta["train_files"] == [str(f.resolve()) for f in ens.train_files]
    assert meta["n_runs"] == 2
    # the training split only (validation frames are skipped), in the logs' order
    log_ids = ErrorLog(ens.runs[0].error_log_dir).atom_ids
    assert est.n_train_atoms_ == log_ids.size == (len(ens.frames) - ens.n_val) * len(ens.frames[0])
    assert np.array_equal(est.atom_ids_, log_ids)


def test_ltau_fit_over_the_memory_budget_stops_before_extracting_descriptors(tiny_nequip_ensemble, tmp_path, capsys, monkeypatch):
    import ltau_ase.nequip.descriptors as descriptors

    ens = tiny_nequip_ensemble
    n_frames = []
    real = descriptors.extract_descriptors
    monkeypatch.setattr(descriptors, "extract_descriptors", lambda calc, frames, **kw: n_frames.append(len(frames)) or real(calc, frames, **kw))
    argv = ["fit", *(str(r.run_dir) for r in ens.runs), "--train-file", *(str(f) for f in ens.train_files)]
    argv += ["--output", str(tmp_path / "est.ltau"), "--no-progress", "--max-memory", "100K"]
    assert ltau_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ltau fit: error: this fit needs about") and "max_memory is 0.00 GB" in err
    assert n_frames == [1] and not (tmp_path / "est.ltau").exists()  # one probe frame, then stop
    assert ltau_main(argv[:-1] + ["1G"]) == 0 and n_frames[1:] == [1, len(ens.frames) - ens.n_val]


def test_descriptor_rows_align_with_logged_atoms(tiny_nequip_ensemble):
    """With k = 1 a training atom's nearest neighbour is itself, so its predicted confidence must be
    its own training confidence: any shuffle of descriptor rows against log columns breaks this."""
    from ltau_ase.nequip.calculator import LatentNequIPCalculator

    ens = tiny_nequip_ensemble
    est = fit_estimator_from_runs(
        [r.run_dir for r in ens.runs], ens.train_files, None, k=1, atol=0.5, progress=False, distribution="exact",
        window=None,  # every logged epoch, as the brute-force truth below
    )
    calc = LatentNequIPCalculator.from_model_file(ens.runs[0].run_dir / "last.ckpt")  # the default model
    frames = ase.io.read(ens.train_files[0], index=":")
    logged = [a for a in frames if global_atom_ids([a.info["frame_id"]], [len(a)])[0] in set(est.atom_ids_)]
    assert len(logged) == len(frames) - ens.n_val
    # the independent truth: each atom's fraction of logged epochs (both runs) with error <= atol
    logs = [np.asarray(ErrorLog(r.error_log_dir).errors()) for r in ens.runs]
    p_true = np.concatenate(logs).__le__(0.5).mean(axis=0)
    for atoms in logged[:6]:
        atoms.calc = calc
        atoms.get_potential_energy()
        pred = est.predict(calc.results["descriptors"])
        rows = np.searchsorted(est.atom_ids_, global_atom_ids([atoms.info["frame_id"]], [len(atoms)]))
        np.testing.assert_allclose(pred["distance"], 0.0, atol=1e-3)
        np.testing.assert_allclose(pred["confidence"], p_true[rows], atol=1e-6)


def test_fit_refuses_training_files_that_do_not_match_the_logs(tiny_nequip_ensemble, tmp_path):
    ens = tiny_nequip_ensemble
    frames = ase.io.read(ens.train_files[0], index=":")
    # a frame with one atom fewer than when the runs were trained
    changed = [a.copy() for a in frames]
    for a, b in zip(changed, frames):
        a.calc = b.calc
    log_frames = {int(i >> 20) for i in ErrorLog(ens.runs[0].error_log_dir).atom_ids}
    victim = next(i for i, a in enumerate(frames) if a.info["frame_id"] in log_frames)
    forces = frames[victim].get_forces()[:-1]
    del changed[victim][-1]
    from ase.calculators.singlepoint import SinglePointCalculator

    changed[victim].calc = SinglePointCalculator(changed[victim], energy=0.0, forces=forces)
    bad = tmp_path / "changed.xyz"
    ase.io.write(bad, changed, format="extxyz")
    runs = [r.run_dir for r in ens.runs]
    with pytest.raises(ValueError, match="descriptor atom ids do not match the error logs"):
        fit_estimator_from_runs(runs, [bad], None, progress=False)
    partial = tmp_path / "partial.xyz"
    ase.io.write(partial, frames[: len(frames) // 2], format="extxyz")
    with pytest.raises(ValueError, match="not in the training files"):
        fit_estimator_from_runs(runs, [partial], None, progress=False)
    with pytest.raises(FileNotFoundError, match="no LTAU error log"):
        find_error_log(tmp_path)


def test_checkpoint_ensemble_reproduces_the_exact_mode_log(tiny_nequip_run, tmp_path):
    run = tiny_nequip_run
    checkpoints = [run.run_dir / "epochs" / f"epoch{e:04d}.ckpt" for e in range(run.max_epochs)]
    log_dir = error_logs_from_checkpoints(checkpoints, run.train_files, tmp_path / "ckpt_log", components=True, progress=False)
    log, exact = ErrorLog(log_dir), ErrorLog(run.exact_log_dir)
    assert np.array_equal(log.atom_ids, exact.atom_ids)
    assert log.n_epochs == run.max_epochs and log.epochs == list(range(run.max_epochs))
    assert log.metadata["checkpoint_sha256"] == [_sha256(c) for c in checkpoints]
    # two different code paths (training data pipeline vs. calculator conversion) agree
    np.testing.assert_allclose(np.asarray(log.errors()), np.asarray(exact.errors()), rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(log.components()), np.asarray(exact.components()), rtol=1e-4, atol=2e-4)
    # and such a log feeds the estimator like a callback log
    est = fit_estimator_from_runs([log_dir], run.train_files, None, k=3, progress=False)
    assert est.metadata["model_sha256"] == _sha256(checkpoints[-1])  # default: the last checkpoint
    assert est.n_train_atoms_ == log.n_atoms


def test_ltau_fit_reference_groups(tiny_nequip_ensemble, tmp_path, capsys):
    """--reference-groups KEY: the reference distance leaves each group out (here each frame, by its frame_id)."""
    ens = tiny_nequip_ensemble
    out = tmp_path / "groups.ltau"
    argv = ["fit", *(str(r.run_dir) for r in ens.runs), "--train-file", *(str(f) for f in ens.train_files),
            "--output", str(out), "--k", "3", "--no-progress"]
    assert ltau_main(argv + ["--reference-groups", "frame_id"]) == 0
    est = LTAUEstimator.load(str(out))
    assert est.reference_rule_ == "groups" and est.metadata["group_key"] == "frame_id"
    frame = est.atom_ids_ >> 20
    x = est.index_.training_vectors().astype(np.float64)
    d = np.linalg.norm(x[:, None] - x[None], axis=2)
    d[frame[:, None] == frame[None, :]] = np.inf  # brute force: other frames only
    brute = np.sort(np.sort(d, axis=1)[:, :3].mean(axis=1))
    np.testing.assert_allclose(est.train_distance_ref_, brute, rtol=1e-4, atol=1e-6)
    assert ltau_main(argv + ["--reference-groups", "no_such_key"]) == 2
    assert "has no info['no_such_key']" in capsys.readouterr().err
