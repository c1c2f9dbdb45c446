"""Exploration tasks with a cheap LTAU stand-in (EMT forces, closed-form uncertainties; < 20 s)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.emt import EMT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "simulate"))
from sim_standins import CountingDescriptors, StandInEstimator, expected_uncertainty  # noqa: E402

from ltau_ase.learn.explore import ExploreSettings, explore, load_snapshots  # noqa: E402
from ltau_ase.nequip.training import emt_slab_frames  # noqa: E402
from ltau_ase.simulate.calculator import LTAUCalculator  # noqa: E402


@dataclass(frozen=True)
class StandInLTAU:
    def __call__(self):
        return LTAUCalculator(EMT(), StandInEstimator(), descriptors=CountingDescriptors())


@pytest.fixture(scope="module")
def seeds():
    frames = emt_slab_frames(2, seed=3, rattle=0.05)
    out = []
    for i, a in enumerate(frames):
        a.calc = None
        out.append((f"seed{i}", a))
    return out


def test_stop_at_step_zero_gives_one_snapshot_per_step(tmp_path, seeds):
    db = tmp_path / "explore.db"
    settings = ExploreSettings(kinds=("md", "relax"), temperatures=(500.0,), md_steps=20, relax_steps=10, stride=5,
                               atom_reduce="mean")
    counts = explore(seeds, db, StandInLTAU(), settings, threshold=0.0, progress=False)  # every value exceeds 0
    assert counts == {"tasks": 4, "skipped": 0, "done": 4, "failed": 0}
    snaps, tasks = load_snapshots(db)
    assert all(t["triggered"] and t["stop_step"] == 0 for t in tasks)
    assert sorted(x["name"] for x in snaps) == sorted(f"{t['task']}@0" for t in tasks)  # one per task, unique
    for x in snaps:
        assert x["stop"] and x["flagged"]
        # the statistic is the mean of the stand-in's closed-form uncertainties of that structure
        d = CountingDescriptors()(x["atoms"])
        assert x["statistic"] == pytest.approx(float(expected_uncertainty(d).mean()))
        assert x["descriptors"].shape == (len(x["atoms"]), 2)
    assert explore(seeds, db, StandInLTAU(), settings, threshold=0.0, progress=False)["skipped"] == 4


def test_no_stop_runs_to_the_end_with_strided_snapshots(tmp_path, seeds):
    db = tmp_path / "explore.db"
    settings = ExploreSettings(kinds=("md",), temperatures=(300.0, 600.0), md_steps=20, stride=5, replicas=2)
    explore(seeds[:1], db, StandInLTAU(), settings, threshold=1.5, progress=False)  # uncertainties < 1: never
    snaps, tasks = load_snapshots(db)
    assert len(tasks) == 4 and not any(t["triggered"] for t in tasks)
    assert all(t["n_steps"] == 20 for t in tasks)
    for t in tasks:
        assert sorted(x["step"] for x in snaps if x["task"] == t["task"]) == [0, 5, 10, 15, 20]
    assert not any(x["flagged"] for x in snaps)
    # replicas and temperatures are different trajectories
    finals = [x["atoms"].positions for x in snaps if x["step"] == 20]
    assert len({np.round(p, 6).tobytes() for p in finals}) == 4


def test_bad_settings():
    with pytest.raises(ValueError, match="kinds"):
        ExploreSettings(kinds=("mc",)).validate()
    with pytest.raises(ValueError, match="temperatures"):
        ExploreSettings(temperatures=(-5.0,)).validate()
    with pytest.raises(ValueError, match="stride"):
        ExploreSettings(stride=0).validate()


def test_a_labelled_start_does_not_stop_the_trajectory(tmp_path, seeds):
    """A seed labelled in an earlier iteration is recorded but never stops its trajectory at step 0;
    the first new structure above the bound (step 1) does."""
    from ltau_ase.simulate.batch import content_name

    db = tmp_path / "explore.db"
    settings = ExploreSettings(kinds=("md",), temperatures=(500.0,), md_steps=20, stride=5, atom_reduce="mean")
    labelled = {content_name(seeds[0][1])}  # only seed0 was labelled before
    explore(seeds, db, StandInLTAU(), settings, threshold=0.0, progress=False, labelled=labelled)
    snaps, tasks = load_snapshots(db)
    stop_step = {t["seed"]: t["stop_step"] for t in tasks}
    assert stop_step == {"seed0": 1, "seed1": 0}
    first = sorted((x for x in snaps if x["task"].startswith("seed0|")), key=lambda x: x["step"])
    assert [(x["step"], x["labelled"], x["stop"]) for x in first] == [(0, True, False), (1, False, True)]
    assert content_name(first[0]["atoms"]) in labelled and content_name(first[1]["atoms"]) not in labelled
    # the labelled frame's statistic is still the mean of the stand-in's uncertainties of that structure
    assert first[0]["statistic"] == pytest.approx(float(expected_uncertainty(CountingDescriptors()(first[0]["atoms"])).mean()))
    other = [x for x in snaps if x["task"].startswith("seed1|")]
    assert [(x["step"], x["labelled"], x["stop"]) for x in other] == [(0, False, True)]
