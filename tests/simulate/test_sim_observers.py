"""RelaxationUQObserver and UncertaintyStop on real ASE optimizers and MD drivers."""
from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.constraints import FixCom
from ase.io import Trajectory, read, write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS, FIRE, LBFGS

from sim_standins import CountingDescriptors, ScriptedUQCalculator, StandInEstimator, make_slab
from ltau_ase.simulate.calculator import LTAUCalculator
from ltau_ase.simulate.observers import RelaxationUQObserver, UncertaintyStop

SEQ = [0.30, 0.10, 0.50, 0.20, 0.40, 0.35, 0.05, 0.60, 0.25, 0.15, 0.45, 0.55]


def _scripted(atoms, seq=SEQ):
    calc = ScriptedUQCalculator(seq)
    atoms.calc = calc
    return calc, np.linspace(0.25, 1.0, len(atoms))


# ---------------------------------------------------------------------------- observer
@pytest.mark.parametrize("opt_cls", [BFGS, LBFGS, FIRE])
@pytest.mark.parametrize("with_traj", [False, True])
def test_observer_trace_and_summary_from_known_uncertainties(opt_cls, with_traj, tmp_path):
    atoms = make_slab()
    calc, w = _scripted(atoms)
    free = atoms.get_tags() > 0
    obs = RelaxationUQObserver(atoms, atom_reduce="mean", select="free")
    opt = opt_cls(atoms, logfile=None, trajectory=str(tmp_path / "r.traj") if with_traj else None)
    opt.attach(obs)
    opt.run(fmax=1e-6, steps=8)
    assert opt.nsteps == 8
    assert calc.n_calc == 9  # the observer never made the calculator compute anything extra
    expected = np.array([SEQ[k] * w[free].mean() for k in range(9)])  # independent recomputation
    np.testing.assert_allclose(obs.trace, expected, rtol=1e-12)
    s = obs.summary()
    assert s == pytest.approx({"initial": expected[0], "max": expected.max(), "mean": expected.mean(),
                               "final": expected[-1], "nsteps": 8})
    assert s["nsteps"] == 8 and isinstance(s["nsteps"], int)
    for k, v in s.items():
        assert atoms.info[f"ltau_uq_{k}"] == v
    np.testing.assert_allclose(atoms.arrays["ltau_uncertainties"], SEQ[8] * w)
    if with_traj:
        assert len(Trajectory(str(tmp_path / "r.traj"))) == 9


@pytest.mark.parametrize("select, reduce, key, factor", [
    ("all", "max", "uncertainties", 1.0),
    ([2], "mean", "expected_force_errors", 2.0),
    ([1, 2], 0.75, "latent_distances", 3.0),
    (np.array([0, 5, 12]), "mean", "uncertainties", 1.0),
])
def test_observer_select_reduce_and_keys(select, reduce, key, factor):
    atoms = make_slab()
    _, w = _scripted(atoms)
    tags = atoms.get_tags()
    mask = {"all": np.ones(len(atoms), bool)}.get(select) if isinstance(select, str) else (
        np.isin(tags, select) if isinstance(select, list) else np.isin(np.arange(len(atoms)), select))
    obs = RelaxationUQObserver(atoms, atom_reduce=reduce, select=select, key=key)
    opt = BFGS(atoms, logfile=None)
    opt.attach(obs)
    opt.run(fmax=1e-6, steps=3)
    f = {"max": np.max, "mean": np.mean}.get(reduce, lambda v: np.quantile(v, reduce))
    expected = [f(factor * SEQ[k] * w[mask]) for k in range(4)]
    np.testing.assert_allclose(obs.trace, expected, rtol=1e-12)
    assert ("ltau_" + key) in atoms.arrays


