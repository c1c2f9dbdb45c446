"""Issue 10 item 3: command-line options named by quantity, one shared model/estimator option group,
and the old names kept as hidden aliases that still work."""
from __future__ import annotations

import argparse

import pytest
from ase.io import read, write

from sim_standins import make_slab
from ltau_ase.cli import build_parser, main

PARSER = build_parser()
SUB = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)).choices


def _parse(argv):
    return PARSER.parse_args(argv)


RELAX = ["relax", "--factory", "m:f", "--structures", "s.extxyz", "--db", "r.db"]
MD = ["md", "--factory", "m:f", "--structure", "s.extxyz"]
REPORT = ["report", "--db", "r.db"]


@pytest.mark.parametrize("argv, dest, value", [
    (RELAX + ["--error-threshold", "0.2"], "error_threshold", 0.2),
    (RELAX + ["--threshold", "0.2"], "error_threshold", 0.2),  # old name: the force-error threshold
    (MD + ["--stop-threshold", "0.6"], "stop_threshold", 0.6),
    (MD + ["--threshold", "0.6"], "stop_threshold", 0.6),  # old name: the UQ stop bound
    (MD + ["--error-threshold", "0.1"], "error_threshold", 0.1),
    (MD + ["--uq-threshold", "0.1"], "error_threshold", 0.1),  # old name: the force-error threshold
    (REPORT + ["--rmsd-threshold", "0.3"], "rmsd_threshold", 0.3),
    (REPORT + ["--threshold", "0.3"], "rmsd_threshold", 0.3),  # old name: the RMSD bound
])
def test_new_names_and_hidden_old_names_set_the_same_value(argv, dest, value):
    assert getattr(_parse(argv), dest) == value


@pytest.mark.parametrize("argv, dest, default", [
    (RELAX, "error_threshold", None), (MD, "stop_threshold", None), (MD, "error_threshold", None),
    (REPORT, "rmsd_threshold", 0.5),
])
def test_defaults_without_either_name(argv, dest, default):
    assert getattr(_parse(argv), dest) == default


@pytest.mark.parametrize("command, shown, hidden", [
    ("relax", ["--error-threshold"], ["--threshold"]),
    ("md", ["--stop-threshold", "--error-threshold", "--unknown-species"], ["--threshold", "--uq-threshold"]),
    ("report", ["--rmsd-threshold"], ["--threshold"]),
])
def test_help_shows_the_quantity_names_only(command, shown, hidden):
    text = SUB[command].format_help()
    for name in shown:
        assert name in text
    for name in hidden:
        assert f"{name} " not in text and f"{name}\n" not in text and f"{name}," not in text


def _model_group(command):
    group = next(g for g in SUB[command]._action_groups if g.title == "model")
    return [(a.option_strings, a.default, a.choices, a.help) for a in group._group_actions
            if a.help is not argparse.SUPPRESS]


def test_one_shared_model_option_group():
    assert _model_group("relax") == _model_group("md")
    names = {s for opts, *_ in _model_group("relax") for s in opts}
    assert names == {"--model", "--device", "--estimator", "--factory", "--error-threshold",
                     "--allow-model-mismatch", "--unknown-species"}
    fit = {s for opts, *_ in _model_group("fit") for s in opts}
    assert fit == {"--model", "--device"}  # fit has a model but no estimator yet


def test_md_passes_unknown_species_and_error_threshold_to_the_calculator(tmp_path, monkeypatch, capsys):
    from sim_standins import scripted_md_calculator
    from ltau_ase.simulate.calculator import LTAUCalculator

    seen = {}

    def fake_from_model(model, estimator, **kwargs):
        seen.update(kwargs)
        return scripted_md_calculator()

    monkeypatch.setattr(LTAUCalculator, "from_model", staticmethod(fake_from_model))
    (tmp_path / "m.ckpt").write_bytes(b"x")
    (tmp_path / "e.ltau").write_bytes(b"x")
    write(tmp_path / "start.extxyz", make_slab())
    argv = ["md", "--model", str(tmp_path / "m.ckpt"), "--estimator", str(tmp_path / "e.ltau"),
            "--structure", str(tmp_path / "start.extxyz"), "--ensemble", "nve", "--steps", "8",
            "--trajectory", str(tmp_path / "md.extxyz"), "--unknown-species", "flag", "--uq-threshold", "0.15",
            "--threshold", "0.5"]
    assert main(argv) == 0
    assert seen["unknown_species"] == "flag" and seen["threshold"] == 0.15
    assert "stopped at step 5" in capsys.readouterr().out  # the old --threshold is the stop bound
    assert [a.info["md_step"] for a in read(tmp_path / "md.extxyz", ":")] == [0, 1, 2, 3, 4, 5]


def test_relax_factory_gets_the_error_threshold_under_either_name(tmp_path):
    from ltau_ase.cli.relax import factory_from_args

    (tmp_path / "m.ckpt").write_bytes(b"x")
    (tmp_path / "e.ltau").write_bytes(b"x")
    base = ["relax", "--model", str(tmp_path / "m.ckpt"), "--estimator", str(tmp_path / "e.ltau"),
            "--structures", "s.extxyz", "--db", "r.db", "--unknown-species", "flag"]
    for option in ("--error-threshold", "--threshold"):
        factory = factory_from_args(_parse(base + [option, "0.25"]))
        assert factory.threshold == 0.25 and factory.unknown_species == "flag"
