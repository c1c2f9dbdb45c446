"""Training files and error-log discovery in the torch-free core (ltau_ase.core.trainingset / errorlog)."""
from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from ltau_ase.core.atom_ids import global_atom_ids
from ltau_ase.core.errorlog import DEFAULT_LOG_SUBDIR, ErrorLogWriter, find_error_log
from ltau_ase.core.trainingset import (
    assign_frame_ids,
    frames_for_atom_ids,
    read_training_frames,
    write_training_file,
)


def _frames(n, first_id):
    frames = []
    for i in range(n):
        a = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7 + 0.01 * i]])
        a.calc = SinglePointCalculator(a, energy=-float(i), forces=np.full((2, 3), 0.1 * i))
        frames.append(a)
    return assign_frame_ids(frames, first_id)


def test_training_files_round_trip_and_select_logged_frames(tmp_path):
    a = write_training_file(tmp_path / "a.extxyz", _frames(3, 0))
    b = write_training_file(tmp_path / "b.extxyz", _frames(2, 100))
    frames = read_training_frames([a, b])
    assert [f.info["frame_id"] for f in frames] == [0, 1, 2, 100, 101]
    np.testing.assert_allclose(frames[4].get_forces(), 0.1)
    logged = global_atom_ids([101, 1], [2, 2])
    assert [f.info["frame_id"] for f in frames_for_atom_ids(frames, logged)] == [1, 101]  # file order
    with pytest.raises(ValueError, match="1 frames of the error logs are not in the training files"):
        frames_for_atom_ids(frames, global_atom_ids([7], [2]), [a, b])
    with pytest.raises(FileNotFoundError, match="training file .*missing.extxyz does not exist"):
        read_training_frames([a, tmp_path / "missing.extxyz"])
    with pytest.raises(ValueError, match=r"repeat .*\[0, 1, 2\]"):
        read_training_frames([a, a])
    with pytest.raises(ValueError, match="frame 0 has no info"):
        write_training_file(tmp_path / "c.extxyz", [Atoms("H")])


def test_find_error_log_rules(tmp_path):
    ids = np.arange(4, dtype=np.int64)
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_error_log(run)
    run.mkdir()
    with pytest.raises(FileNotFoundError, match=f"no LTAU error log in .*'{DEFAULT_LOG_SUBDIR}'"):
        find_error_log(run)
    ErrorLogWriter(run / "other", ids).close()
    assert find_error_log(run) == run / "other"  # the single log below the run
    assert find_error_log(run / "other") == run / "other"  # a log directory itself
    ErrorLogWriter(run / "second", ids).close()
    with pytest.raises(ValueError, match="several error logs"):
        find_error_log(run)
    ErrorLogWriter(run / DEFAULT_LOG_SUBDIR, ids).close()
    assert find_error_log(run) == run / DEFAULT_LOG_SUBDIR  # the default name wins