def test_observer_with_ltau_calculator_and_extxyz_round_trip(tmp_path):
    atoms = make_slab()
    atoms.calc = LTAUCalculator(ScriptedUQCalculator([0.0]).base, StandInEstimator(),
                                descriptors=CountingDescriptors())
    obs = RelaxationUQObserver(atoms, atom_reduce="max", select="free")
    opt = BFGS(atoms, logfile=None, trajectory=str(tmp_path / "t.traj"))
    opt.attach(obs)
    opt.run(fmax=0.05, steps=50)
    z = atoms.positions[:, 2]
    free = atoms.get_tags() > 0
    final = (1 / (1 + np.exp(-(z - z.mean()))))[free].max()
    assert obs.summary()["final"] == pytest.approx(final, rel=1e-6)
    frames = Trajectory(str(tmp_path / "t.traj"))
    assert len(obs.trace) == len(frames) == opt.nsteps + 1
    z0 = frames[0].positions[:, 2]
    assert obs.trace[0] == pytest.approx((1 / (1 + np.exp(-(z0 - z0.mean()))))[free].max(), rel=1e-6)
    write(tmp_path / "final.extxyz", atoms)
    back = read(tmp_path / "final.extxyz")
    assert back.info["ltau_uq_max"] == pytest.approx(obs.summary()["max"], rel=1e-7)
    assert back.info["ltau_uq_nsteps"] == opt.nsteps
    np.testing.assert_allclose(back.arrays["ltau_uncertainties"], obs.per_atom_last, rtol=1e-7)


def test_observer_and_stop_bad_inputs():
    atoms = make_slab()
    with pytest.raises(ValueError, match="no calculator"):
        RelaxationUQObserver(atoms)
    _scripted(atoms)
    with pytest.raises(ValueError, match="does not provide 'uncertainty'.*uncertainties"):
        RelaxationUQObserver(atoms, key="uncertainty")
    with pytest.raises(ValueError, match="atom_reduce"):
        RelaxationUQObserver(atoms, atom_reduce="median")
    with pytest.raises(ValueError, match="quantile must lie"):
        RelaxationUQObserver(atoms, atom_reduce=1.5)
    with pytest.raises(ValueError, match="selects no atom"):
        RelaxationUQObserver(atoms, select=[7])
    with pytest.raises(ValueError, match=r"must lie in \[-13, 13\)"):
        RelaxationUQObserver(atoms, select=np.array([0, 13]))
    with pytest.raises(ValueError, match="select must be"):
        RelaxationUQObserver(atoms, select="surface")
    obs = RelaxationUQObserver(atoms)
    del atoms[-1]
    with pytest.raises(ValueError, match="now has 12 atoms"):
        obs()
    atoms = make_slab()
    _scripted(atoms)
    dyn = BFGS(atoms, logfile=None)
    with pytest.raises(ValueError, match="threshold is required"):
        UncertaintyStop(dyn, None)
    with pytest.raises(ValueError, match="patience"):
        UncertaintyStop(dyn, 0.5, patience=0)
    with pytest.raises(ValueError, match="does not provide 'forces_std'"):
        UncertaintyStop(dyn, 0.5, key="forces_std")


# ---------------------------------------------------------------------------- stop
def _md(atoms, kind, traj):
    if kind == "nve":
        return VelocityVerlet(atoms, timestep=1.0 * units.fs, trajectory=traj, logfile=None)
    atoms.set_constraint(atoms.constraints + [FixCom()])
    return Langevin(atoms, timestep=1.0 * units.fs, temperature_K=300, friction=0.02, fixcm=False,
                    trajectory=traj, logfile=None, rng=np.random.default_rng(1))


# values above threshold 0.5 (weights max 1 -> max over atoms = SEQ value): steps 2 (0.50 is not >),
# 7 (0.60), 11 (0.55); with 3 consecutive: a scripted run of highs
HIGH3 = [0.1, 0.6, 0.1, 0.6, 0.6, 0.1, 0.6, 0.6, 0.6, 0.6, 0.1, 0.1, 0.1, 0.1]


