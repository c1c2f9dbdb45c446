"""`ltau reweight` on small synthetic error logs and a small fitted estimator."""
from __future__ import annotations

import argparse

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from ltau_ase.cartography import loss_weights, regions
from ltau_ase.cli import reweight
from ltau_ase.core.atom_ids import global_atom_ids
from ltau_ase.core.errorlog import ErrorLog, ErrorLogWriter


def parse(argv):
    parser = argparse.ArgumentParser()
    reweight.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def dataset(tmp_path):
    """3 training frames in an extxyz file and 2 runs × 4 epochs of error logs (in shuffled id order)."""
    rng = np.random.default_rng(0)
    frames = []
    for f, n in enumerate((2, 3, 4)):
        atoms = Atoms(["H"] * n, positions=rng.uniform(0, 4, (n, 3)), cell=[5, 5, 5], pbc=True)
        atoms.info["frame_id"] = 100 + f
        atoms.info["config_type"] = "small" if n < 4 else "large"
        atoms.calc = SinglePointCalculator(atoms, energy=-float(n), forces=rng.normal(size=(n, 3)))
        frames.append(atoms)
    train = tmp_path / "train.extxyz"
    ase.io.write(train, frames, format="extxyz")
    ids = global_atom_ids([a.info["frame_id"] for a in frames], [len(a) for a in frames])
    n = ids.size
    # errors[m, e, i] for atom ids[i]; values 0.1 or 0.9 so that p at atol = 0.5 is k/4 exactly
    errors = np.where(rng.uniform(size=(2, 4, n)) < 0.6, 0.1, 0.9).astype(np.float32)
    logs = []
    for m in range(2):
        path = tmp_path / f"run{m}"
        perm = rng.permutation(n)
        with ErrorLogWriter(path, ids[perm]) as writer:
            for e in range(4):
                writer.append_epoch(ids[perm], errors[m, e, perm])
        logs.append(path)
    p = (errors <= 0.5).mean(axis=1)  # (M, N) per-run fractions, frame order
    return dict(frames=frames, train=train, logs=logs, ids=ids, mu=p.mean(0), sigma=p.std(0), errors=errors)


def read_column(path, key):
    return np.concatenate([a.arrays[key] for a in ase.io.read(path, index=":", format="extxyz")])


def test_reweight_from_error_logs(dataset, tmp_path, capsys):
    out = tmp_path / "out" / "weighted.extxyz"
    args = parse(["--error-logs", *map(str, dataset["logs"]), "--train-file", str(dataset["train"]),
                  "--output", str(out), "--scheme", "hard", "--atol", "0.5"])
    assert reweight.run(args) == 0
    mu, sigma = dataset["mu"], dataset["sigma"]
    np.testing.assert_allclose(read_column(out, "ltau_confidence"), mu, atol=5e-9)
    np.testing.assert_allclose(read_column(out, "ltau_variability"), sigma, atol=5e-9)
    np.testing.assert_allclose(read_column(out, "ltau_weight"), loss_weights(mu, sigma, "hard", 4.5), atol=5e-8)
    assert read_column(out, "ltau_region").tolist() == regions(mu, sigma).tolist()
    back = ase.io.read(out, index=":", format="extxyz")
    for orig, new in zip(dataset["frames"], back):
        np.testing.assert_allclose(new.get_forces(), orig.get_forces(), atol=5e-9)
    png = out.with_name("weighted_map.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "9 atoms in 3 frames" in capsys.readouterr().out


def test_reweight_default_atol_and_window(dataset, tmp_path):
    out = tmp_path / "w.extxyz"
    args = parse(["--error-logs", *map(str, dataset["logs"]), "--train-file", str(dataset["train"]),
                  "--output", str(out), "--scheme", "easy", "--skip-epochs", "1", "--map", str(tmp_path / "m.png")])
    assert reweight.run(args) == 0
    errors = dataset["errors"][:, 1:]
    atol = errors[:, -1].astype(np.float64).mean(axis=1).mean()  # MAE of the final epoch, averaged over runs
    p = (errors <= atol).mean(axis=1)
    np.testing.assert_allclose(read_column(out, "ltau_confidence"), p.mean(0), atol=5e-9)
    assert (tmp_path / "m.png").is_file()


def test_reweight_from_estimator(dataset, tmp_path):
    from ltau_ase.core.estimator import LTAUEstimator

    logs = [ErrorLog(p) for p in dataset["logs"]]
    n = logs[0].n_atoms
    est = LTAUEstimator(k=2, atol=0.5, window=None).fit(np.random.default_rng(1).normal(size=(n, 4)), logs)
    path = tmp_path / "est.ltau"
    est.save(str(path))
    out = tmp_path / "from_est.extxyz"
    assert reweight.run(parse(["--estimator", str(path), "--train-file", str(dataset["train"]),
                               "--output", str(out), "--scheme", "uniform"])) == 0
    np.testing.assert_allclose(read_column(out, "ltau_confidence"), dataset["mu"], atol=5e-9)
    np.testing.assert_allclose(read_column(out, "ltau_weight"), 1.0)
    with pytest.raises(ValueError, match="apply to --error-logs"):
        reweight.run(parse(["--estimator", str(path), "--train-file", str(dataset["train"]), "--atol", "0.3"]))
    # an estimator fitted from plain arrays has no atom ids: error logs are needed instead
    bare = LTAUEstimator(k=2, atol=0.5).fit(np.zeros((n, 2)) + np.arange(n)[:, None], dataset["errors"])
    bare.save(str(tmp_path / "bare.ltau"))
    with pytest.raises(ValueError, match="no training atom ids.*--error-logs"):
        reweight.run(parse(["--estimator", str(tmp_path / "bare.ltau"), "--train-file", str(dataset["train"])]))


def test_reweight_training_frames_not_covered(dataset, tmp_path):
    extra = dataset["frames"] + [dataset["frames"][0].copy()]
    extra[-1].info["frame_id"] = 999
    bigger = tmp_path / "bigger.extxyz"
    ase.io.write(bigger, extra, format="extxyz")
    args = parse(["--error-logs", *map(str, dataset["logs"]), "--train-file", str(bigger),
                  "--output", str(tmp_path / "x.extxyz")])
    with pytest.raises(ValueError, match="2 atom\\(s\\) of the training frames have no logged value.*999"):
        reweight.run(args)
    assert not (tmp_path / "x.extxyz").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reweight.run(parse(["--error-logs", str(dataset["logs"][0]), "--train-file", str(tmp_path / "nope.extxyz")]))
