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
    assert counts == {"total": 8, "skipped": 0, "done": 6, "failed": 2}
    done, failed = load_labels(db)
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
    assert counts == {"total": 12, "skipped": 8, "done": 0, "failed": 4}
    done, failed = load_labels(db)
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