@pytest.mark.parametrize("driver", ["nve", "langevin", "bfgs"])
@pytest.mark.parametrize("patience, seq, expected_step", [(1, SEQ, 7), (3, HIGH3, 8)])
def test_stop_fires_at_expected_step_and_trajectory_is_complete(driver, patience, seq, expected_step, tmp_path):
    atoms = make_slab()
    calc, w = _scripted(atoms, seq + [0.0] * 30)
    traj = str(tmp_path / "run.traj")
    if driver == "bfgs":
        dyn = BFGS(atoms, logfile=None, trajectory=traj)
    else:
        thermalize_momenta(atoms, 300, rng=np.random.default_rng(0))
        dyn = _md(atoms, driver, traj)
    seen = []
    stop = UncertaintyStop(dyn, 0.5, patience=patience, save_to=tmp_path / "trigger.extxyz",
                           on_trigger=lambda a, info: seen.append((a.positions.copy(), info)))
    dyn.attach(stop)
    xyz = tmp_path / "frames.extxyz"
    dyn.attach(lambda: write(xyz, atoms, append=True))  # attached after the stop: still gets the trigger
    if driver == "bfgs":
        converged = dyn.run(fmax=1e-6, steps=25)
        assert not converged
    else:
        dyn.run(25)
    assert stop.triggered and stop.step == expected_step and dyn.nsteps == expected_step
    assert stop.value == pytest.approx(seq[expected_step])
    assert calc.n_calc == expected_step + 1
    assert f"steps {expected_step - patience + 1}..{expected_step}" in stop.reason
    frames = Trajectory(traj)
    assert len(frames) == expected_step + 1  # every step 0..trigger
    np.testing.assert_allclose(frames[-1].positions, atoms.positions)
    assert len(read(xyz, ":")) == expected_step + 1
    (pos, info), = seen
    np.testing.assert_allclose(pos, atoms.positions)
    assert info["step"] == expected_step and info["threshold"] == 0.5
    np.testing.assert_allclose(info["per_atom"], seq[expected_step] * w)
    saved = read(tmp_path / "trigger.extxyz", ":")
    assert len(saved) == 1 and saved[0].info["ltau_stop_step"] == expected_step
    np.testing.assert_allclose(saved[0].arrays["ltau_uncertainties"], seq[expected_step] * w, rtol=1e-7)
    np.testing.assert_allclose(saved[0].get_forces(apply_constraint=False), atoms.get_forces(apply_constraint=False),
                               atol=1e-6)


def test_stop_not_triggered_runs_all_steps_and_fires_at_step_zero():
    atoms = make_slab()
    _scripted(atoms, [0.1] * 40)
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs, logfile=None)
    stop = UncertaintyStop(dyn, 0.5)
    dyn.attach(stop)
    dyn.run(10)
    assert not stop.triggered and stop.step is None and dyn.nsteps == 10 and len(stop.values) == 11
    atoms = make_slab()
    _scripted(atoms, [0.9] + [0.1] * 40)
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs, logfile=None)
    stop = UncertaintyStop(dyn, 0.5)
    dyn.attach(stop)
    dyn.run(10)
    assert stop.triggered and stop.step == 0 and dyn.nsteps == 0


def test_stop_adaptive_threshold_matches_running_statistics():
    rng = np.random.default_rng(3)
    base = list(0.2 + 0.01 * rng.standard_normal(12))
    seq = base + [0.26, 0.2, 0.5, 0.2]
    atoms = make_slab()
    _scripted(atoms, seq + [0.2] * 20)
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs, logfile=None)
    stop = UncertaintyStop(dyn, threshold=None, adaptive=True, warmup=10, n_sigma=4.0)
    dyn.attach(stop)
    dyn.run(30)
    assert np.all(np.isinf(stop.bounds[:10]))  # warm-up
    for step in range(10, len(stop.values)):
        earlier = [v for v, b in zip(stop.values[:step], stop.bounds[:step]) if v <= b]
        assert stop.bounds[step] == pytest.approx(np.mean(earlier) + 4.0 * np.std(earlier, ddof=1))
    expected = next(i for i in range(10, len(seq)) if seq[i] > stop.bounds[i])
    assert stop.triggered and stop.step == expected and seq[expected] in (0.26, 0.5)
    # an absolute ceiling applies from the first step, even during the warm-up
    atoms = make_slab()
    _scripted(atoms, [0.2, 0.2, 0.7] + [0.2] * 20)
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs, logfile=None)
    stop = UncertaintyStop(dyn, threshold=0.6, adaptive=True, warmup=10)
    dyn.attach(stop)
    dyn.run(20)
    assert stop.step == 2
