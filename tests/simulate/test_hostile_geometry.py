"""Class 4 of issue 9, as a hostile user: no input hangs.

Non-finite or degenerate geometry is refused before any neighbour list is built (a NaN atom used to
hang the neighbour list at 100 % CPU; an infinite cell vector gave ordinary-looking numbers), and every
numeric option of the command line is checked when it is parsed (``ltau relax --workers -1`` used to
hang, ``ltau md --friction -1`` was accepted).
"""
from __future__ import annotations

import faulthandler

import numpy as np
import pytest
from ase.io import write

from sim_standins import StandInFactory, batch_systems, make_slab
from ltau_ase.cli import main
from ltau_ase.simulate.batch import load_results, relax_batch
from ltau_ase.simulate.calculator import check_finite_geometry


@pytest.fixture(autouse=True)
def no_hang():
    """A hang kills the test run with a traceback instead of blocking it (works inside C code too)."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _nan_atom(a):
    a.positions[3, 1] = np.nan


def _inf_atom(a):
    a.positions[0, 0] = np.inf


def _neg_inf_atom(a):
    a.positions[-1, 2] = -np.inf


def _all_nan(a):
    a.positions[:] = np.nan


def _nan_cell(a):
    a.cell[0, 0] = np.nan


def _inf_cell(a):
    a.cell[0, 0] = np.inf


def _inf_cell_nonperiodic_axis(a):
    a.cell[2, 2] = np.inf  # the slab's z axis is not periodic: still not a usable cell


def _zero_periodic_vector(a):
    a.cell[1] = 0.0


def _dependent_periodic_vectors(a):
    a.cell[1] = 2.0 * a.cell[0]


def _fully_periodic_flat_cell(a):
    a.pbc = True
    a.cell[2] = a.cell[0] + a.cell[1]


BAD_GEOMETRY = {
    "one NaN atom": (_nan_atom, "non-finite positions"),
    "+inf atom": (_inf_atom, "non-finite positions"),
    "-inf atom": (_neg_inf_atom, "non-finite positions"),
    "all NaN": (_all_nan, "non-finite positions"),
    "NaN cell": (_nan_cell, "non-finite entries"),
    "inf cell": (_inf_cell, "non-finite entries"),
    "inf cell, non-periodic axis": (_inf_cell_nonperiodic_axis, "non-finite entries"),
    "zero periodic vector": (_zero_periodic_vector, "zero or linearly dependent"),
    "dependent periodic vectors": (_dependent_periodic_vectors, "zero or linearly dependent"),
    "flat fully periodic cell": (_fully_periodic_flat_cell, "zero or linearly dependent"),
}


@pytest.mark.parametrize("case", sorted(BAD_GEOMETRY))
def test_calculator_refuses_bad_geometry_before_the_base_calculator(case):
    spoil, match = BAD_GEOMETRY[case]
    atoms = make_slab()
    spoil(atoms)
    calc = StandInFactory()()
    atoms.calc = calc
    with pytest.raises(ValueError, match=match):
        atoms.get_forces()
    with pytest.raises(ValueError, match=match):
        calc.get_property("uncertainties", atoms)


def test_good_geometries_pass():
    check_finite_geometry(make_slab())
    molecule = make_slab()
    molecule.pbc = False
    molecule.cell[:] = 0.0  # no cell at all is fine without periodicity
    check_finite_geometry(molecule)


def test_batch_records_a_nan_structure_as_failed_and_goes_on(tmp_path):
    systems = batch_systems(n=2, bad=False)
    broken = systems[0].copy()
    broken.info["name"] = "broken"
    broken.positions[2, 0] = np.nan
    counts = relax_batch(systems + [broken], tmp_path / "r.db", StandInFactory(), progress=False, steps=3)
    assert counts["failed"] == 1 and counts["failed"] + counts["unconverged"] + counts["done"] == 3
    failed = [r for r in load_results(tmp_path / "r.db") if r["status"] == "failed"]
    assert [r["name"] for r in failed] == ["broken"] and "non-finite positions" in failed[0]["reason"]


def test_relax_batch_refuses_bad_worker_counts(tmp_path):
    for n in (-1, 0, 1.5, True):
        with pytest.raises(ValueError, match="n_workers"):
            relax_batch(batch_systems(n=1, bad=False), tmp_path / "r.db", StandInFactory(), n_workers=n)
    assert not (tmp_path / "r.db").exists()  # refused before the database was touched
    from ltau_ase.simulate.batch import dask_client

    for n in (-1, 0, 2.5):  # every caller of the shared cluster (relax, predict, learn) is covered
        with pytest.raises(ValueError, match="n_workers"):
            with dask_client(None, n):
                pass


def test_md_refuses_a_nan_structure_before_running(tmp_path, capsys):
    atoms = make_slab()
    atoms.positions[1, 1] = np.nan
    write(tmp_path / "nan.extxyz", atoms)
    code = main(["md", "--factory", "sim_standins:scripted_md_calculator", "--structure", str(tmp_path / "nan.extxyz"),
                 "--stop-threshold", "0.5", "--steps", "5", "--trajectory", str(tmp_path / "md.extxyz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "non-finite positions" in err[0]
    assert not (tmp_path / "md.extxyz").exists()


# ----------------------------------------------------------------------------- numeric options at parse time
REQUIRED = {
    "relax": ["--factory", "m:f", "--structures", "s.extxyz", "--db", "r.db"],
    "md": ["--factory", "m:f", "--structure", "s.extxyz"],
    "fit": ["run", "--train-file", "t.extxyz", "--output", "o.ltau"],
    "report": ["--db", "r.db"],
    "reweight": ["--estimator", "e.ltau", "--train-file", "t.extxyz"],
}
BAD_NUMBERS = [
    ("relax", "--fmax", ["-1", "0", "nan", "inf", "abc"]),
    ("relax", "--steps", ["-1", "1.5"]),
    ("relax", "--workers", ["-1", "0", "2.5"]),
    ("relax", "--error-threshold", ["-0.1", "0", "nan"]),
    ("relax", "--threshold", ["-1"]),  # the hidden old name is checked too
    ("relax", "--atom-reduce", ["1.5", "-0.1", "median", "nan"]),
    ("relax", "--select", ["-1", "1,a", ""]),
    ("relax", "--scheduler", ["localhost", "tcp://h:0", "http://h:1", "tcp://h:99999"]),
    ("relax", "--scheduler-timeout", ["0", "-1"]),
    ("relax", "--factory", ["no-colon", "a b:c", ":f"]),
    ("md", "--temperature", ["-1", "nan"]),
    ("md", "--timestep", ["0", "-1"]),
    ("md", "--friction", ["-1", "inf"]),
    ("md", "--steps", ["-5"]),
    ("md", "--stop-threshold", ["-1", "nan"]),
    ("md", "--threshold", ["-1"]),
    ("md", "--patience", ["0"]),
    ("md", "--warmup", ["1"]),
    ("md", "--n-sigma", ["-1"]),
    ("md", "--error-threshold", ["0"]),
    ("md", "--uq-threshold", ["-2"]),
    ("md", "--interval", ["0"]),
    ("md", "--seed", ["-1"]),
    ("md", "--atom-reduce", ["2"]),
    ("md", "--false-alarm-rate", ["0", "1", "-0.1", "nan"]),
    ("md", "--coverage", ["0", "1.5"]),
    ("fit", "--k", ["-1", "0"]),
    ("fit", "--atol", ["0", "-1"]),
    ("fit", "--skip-epochs", ["-1"]),
    ("fit", "--last-epochs", ["0"]),
    ("fit", "--batch-size", ["0"]),
    ("report", "--rmsd-threshold", ["0", "-1"]),
    ("report", "--bins", ["0"]),
    ("reweight", "--lam", ["-1"]),
    ("reweight", "--easy-threshold", ["1.5"]),
    ("reweight", "--hard-threshold", ["-0.1"]),
    ("reweight", "--ambiguous-variability", ["2"]),
    ("reweight", "--atol", ["0"]),
]
BAD_OPTION_CASES = [(cmd, opt, v) for cmd, opt, values in BAD_NUMBERS for v in values]


@pytest.mark.parametrize("command, option, value", BAD_OPTION_CASES)
def test_every_numeric_option_is_checked_when_parsed(command, option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, *REQUIRED[command], f"{option}={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1 and f"argument {option}" in err[0] and err[0].startswith(f"ltau {command}: error:")
