"""IS2RS analysis: min_diff, distances, ADwT and UQ-vs-RMSD against hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.constraints import FixAtoms
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from ltau_ase.is2rs import (
    ADWT_THRESHOLDS,
    adwt,
    bin_rmsd_by_uq,
    free_atom_mask,
    match_references,
    records_table,
    system_table,
    min_diff,
    system_distances,
    uq_rmsd_analysis,
)


def fairchem_min_diff(pred_pos, dft_pos, cell, pbc):
    """fairchem core/modules/evaluator.py min_diff, transcribed (reference for all-periodic cells)."""
    pos_diff = pred_pos - dft_pos
    fractional = np.linalg.solve(cell.T, pos_diff.T).T
    for i, periodic in enumerate(pbc):
        if periodic:
            fractional[:, i] %= 1.0
            fractional[:, i] %= 1.0
    fractional[fractional > 0.5] -= 1
    return np.matmul(fractional, cell)


CUBIC = np.diag([10.0, 10.0, 10.0])


# ----------------------------------------------------------------------------- min_diff
def test_min_diff_across_periodic_boundary():
    pred = np.array([[9.9, 5.0, 5.0], [0.1, 5.0, 5.0], [5.0, 5.0, 5.0]])
    ref = np.array([[0.1, 5.0, 5.0], [9.9, 5.0, 5.0], [5.0, 5.3, 5.0]])
    d = min_diff(pred, ref, CUBIC, [True, True, True])
    np.testing.assert_allclose(d, [[-0.2, 0, 0], [0.2, 0, 0], [0, -0.3, 0]], atol=1e-12)


def test_min_diff_non_periodic_axis_not_wrapped():
    pred = np.array([[5.0, 5.0, 9.9]])
    ref = np.array([[5.0, 5.0, 0.1]])
    d = min_diff(pred, ref, CUBIC, [True, True, False])
    np.testing.assert_allclose(d, [[0, 0, 9.8]], atol=1e-12)
    np.testing.assert_allclose(min_diff(pred, ref, CUBIC, [False] * 3), pred - ref)


def test_min_diff_skewed_cell_hand_computed():
    cell = np.array([[10.0, 0, 0], [5.0, 8.0, 0], [0, 0, 10.0]])
    # Δ = 0.9 a + 0.9 b -> fractions (0.9, 0.9, 0) -> (-0.1, -0.1, 0) -> -0.1 (a + b) = (-1.5, -0.8, 0)
    delta = 0.9 * cell[0] + 0.9 * cell[1]
    d = min_diff(np.array([delta]), np.zeros((1, 3)), cell, [True] * 3)
    np.testing.assert_allclose(d, [[-1.5, -0.8, 0.0]], atol=1e-12)


def test_min_diff_fractional_wrap_is_not_cartesian_minimum_image():
    # A strongly skewed cell where OC20's fractional wrap does not give the shortest image:
    # Δ = (0.5, 0.6, 0): f_b = 0.6 -> -0.4; f_a = (0.5 - 0.6*9)/10 = -0.49 -> 0.51 -> -0.49;
    # -0.49 a - 0.4 b = (-4.9 - 3.6, -0.4, 0) = (-8.5, -0.4, 0) although |Δ| = 0.78 Å.
    cell = np.array([[10.0, 0, 0], [9.0, 1.0, 0], [0, 0, 10.0]])
    d = min_diff(np.array([[0.5, 0.6, 0.0]]), np.zeros((1, 3)), cell, [True] * 3)
    np.testing.assert_allclose(d, [[-8.5, -0.4, 0.0]], atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10**6))
def test_min_diff_matches_fairchem_on_random_skewed_cells(seed):
    rng = np.random.default_rng(seed)
    cell = np.diag(rng.uniform(5, 15, 3)) + np.triu(rng.uniform(-4, 4, (3, 3)), 1)
    pred = rng.uniform(-20, 20, (7, 3))
    ref = rng.uniform(-20, 20, (7, 3))
    np.testing.assert_allclose(
        min_diff(pred, ref, cell, [True] * 3), fairchem_min_diff(pred, ref, cell, [True] * 3), atol=1e-9
    )


def test_min_diff_bad_shapes():
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        min_diff(np.zeros((2, 3)), np.zeros((3, 3)), CUBIC, [True] * 3)
    with pytest.raises(ValueError, match="cell"):
        min_diff(np.zeros((2, 3)), np.zeros((2, 3)), np.eye(2), [True] * 3)
    with pytest.raises(ValueError, match="singular"):
        min_diff(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((3, 3)), [True] * 3)


# ----------------------------------------------------------------------------- structures
def slab(positions, tags=None, fixed=None, cell=CUBIC, symbols=None):
    n = len(positions)
    atoms = Atoms(symbols or ["Cu"] * n, positions=positions, cell=cell, pbc=True)
    if tags is not None:
        atoms.set_tags(tags)
    if fixed is not None:
        atoms.set_constraint(FixAtoms(indices=fixed))
    return atoms


def test_free_atom_mask_tags_and_constraints():
    pos = np.zeros((4, 3))
    assert free_atom_mask(slab(pos, tags=[0, 1, 2, 0])).tolist() == [False, True, True, False]
    assert free_atom_mask(slab(pos, fixed=[0, 3])).tolist() == [False, True, True, False]
    assert free_atom_mask(slab(pos)).all()


def test_system_distances_excludes_fixed_atoms_and_wraps():
    ref_pos = np.array([[0.0, 0, 0], [5.0, 5, 5], [0.1, 5, 5], [5, 5, 9.8]])
    pred_pos = ref_pos + np.array([[3.0, 0, 0], [0.3, 0, 0], [-0.2, 0, 0], [0, 0, 0.6]])
    # free atoms 1..3: |Δ| = 0.3, 0.2 (wrapped across x = 0), 0.6 (wrapped across z = 10)
    for ref in (slab(ref_pos, tags=[0, 1, 2, 2]), slab(ref_pos, fixed=[0])):
        res = system_distances(slab(pred_pos), ref)
        assert res["n_free"] == 3
        assert res["d_mean"] == pytest.approx((0.3 + 0.2 + 0.6) / 3)
        assert res["rmsd"] == pytest.approx(np.sqrt((0.09 + 0.04 + 0.36) / 3))


def test_system_distances_bad_inputs():
    ref = slab(np.zeros((3, 3)), tags=[0, 1, 2], symbols=["Cu", "Cu", "O"])
    with pytest.raises(ValueError, match="2 atoms but the reference has 3"):
        system_distances(slab(np.zeros((2, 3))), ref)
    with pytest.raises(ValueError, match="first mismatch at atom 1"):
        system_distances(slab(np.zeros((3, 3)), symbols=["Cu", "O", "Cu"]), ref)
    with pytest.raises(ValueError, match="cells differ"):
        system_distances(slab(np.zeros((3, 3)), cell=CUBIC * 1.01, symbols=["Cu", "Cu", "O"]), ref)
    with pytest.raises(ValueError, match="tags differ"):
        system_distances(slab(np.zeros((3, 3)), tags=[0, 2, 1], symbols=["Cu", "Cu", "O"]), ref)
    with pytest.raises(ValueError, match="no free atoms"):
        all_fixed = slab(np.zeros((3, 3)), fixed=[0, 1, 2], symbols=["Cu", "Cu", "O"])
        system_distances(all_fixed.copy(), all_fixed)


# ----------------------------------------------------------------------------- ADwT
def test_adwt_hand_computed():
    assert ADWT_THRESHOLDS.size == 490
    # 0.005 is below all 490 β; 0.1005 is below β = 0.101 ... 0.499 (399 values); 0.6 below none.
    assert adwt([0.005, 0.1005, 0.6]) == pytest.approx((490 + 399 + 0) / (3 * 490))
    assert adwt([0.0]) == 1.0
    assert adwt([0.5]) == 0.0
    # 0.2505 is below β = 0.251 ... 0.499: 249 of 490
    assert adwt([0.2505]) == pytest.approx(249 / 490)
    # values exactly on β grid points count as not below (strict <), as in fairchem
    d = np.concatenate([ADWT_THRESHOLDS[[0, 100, 489]], np.random.default_rng(0).uniform(0, 0.6, 50)])
    brute = np.mean([[di < b for di in d] for b in ADWT_THRESHOLDS])
    assert adwt(d) == pytest.approx(brute, abs=1e-15)
    with pytest.raises(ValueError, match="non-empty"):
        adwt([])
    with pytest.raises(ValueError, match="finite"):
        adwt([np.nan, 0.1])


def test_match_references_reports_missing():
    a = slab(np.zeros((1, 3)))
    with pytest.warns(UserWarning, match="1 of 3 system.*no reference.*sys_b"):
        matched, missing = match_references({"sys_a": a, "sys_b": a, "sys_c": a}, {"sys_a": a, "sys_c": a, "x": a})
    assert list(matched) == ["sys_a", "sys_c"]
    assert missing == ["sys_b"]


# ----------------------------------------------------------------------------- binning and analysis
def test_bin_rmsd_by_uq_hand_computed():
    uq = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    rmsd = np.array([1.0, 3.0, 2.0, 4.0, 6.0, 8.0])
    b = bin_rmsd_by_uq(uq, rmsd, n_bins=2, strategy="quantile")
    np.testing.assert_array_equal(b["counts"], [3, 3])
    np.testing.assert_allclose(b["centers"], [0.2, 0.5])
    np.testing.assert_allclose(b["mean"], [2.0, 6.0])
    np.testing.assert_allclose(b["sem"], [1.0 / np.sqrt(3), 2.0 / np.sqrt(3)])
    u = bin_rmsd_by_uq(uq, rmsd, n_bins=5, strategy="uniform")
    assert u["counts"].sum() == 6
    with pytest.raises(ValueError, match="equal length"):
        bin_rmsd_by_uq(uq, rmsd[:-1])


def make_table(rng, n=60):
    table = []
    for i in range(n):
        group = "in-domain" if i % 2 == 0 else "out-of-domain"
        u = rng.uniform(0, 1)
        rmsd = u + rng.normal(0, 0.1) + (0.3 if group == "out-of-domain" else 0.0)
        table.append(
            dict(
                name=f"s{i}",
                group=group,
                uq_initial=u + rng.normal(0, 0.3),
                uq_final=rng.uniform(0, 1),
                uq_max=u,
                uq_mean=u + rng.normal(0, 0.1),
                rmsd=abs(rmsd),
                d_mean=abs(rmsd) * 0.8,
            )
        )
    return table


def test_uq_rmsd_analysis_against_references():
    rng = np.random.default_rng(0)
    table = make_table(rng)
    res = uq_rmsd_analysis(table, threshold=0.5)
    assert list(res["groups"]) == ["in-domain", "out-of-domain", "all"]
    for g, entry in res["groups"].items():
        recs = [r for r in table if g == "all" or r["group"] == g]
        rmsd = np.array([r["rmsd"] for r in recs])
        assert entry["n_systems"] == len(recs)
        assert entry["adwt"] == pytest.approx(
            np.mean([[r["d_mean"] < b for r in recs] for b in ADWT_THRESHOLDS])
        )
        for s in ("initial", "final", "max", "mean"):
            uq = np.array([r[f"uq_{s}"] for r in recs])
            assert entry["stats"][s]["spearman"] == pytest.approx(stats.spearmanr(uq, rmsd).statistic)
            pos, neg = uq[rmsd > 0.5], uq[rmsd <= 0.5]
            brute = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size)
            assert entry["stats"][s]["auroc"] == pytest.approx(brute)
            assert sum(res["binned"][s][g]["counts"]) == len(recs)
    # uq_max drives the RMSD, uq_final is noise
    assert res["groups"]["all"]["stats"]["max"]["spearman"] > 0.8
    assert abs(res["groups"]["all"]["stats"]["final"]["spearman"]) < 0.4


def test_uq_rmsd_analysis_bad_inputs():
    rng = np.random.default_rng(1)
    table = make_table(rng, 6)
    with pytest.raises(ValueError, match="lacks key"):
        uq_rmsd_analysis([{k: v for k, v in table[0].items() if k != "uq_max"}] + table[1:])
    bad = [dict(r) for r in table]
    bad[2]["rmsd"] = float("nan")
    with pytest.raises(ValueError, match="non-finite 'rmsd': s2"):
        uq_rmsd_analysis(bad)
    with pytest.raises(ValueError, match="no systems"):
        uq_rmsd_analysis(table, groups=["elsewhere"])
    with pytest.raises(ValueError, match="no systems"):
        uq_rmsd_analysis([])
    # all systems below threshold -> AUROC undefined (NaN), not an exception
    res = uq_rmsd_analysis(table, threshold=100.0)
    assert np.isnan(res["groups"]["all"]["stats"]["max"]["auroc"])
    assert res["groups"]["all"]["stats"]["max"]["n_above"] == 0


def test_system_table_from_structures():
    ref = slab(np.array([[0.0, 0, 0], [5.0, 5, 5]]), tags=[0, 2])
    preds = {}
    for name, shift in (("a", 0.1), ("b", 0.4)):
        p = ref.copy()
        p.positions[1, 0] += shift
        p.positions[0, 0] += 1.0  # bulk atom: excluded
        p.info.update(ltau_uq_initial=shift, ltau_uq_final=0.0, ltau_uq_max=2 * shift, ltau_uq_mean=shift / 2)
        preds[name] = p
    preds["c"] = preds["a"].copy()
    with pytest.warns(UserWarning, match="sys|c"):
        records, missing = system_table(preds, {"a": ref, "b": ref}, groups={"a": "ID", "b": "OOD"})
    assert missing == ["c"]
    assert [r["name"] for r in records] == ["a", "b"] and [r["group"] for r in records] == ["ID", "OOD"]
    assert records[1]["rmsd"] == pytest.approx(0.4) and records[1]["d_mean"] == pytest.approx(0.4)
    assert records[1]["uq_max"] == pytest.approx(0.8) and records[1]["n_free"] == 1
    del preds["a"].info["ltau_uq_max"]
    with pytest.raises(ValueError, match="lacks \\['ltau_uq_max'\\]"):
        system_table({"a": preds["a"]}, {"a": ref})


def test_records_table_is_the_one_path_from_records_to_rows():
    """records_table (what `ltau report` and the demo use) gives the rows system_table gives for the same
    structures with the UQ in atoms.info, plus status/nsteps; failed records are skipped."""
    from ltau_ase.simulate.batch import RelaxationRecord

    ref = slab(np.array([[0.0, 0, 0], [5.0, 5, 5]]), tags=[0, 2])
    recs, preds = [], {}
    for i, (name, status) in enumerate([("a", "done"), ("b", "unconverged"), ("c", "failed"), ("d", "done")]):
        p = ref.copy()
        p.positions[1, 0] += 0.05 * (i + 1)  # the one free atom moves by this (Å)
        uq = dict(initial=0.1 * i, final=0.2 * i, max=0.3 * i, mean=0.4 * i)
        recs.append(RelaxationRecord(name=name, group="g", status=status, nsteps=i, atoms=p,
                                     reference=None if name == "d" else ref, **{f"uq_{k}": v for k, v in uq.items()}))
        p2 = p.copy()
        p2.info.update({f"ltau_uq_{k}": v for k, v in uq.items()})
        preds[name] = p2
    assert recs[1]["nsteps"] == 1 and recs[1].uq["max"] == pytest.approx(0.3)
    with pytest.warns(UserWarning, match="1 of 3 system"):
        table, missing = records_table(recs)  # stored references; d has none
    assert missing == ["d"] and [r["name"] for r in table] == ["a", "b"]
    assert [r["rmsd"] for r in table] == pytest.approx([0.05, 0.10])
    with pytest.warns(UserWarning):
        expected, _ = system_table({k: preds[k] for k in ("a", "b", "d")}, {"a": ref, "b": ref}, groups="g")
    for row, exp in zip(table, expected):
        assert row == {**exp, "status": recs[[r.name for r in recs].index(row["name"])].status,
                       "nsteps": recs[[r.name for r in recs].index(row["name"])].nsteps}
    table, missing = records_table(recs, {"a": ref, "b": ref, "d": ref})  # explicit references
    assert missing == [] and [r["name"] for r in table] == ["a", "b", "d"]
    with pytest.raises(ValueError, match="1 system\\(s\\) have no reference"):
        records_table(recs, strict=True)
