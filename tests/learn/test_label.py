"""Labelling into an ase.db: EMT values, failures recorded, resume without relabelling (< 15 s)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.emt import EMT

sys.path.insert(0, str(Path(__file__).parent))
from references import FailingEMT, SlowEMT, positions_key  # noqa: E402

from ltau_ase.learn.label import CalculatorFactory, label_frames, load_labels  # noqa: E402
from ltau_ase.nequip.training import emt_slab_frames  # noqa: E402


@pytest.fixture(scope="module")
def frames():
    # adsorbates cycle O, H: frames 0-5 carry O, 6-11 H (see emt_slab_frames)
    out = []
    for i, a in enumerate(emt_slab_frames(12, seed=5)):
        a.calc = None
        out.append((f"frame{i:02d}", a))
    return out


def test_labels_match_emt_and_failures_are_recorded(tmp_path, frames):
    db = tmp_path / "labels.db"
    counts = label_frames(frames[:8], db, FailingEMT(raise_on=("H",), nan_on=()), progress=False)
    assert counts == {"total": 8, "skipped": 0, "done": 6, "failed": 2, "rejected": 0}
    done, failed, rejected = load_labels(db)
    assert rejected == {}
    assert sorted(done) == [f"frame{i:02d}" for i in range(6)]
    assert set(failed) == {"frame06", "frame07"} and all("SCF did not converge" in r for r in failed.values())
    for name, atoms in frames[:6]:
        ref = atoms.copy()
        ref.calc = EMT()
        np.testing.assert_allclose(done[name].get_forces(apply_constraint=False),
                                   ref.get_forces(apply_constraint=False), rtol=1e-10, atol=1e-12)
        assert done[name].get_potential_energy() == pytest.approx(ref.get_potential_energy(), rel=1e-12)
    # NaN forces: failed with a reason; the frames already labelled are skipped, not redone
    counts = label_frames(frames, db, FailingEMT(nan_on=("H",)), progress=False)
    assert counts == {"total": 12, "skipped": 8, "done": 0, "failed": 4, "rejected": 0}
    done, failed, _ = load_labels(db)
    assert len(done) + len(failed) == 12
    assert all("not finite" in failed[f"frame{i:02d}"] for i in range(8, 12))


def test_resume_does_not_relabel(tmp_path, frames):
    db, log = tmp_path / "labels.db", tmp_path / "calls.log"
    ref = SlowEMT(0.0, str(log))
    label_frames(frames[:5], db, ref, progress=False)
    label_frames(frames, db, ref, progress=False)
    calls = log.read_text().split()
    assert sorted(calls) == sorted(positions_key(a) for _, a in frames)  # each frame computed once
    with pytest.raises(ValueError, match="unique"):
        label_frames([frames[0], frames[0]], tmp_path / "x.db", ref, progress=False)


def test_calculator_factory_is_a_recipe():
    calc = CalculatorFactory("ase.calculators.emt:EMT")()
    assert isinstance(calc, EMT)
    assert hash(CalculatorFactory("ase.calculators.emt:EMT")) == hash(CalculatorFactory())
    with pytest.raises(ValueError, match="module:name"):
        CalculatorFactory("EMT")()


def test_reference_trust_cap_records_rejected_frames(tmp_path, frames):
    """Frames over max_reference_force are stored as rejected with their EMT values and reason; a
    resume computes nothing again and loses nothing."""
    from ase.db import connect

    squeezed = []
    for name, atoms in frames[:3]:  # the adsorbate pushed into the surface atom below it: a collision
        a = atoms.copy()
        below = int(np.argmin(np.linalg.norm(a.positions[:-1, :2] - a.positions[-1, :2], axis=1)
                              + 100 * (a.positions[:-1, 2] < a.positions[:-1, 2].max() - 0.5)))
        a.positions[-1] = a.positions[below] + np.array([0.0, 0.0, 0.6])
        squeezed.append((name + "_squeezed", a))
    batch = frames[:4] + squeezed
    emt_fmax = {}
    for name, atoms in batch:
        ref = atoms.copy()
        ref.calc = EMT()
        emt_fmax[name] = np.linalg.norm(ref.get_forces(apply_constraint=False), axis=1).max()
    cap = 20.0
    over = {n for n, f in emt_fmax.items() if f > cap}
    assert over == {n for n, _ in squeezed}  # the collisions, and only they, exceed the cap (EMT itself)

    db, log = tmp_path / "labels.db", tmp_path / "calls.log"
    ref = SlowEMT(0.0, str(log))
    counts = label_frames(batch[:5], db, ref, progress=False, max_reference_force=cap)
    assert counts == {"total": 5, "skipped": 0, "done": 4, "failed": 0, "rejected": 1}
    counts = label_frames(batch, db, ref, progress=False, max_reference_force=cap)  # resume
    assert counts == {"total": 7, "skipped": 5, "done": 0, "failed": 0, "rejected": 2}
    assert sorted(log.read_text().split()) == sorted(positions_key(a) for _, a in batch)  # each computed once
    done, failed, rejected = load_labels(db)
    assert sorted(done) == sorted(n for n, _ in frames[:4]) and failed == {}
    assert sorted(rejected) == sorted(over)
    rows = {r.get("name"): r for r in connect(str(db)).select()}
    assert len(rows) == len(batch)
    for name, atoms in squeezed:  # kept with the reference values it cost and a reason
        assert rows[name].get("status") == "rejected"
        f = rejected[name].get_forces(apply_constraint=False)
        assert np.linalg.norm(f, axis=1).max() == pytest.approx(emt_fmax[name], rel=1e-12)
        assert f"{emt_fmax[name]:.4g} eV/Å exceeds max_reference_force = 20 eV/Å" in rejected[name].info["reason"]
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="max_reference_force must be a positive force"):
            label_frames(batch, db, ref, progress=False, max_reference_force=bad)
