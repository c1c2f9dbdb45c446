"""The test-MAE split of a campaign's evaluation against hand-computed values (numpy only)."""
from __future__ import annotations

import numpy as np
import pytest

from ltau_ase.learn.campaign import split_force_mae


def test_frames_above_the_cap_are_reported_apart():
    # frame 0: atoms 0-1 (within the cap), frame 1: atoms 2-4 (above the cap)
    errors = np.array([0.1, 0.3, 2.0, 4.0, 6.0])
    above = np.array([False, False, True, True, True])
    out = split_force_mae(errors, above)
    assert out["force_mae"] == pytest.approx(0.2) and out["n_atoms"] == 2
    assert out["force_mae_above_cap"] == pytest.approx(4.0)
    assert out["force_mae_all_frames"] == pytest.approx(12.4 / 5)


def test_no_frame_above_or_none_within():
    errors = np.array([0.5, 1.5])
    assert split_force_mae(errors, np.zeros(2, bool)) == {
        "force_mae": 1.0, "n_atoms": 2, "force_mae_above_cap": None, "force_mae_all_frames": 1.0}
    out = split_force_mae(errors, np.ones(2, bool))
    assert out["force_mae"] is None and out["n_atoms"] == 0 and out["force_mae_above_cap"] == 1.0
