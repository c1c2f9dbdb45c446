"""The OC20-like EMT dataset generator: determinism, OC20 tags, converged references, unique ids.

References are independent of the generator: energies/forces are recomputed with a fresh EMT,
layers are recovered from z coordinates, convergence from a fresh EMT force evaluation.
"""
import json

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms

from ltau_ase.datasets import (
    ADSORBATES,
    CatalysisSettings,
    DatasetSize,
    generate_catalysis_dataset,
    read_split,
    write_catalysis_dataset,
)

TINY = DatasetSize(train=3, val=1, calibration=1, test_id=1, test_ood=3, is2rs_id=2, is2rs_ood=2,
                   relax_frames=2, rattle_frames=1, md_frames=1)
METALS = {"Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt"}


@pytest.fixture(scope="module")
def data():
    return generate_catalysis_dataset(seed=3, size=TINY)


def _frames(data):
    return list(data.all_frames())


def _same(a, b):
    return (
        a.get_chemical_symbols() == b.get_chemical_symbols()
        and np.array_equal(a.positions, b.positions)
        and np.array_equal(a.get_tags(), b.get_tags())
        and a.get_potential_energy() == b.get_potential_energy()
        and np.array_equal(a.get_forces(apply_constraint=False), b.get_forces(apply_constraint=False))
        and a.info == b.info
    )


def test_same_seed_same_data_other_seed_other_data(data):
    again = generate_catalysis_dataset(seed=3, size=TINY)
    first, second = _frames(data), _frames(again)
    assert len(first) == len(second)
    assert all(_same(a, b) for a, b in zip(first, second))
    other = _frames(generate_catalysis_dataset(seed=4, size=TINY))
    assert not all(np.array_equal(a.positions, b.positions) for a, b in zip(first, other) if len(a) == len(b))


def test_split_sizes_and_config_types(data):
    per_system = TINY.relax_frames + TINY.rattle_frames + TINY.md_frames
    for split in ("train", "val", "calibration", "test_id", "test_ood"):
        frames = data.s2ef[split]
        assert len(frames) == TINY.n_systems(split) * per_system
        assert {f.info["config_type"] for f in frames} == {"relax", "rattle", "md"}
    for split in ("is2rs_id", "is2rs_ood"):
        initial, relaxed = data.is2rs[split]
        assert len(initial) == len(relaxed) == TINY.n_systems(split)
        assert [f.info["system"] for f in initial] == [f.info["system"] for f in relaxed]


def test_frame_ids_unique_across_all_splits(data):
    ids = [f.info["frame_id"] for f in _frames(data)]
    assert all(isinstance(i, int) for i in ids)
    assert len(set(ids)) == len(ids)


def test_tags_and_fixed_atoms_follow_oc20(data):
    for frame in _frames(data):
        tags = frame.get_tags()
        symbols = np.array(frame.get_chemical_symbols())
        metal = np.isin(symbols, list(METALS))
        assert np.all(tags[~metal] == 2) and np.all(np.isin(tags[metal], [0, 1]))
        assert "".join(symbols[~metal]) == ADSORBATES[frame.info["adsorbate"]][0]
        (constraint,) = frame.constraints
        assert isinstance(constraint, FixAtoms)
        assert sorted(constraint.get_indices()) == sorted(np.flatnonzero(tags == 0))
        # surface (tag 1) atoms lie above every fixed atom
        assert frame.positions[tags == 1, 2].min() > frame.positions[tags == 0, 2].max()


def test_labels_match_a_fresh_emt_calculation(data):
    for frame in _frames(data)[::3]:
        ref = frame.copy()
        ref.calc = EMT()
        assert frame.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-10)
        # stored forces are unconstrained: fixed atoms keep their EMT forces
        np.testing.assert_allclose(frame.calc.results["forces"], ref.get_forces(apply_constraint=False), atol=1e-10)


def test_is2rs_references_are_converged_and_bulk_stays_fixed(data):
    fmax = CatalysisSettings().relax_fmax
    for split in ("is2rs_id", "is2rs_ood"):
        for initial, relaxed in zip(*data.is2rs[split]):
            ref = relaxed.copy()
            ref.calc = EMT()
            forces = ref.get_forces(apply_constraint=False)
            free = ref.get_tags() > 0
            assert np.linalg.norm(forces[free], axis=1).max() < fmax
            fixed = ~free
            np.testing.assert_array_equal(initial.positions[fixed], relaxed.positions[fixed])
            # a relaxation actually happened
            assert np.abs(initial.positions[free] - relaxed.positions[free]).max() > 1e-3


