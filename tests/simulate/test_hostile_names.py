"""Class 6 of issue 9 (unnamed structures), as a hostile user: nothing is silently skipped.

Before: unnamed structures were keyed by position (``structure_000000`` ...), so a second, different
unnamed batch into the same database was reported "already done" and never relaxed. Now an unnamed
structure is named from its content (:func:`content_name`: SHA-256 of numbers, positions, cell, pbc).
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from ase.io import write

from sim_standins import StandInFactory, batch_systems
from ltau_ase.simulate.batch import content_name, load_results, read_structures, relax_batch


def _unnamed(n, seed):
    systems = batch_systems(n=n, bad=False)
    rng = np.random.default_rng(seed)
    for a in systems:
        del a.info["name"]
        a.positions[-1] += rng.normal(scale=0.05, size=3)  # a different batch for each seed
    return systems


def _reference_name(atoms):
    """The documented recipe, written out independently."""
    blob = (np.asarray(atoms.numbers, dtype="<i8").tobytes()
            + (np.asarray(atoms.positions, dtype="<f8") + 0.0).tobytes()
            + (np.asarray(atoms.cell.array, dtype="<f8") + 0.0).tobytes()
            + np.asarray(atoms.pbc, dtype=bool).tobytes())
    return "unnamed-" + hashlib.sha256(blob).hexdigest()[:16]


def test_second_different_unnamed_batch_is_relaxed_not_skipped(tmp_path):
    db = tmp_path / "r.db"
    first, second = _unnamed(3, seed=1), _unnamed(3, seed=2)
    c1 = relax_batch(first, db, StandInFactory(), progress=False, steps=2)
    c2 = relax_batch(second, db, StandInFactory(), progress=False, steps=2)
    assert c1["skipped"] == 0 and c2["skipped"] == 0 and c2["unconverged"] + c2["done"] == 3
    names = [r["name"] for r in load_results(db)]
    assert len(names) == len(set(names)) == 6
    assert sorted(names) == sorted(_reference_name(a) for a in first + second)


def test_same_unnamed_batch_resumes_in_any_order_and_from_a_file(tmp_path):
    db = tmp_path / "r.db"
    batch = _unnamed(4, seed=3)
    write(tmp_path / "part.extxyz", batch[:2])  # a run killed after two systems, say
    relax_batch(str(tmp_path / "part.extxyz"), db, StandInFactory(), progress=False, steps=2)
    write(tmp_path / "batch.extxyz", batch[::-1])  # the whole batch, reordered
    counts = relax_batch(str(tmp_path / "batch.extxyz"), db, StandInFactory(), progress=False, steps=2)
    assert counts["skipped"] == 2 and counts["unconverged"] + counts["done"] == 2
    assert len(load_results(db)) == 4


@pytest.mark.parametrize("change", ["one coordinate bit", "species", "cell", "pbc"])
def test_any_content_change_gives_a_new_name(change):
    atoms = _unnamed(1, seed=4)[0]
    other = atoms.copy()
    if change == "one coordinate bit":
        other.positions[2, 0] = np.nextafter(other.positions[2, 0], np.inf)
    elif change == "species":
        other.numbers[0] = 78 if other.numbers[0] != 78 else 29
    elif change == "cell":
        other.cell[2, 2] += 1e-9
    else:
        other.pbc = [True, True, True]
    assert content_name(atoms) == _reference_name(atoms)
    assert content_name(other) == _reference_name(other) != content_name(atoms)


def test_negative_zero_and_info_do_not_change_the_name():
    atoms = _unnamed(1, seed=5)[0]
    atoms.positions[0, 0] = 0.0
    other = atoms.copy()
    other.positions[0, 0] = -0.0
    other.info["note"] = "x"
    other.set_tags(np.arange(len(other)))
    assert content_name(other) == content_name(atoms)


def test_identical_unnamed_structures_are_refused_as_duplicates():
    atoms = _unnamed(1, seed=6)[0]
    with pytest.raises(ValueError, match="duplicate structure name 'unnamed-.*identical"):
        read_structures([atoms, atoms.copy()])


@pytest.mark.parametrize("name", ["5", "1.5", "nan", "inf", "True", "1e3"])
def test_names_an_ase_db_would_refuse_at_write_time_are_refused_up_front(tmp_path, name):
    systems = batch_systems(n=2, bad=False)
    systems[1].info["name"] = name
    with pytest.raises(ValueError, match="cannot store as text"):
        relax_batch(systems, tmp_path / "r.db", StandInFactory(), progress=False)
    assert not (tmp_path / "r.db").exists()  # nothing relaxed, nothing written


def test_unnamed_references_are_refused_they_are_matched_by_name(tmp_path):
    systems = batch_systems(n=2, bad=False)
    refs = _unnamed(2, seed=7)
    with pytest.raises(ValueError, match="no name"):
        relax_batch(systems, tmp_path / "r.db", StandInFactory(), references=refs, progress=False)