def test_out_of_domain_is_held_out(data):
    settings = CatalysisSettings()
    held_metals, held_ads = set(settings.metals_out_of_domain), set(settings.adsorbates_out_of_domain)
    in_frames = [f for s in ("train", "val", "calibration", "test_id") for f in data.s2ef[s]]
    in_frames += [f for pair in data.is2rs["is2rs_id"] for f in pair]
    for f in in_frames:
        assert f.info["metal"] not in held_metals and f.info["adsorbate"] not in held_ads
        assert f.info["domain"] == "in_domain"
    ood = data.s2ef["test_ood"] + [f for pair in data.is2rs["is2rs_ood"] for f in pair]
    for f in ood:
        assert f.info["metal"] in held_metals or f.info["adsorbate"] in held_ads
        assert f.info["domain"] == "out_of_domain"


def test_written_files_round_trip(tmp_path, data):
    manifest = write_catalysis_dataset(tmp_path, seed=3, size=TINY)
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    train = read_split(tmp_path, "train")
    assert len(train) == manifest["s2ef"]["train"]["n_frames"]
    for read_frame, original in zip(train, data.s2ef["train"]):
        assert read_frame.info["frame_id"] == original.info["frame_id"]
        assert read_frame.info["metal"] == original.info["metal"]
        np.testing.assert_allclose(read_frame.calc.results["forces"], original.calc.results["forces"], atol=1e-7)
        assert read_frame.calc.results["energy"] == pytest.approx(original.get_potential_energy(), abs=1e-7)
        np.testing.assert_array_equal(read_frame.get_tags(), original.get_tags())
        assert sorted(read_frame.constraints[0].get_indices()) == sorted(original.constraints[0].get_indices())
    initial, relaxed = read_split(tmp_path, "is2rs_ood")
    assert len(initial) == len(relaxed) == TINY.is2rs_ood
    assert manifest["is2rs"]["is2rs_ood"]["max_reference_fmax"] < CatalysisSettings().relax_fmax
    with pytest.raises(ValueError, match="not in"):
        read_split(tmp_path, "nope")


def test_nequip_reads_energy_forces_and_frame_id(tmp_path):
    pytest.importorskip("nequip")
    from ase.io import read
    from nequip.data.ase import from_ase

    write_catalysis_dataset(tmp_path, seed=0, size=DatasetSize(1, 0, 0, 0, 0, 0, 0, 1, 0, 0))
    frame = read(tmp_path / "train.extxyz", index=0)
    data = from_ase(frame, include_keys=["frame_id"])
    np.testing.assert_allclose(np.asarray(data["forces"]), frame.calc.results["forces"], atol=1e-6)
    assert float(np.asarray(data["total_energy"]).reshape(-1)[0]) == pytest.approx(frame.get_potential_energy(), abs=1e-6)
    assert int(np.asarray(data["frame_id"]).reshape(-1)[0]) == frame.info["frame_id"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(seed=-1), ValueError, "non-negative"),
        (dict(size="huge"), ValueError, "quick"),
        (dict(size=3), TypeError, "DatasetSize"),
        (dict(settings=CatalysisSettings(metals_in_domain=("Fe",))), ValueError, "Fe"),
        (dict(settings=CatalysisSettings(metals_out_of_domain=("Cu",))), ValueError, "both"),
        (dict(settings=CatalysisSettings(adsorbates_in_domain=("H2O",))), ValueError, "H2O"),
        (dict(settings=CatalysisSettings(relax_attempts=0)), ValueError, "relax_attempts"),
    ],
)
def test_bad_input_raises(kwargs, error, match):
    with pytest.raises(error, match=match):
        generate_catalysis_dataset(**kwargs)


def test_unconverged_reference_is_redrawn_and_reported_then_refused():
    """A reference that cannot converge is never kept: each placement is recorded, then it raises."""
    size = DatasetSize(train=0, val=0, calibration=0, test_id=0, test_ood=0, is2rs_id=1, is2rs_ood=0)
    settings = CatalysisSettings(relax_steps=2, relax_attempts=2)
    with pytest.raises(RuntimeError, match="in 2 placements"):
        generate_catalysis_dataset(seed=0, size=size, settings=settings)


def test_redrawn_placement_is_listed_in_the_manifest(tmp_path, monkeypatch):
    from ltau_ase.datasets import catalysis

    real, calls = catalysis.relax_with_emt, []

    def first_reference_fails(atoms, fmax, steps):
        relaxed, trajectory, converged = real(atoms, fmax, steps)
        calls.append(fmax)
        return relaxed, trajectory, converged and len(calls) > 1

    monkeypatch.setattr(catalysis, "relax_with_emt", first_reference_fails)
    size = DatasetSize(train=0, val=0, calibration=0, test_id=0, test_ood=0, is2rs_id=1, is2rs_ood=0)
    manifest = write_catalysis_dataset(tmp_path, seed=0, size=size)
    rejected = manifest["rejected_is2rs_placements"]
    assert len(rejected) == 1 and rejected[0]["attempt"] == 0 and rejected[0]["system"].startswith("is2rs_id")
    assert json.loads((tmp_path / "manifest.json").read_text())["rejected_is2rs_placements"] == rejected
    initial, relaxed = read_split(tmp_path, "is2rs_id")
    assert len(initial) == len(relaxed) == 1
