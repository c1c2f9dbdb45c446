"""A two-iteration active-learning campaign on the tiny nequip model with EMT as the reference.

Lives next to the tiny-model session fixtures (``tests/nequip/conftest.py``): iteration 0 is the
fixture's trained run, so only the two retrainings are paid here. A subprocess runs the campaign
and is killed while it labels (the reference sleeps); the campaign is then resumed here: the frames
labelled before the kill are not computed again, nothing is duplicated, the frame ids of all
training files stay unique, and the second iteration runs to the end.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nequip")

from ltau_ase.core.atom_ids import frame_ids_of  # noqa: E402
from ltau_ase.learn import (  # noqa: E402
    CalculatorFactory, Campaign, CampaignSettings, ExploreSettings, TrainingSettings)
from ltau_ase.nequip.training import assign_frame_ids, emt_slab_frames, write_training_file  # noqa: E402
from ltau_ase.nequip.warm_start import WARM_START_TARGET  # noqa: E402

REFS = Path(__file__).resolve().parents[1] / "learn"
sys.path.insert(0, str(REFS))
from references import SlowEMT, positions_key  # noqa: E402

SETTINGS = CampaignSettings(
    type_names=("Cu", "Pt", "O", "H"), selection="ltau", n_iterations=2, budget=3,
    explore=ExploreSettings(kinds=("md",), temperatures=(900.0, 1500.0), md_steps=30, stride=5, atom_reduce="mean"),
    training=TrainingSettings(epochs=2, parallel=1), threshold_quantile=0.5, k=5, seed=0, warm_start=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_nequip_run):
    root = tmp_path_factory.mktemp("learn_inputs")
    train = write_training_file(root / "train.extxyz", tiny_nequip_run.frames)  # the run's training frames
    cal = assign_frame_ids(emt_slab_frames(6, seed=11), 9000)
    test = assign_frame_ids(emt_slab_frames(4, seed=12, metals=("Pt",)), 9100)
    seeds = emt_slab_frames(3, seed=13, rattle=0.05)
    for i, s in enumerate(seeds):
        s.calc = None
        s.info = {"name": f"seed{i}", "frame_id": i}  # the start frame's id: copies would collide with it
    files = {"train": train, "val": tiny_nequip_run.val_file,
             "calibration": write_training_file(root / "cal.extxyz", cal),
             "seeds": root / "seeds.extxyz", "test": write_training_file(root / "test.extxyz", test)}
    from ase.io import write

    write(files["seeds"], seeds, format="extxyz")
    return files


def _campaign(workdir, inputs, run_dir, reference, settings=SETTINGS, **kw):
    return Campaign(workdir, settings, train=inputs["train"], val=inputs["val"], calibration=inputs["calibration"],
                    seeds=inputs["seeds"], reference=reference, test_sets={"in_domain": inputs["test"]},
                    initial_run=run_dir, progress=False, **kw)


def test_campaign_killed_while_labelling_resumes(tmp_path, inputs, tiny_nequip_run):
    from ase.db import connect

    workdir, log = tmp_path / "campaign", tmp_path / "reference_calls.log"
    reference = SlowEMT(0.0, str(log))
    script = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)
        sys.path.insert(0, {str(REFS)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from references import SlowEMT
        from test_learn_campaign import _campaign, SETTINGS
        from pathlib import Path
        inputs = {{k: Path(v) for k, v in {json.dumps({k: str(v) for k, v in inputs.items()})}.items()}}
        _campaign({str(workdir)!r}, inputs, {str(tiny_nequip_run.run_dir)!r}, SlowEMT(0.0, {str(log)!r})).run()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", LTAU_TEST_REFERENCE_DELAY="3"))
    labels = workdir / "iter_001" / "labels.db"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if labels.exists() and connect(str(labels)).count() >= 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert labels.exists(), "the campaign did not reach labelling in time"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {row.get("name"): positions_key(row.toatoms()) for row in connect(str(labels)).select()}
    selected = json.loads((workdir / "iter_001" / "selected.json").read_text())["names"]
    assert 1 <= len(before) < len(selected) <= SETTINGS.budget

    # another campaign's settings or inputs are refused in this directory
    with pytest.raises(ValueError, match="another campaign"):
        _campaign(workdir, inputs, tiny_nequip_run.run_dir, reference,
                  settings=CampaignSettings(**{**SETTINGS.__dict__, "budget": 4}))

    history = _campaign(workdir, inputs, tiny_nequip_run.run_dir, reference).run()
    calls = log.read_text().split()
    for name, key in before.items():  # labelled before the kill: computed exactly once
        assert calls.count(key) == 1, name
    for i in (1, 2):
        rows = list(connect(str(workdir / f"iter_{i:03d}" / "labels.db")).select())
        names = [r.get("name") for r in rows]
        assert len(names) == len(set(names))
        chosen = json.loads((workdir / f"iter_{i:03d}" / "selected.json").read_text())["names"]
        assert sorted(names) == sorted(chosen) and len(chosen) <= SETTINGS.budget
    assert [h["iteration"] for h in history] == [0, 1, 2]
    assert history[2]["labels_used"] == sum(
        connect(str(workdir / f"iter_{i:03d}" / "labels.db")).count() for i in (1, 2))

    # frames entering the training set got new ids: unique across all files, clear of validation ids
    from ase.io import read

    files = [inputs["train"]] + [workdir / f"iter_{i:03d}" / "new_frames.extxyz" for i in (1, 2)
                                 if (workdir / f"iter_{i:03d}" / "new_frames.extxyz").exists()]
    frames = [a for f in files for a in read(f, index=":")]
    ids = frame_ids_of(frames)  # raises on a collision
    assert not set(ids) & set(frame_ids_of(read(inputs["val"], index=":")))
    assert len(frames) == history[2]["n_train_frames"]
    new = [a for a in frames if "campaign_iteration" in a.info]
    assert new and all(a.info["frame_id"] > max(frame_ids_of(tiny_nequip_run.frames)) for a in new)

    for h in history:
        assert np.isfinite(h["evaluation"]["in_domain"]["force_mae"])
        assert 0.0 < h["calibration"]["threshold"] <= 1.0
    ex = history[1]["exploration"]
    assert ex["n_tasks"] == 6 and ex["n_failed"] == 0
    assert len(history[1]["selected_uq_vs_error"]["frames"]) == connect(str(labels)).count()
    assert (workdir / "report.md").read_text().count("\n| ") >= 4 and (workdir / "report.png").stat().st_size > 0
    # the retrained model is a new model with its own estimator
    assert (workdir / "iter_002" / "estimator.ltau").exists()
    # warm start: each retraining continued from the previous model (its section, numbers included)
    import yaml

    for i in (1, 2):
        cfg = yaml.safe_load((workdir / f"iter_{i:03d}" / "models" / "member1" / "config.yaml").read_text())
        previous = workdir / f"iter_{i - 1:03d}" / "models" / "member1" / "run" / "last.ckpt"
        assert cfg["trainer"]["callbacks"][0] == {"_target_": WARM_START_TARGET, "checkpoint_path": str(previous.resolve())}
        import torch

        assert cfg["training_module"]["model"] == torch.load(previous, weights_only=True)["hyper_parameters"]["model"]


def test_bad_inputs_are_refused(tmp_path, inputs, tiny_nequip_run):
    from ase.build import fcc111
    from ase.io import write

    with pytest.raises(ValueError, match="budget"):
        CampaignSettings(**{**SETTINGS.__dict__, "budget": 0}).validate()
    bad_seed = fcc111("Au", size=(2, 2, 3), vacuum=5.0)
    bad_seed.info["name"] = "gold"
    write(tmp_path / "au.extxyz", [bad_seed])
    with pytest.raises(ValueError, match=r"'gold' contains \['Au'\], which the model does not know"):
        Campaign(tmp_path / "c", SETTINGS, train=inputs["train"], val=inputs["val"],
                 calibration=inputs["calibration"], seeds=tmp_path / "au.extxyz", reference=CalculatorFactory())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.txt").write_text("not a campaign")
    with pytest.raises(ValueError, match="not empty and holds no campaign"):
        _campaign(tmp_path / "other", inputs, tiny_nequip_run.run_dir, CalculatorFactory())


@pytest.mark.parametrize("option, value, message", [
    ("--budget", "0", "argument --budget: expected a positive integer"),
    ("--max-reference-force", "-5", "argument --max-reference-force: expected a finite number > 0"),
])
def test_cli_bad_numbers_exit_2(tmp_path, inputs, option, value, message):
    cmd = [sys.executable, "-m", "ltau_ase.cli", "learn", "--workdir", str(tmp_path / "w"), "--train",
           str(inputs["train"]), "--val", str(inputs["val"]), "--calibration", str(inputs["calibration"]),
           "--seeds", str(inputs["seeds"]), "--type-names", "Cu,Pt,O,H", option, value]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"ltau learn: error: {message}")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_committee_selection_and_reference_cap(tmp_path, inputs, tiny_nequip_ensemble):
    """The committee path of one iteration (M = 2 from the ensemble fixture's runs: no training here):
    trust levels, exploration, selection in the trust window, labelling under a reference trust cap.

    Checked against independent references: the trust levels against the members' own forces
    (population variance, numpy); the batch against the trust window over the explored snapshots;
    the rejections against EMT run here.
    """
    from ase.calculators.emt import EMT
    from ase.db import connect
    from ase.io import read

    from ltau_ase.learn import load_labels, load_snapshots
    from ltau_ase.nequip.calculator import LatentNequIPCalculator
    from ltau_ase.simulate.batch import content_name

    ens = tiny_nequip_ensemble
    val = write_training_file(tmp_path / "val.extxyz", assign_frame_ids(emt_slab_frames(4, seed=21), 7000))
    cap, budget = 1.7, 3  # eV/Å: between the EMT max forces of the frames this exploration selects
    # unrattled slabs: EMT max forces 0.55-1.1 eV/Å (within the cap) and 8.9 eV/Å (above it)
    mixed = write_training_file(tmp_path / "mixed.extxyz",
                                assign_frame_ids(emt_slab_frames(4, seed=12, metals=("Pt",), rattle=0.0), 7100))
    settings = CampaignSettings(
        type_names=("Cu", "Pt", "O", "H"), selection="committee", committee_size=2, n_iterations=1, budget=budget,
        explore=ExploreSettings(kinds=("md",), temperatures=(900.0, 1500.0), md_steps=20, stride=5),
        training=TrainingSettings(epochs=2), threshold_quantile=0.5, max_reference_force=cap, seed=0)
    campaign = Campaign(tmp_path / "committee", settings, train=ens.train_files[0], val=val,
                        calibration=inputs["calibration"], seeds=inputs["seeds"], reference=CalculatorFactory(),
                        test_sets={"in_domain": inputs["test"], "mixed": mixed}, initial_run=[r.run_dir for r in ens.runs],
                        progress=False)
    metrics0 = campaign.iteration(0)  # the given runs: nothing trained
    assert [json.loads((campaign.member_dir(0, m) / "done.json").read_text())["seconds"] for m in (0, 1)] == [0, 0]

    # trust levels: lo = quantile of max_i sqrt(sum_c var_m F_ic) over the calibration frames, hi = 3 lo
    members = [LatentNequIPCalculator.from_model_file(r.checkpoint, chemical_species_to_atom_type_map=True)
               for r in ens.runs]
    dev = []
    for frame in read(inputs["calibration"], index=":"):
        forces = []
        for calc in members:
            a = frame.copy()
            a.calc = calc
            forces.append(a.get_forces(apply_constraint=False))
        forces = np.array(forces)
        dev.append(np.sqrt(((forces - forces.mean(axis=0)) ** 2).mean(axis=0).sum(axis=1)).max())
    cal = metrics0["calibration"]
    # test MAE: the frames whose EMT max force exceeds the cap are reported apart (member 1's errors)
    test_err, test_above = [], []
    for frame in read(mixed, index=":"):
        ref = frame.get_forces(apply_constraint=False)
        a = frame.copy()
        a.calc = members[0]
        test_err.append(np.linalg.norm(a.get_forces(apply_constraint=False) - ref, axis=1))
        test_above.append(np.linalg.norm(ref, axis=1).max() > cap)
    ev = metrics0["evaluation"]["mixed"]
    assert ev["n_frames"] == len(test_err) and ev["n_frames_above_cap"] == sum(test_above)
    assert 0 < sum(test_above) < len(test_err)  # both kinds present, so the split is exercised
    assert ev["force_mae"] == pytest.approx(np.concatenate([e for e, x in zip(test_err, test_above) if not x]).mean(),
                                            rel=1e-5)
    assert ev["force_mae_above_cap"] == pytest.approx(
        np.concatenate([e for e, x in zip(test_err, test_above) if x]).mean(), rel=1e-5)
    assert ev["force_mae_all_frames"] == pytest.approx(np.concatenate(test_err).mean(), rel=1e-5)
    assert cal["lo"] == pytest.approx(np.quantile(dev, 0.5), rel=1e-5)
    assert cal["hi"] == pytest.approx(3 * cal["lo"]) and cal["threshold"] == cal["hi"]

    # exploration with the committee: M model evaluations per step
    campaign.iter_dir(1).mkdir()  # as Campaign.iteration does; the stages are called one by one here
    ex = campaign.explore(1)
    assert ex["n_tasks"] == 6 and ex["n_failed"] == 0 and ex["model_steps"] == 2 * ex["steps"]
    # the batch: frames in the trust window first (uniformly), filled from below lo, never above hi
    stats = campaign.select(1)
    snaps, _ = load_snapshots(campaign.iter_dir(1) / "explore.db")
    stat_by_name, seen = {}, set()
    for x in snaps:
        if content_name(x["atoms"]) not in seen:  # the seed at step 0 of both temperatures counts once
            seen.add(content_name(x["atoms"]))
            stat_by_name[x["name"]] = x["statistic"]
    assert stats["n_duplicates_removed"] == len(snaps) - len(stat_by_name) == 3
    lo, hi = cal["lo"], cal["hi"]
    window = {n for n, v in stat_by_name.items() if lo < v <= hi}
    chosen = json.loads((campaign.iter_dir(1) / "selected.json").read_text())["names"]
    assert len(chosen) == budget == len(set(chosen)) and all(stat_by_name[n] <= hi for n in chosen)
    assert len(set(chosen) & window) == min(budget, len(window)) == stats["n_selected_flagged"]
    below = sorted((v for v in stat_by_name.values() if v <= lo), reverse=True)
    assert sorted(stat_by_name[n] for n in chosen if n not in window) == sorted(below[:budget - len(window & set(chosen))])

    # the cap: exactly the chosen frames whose EMT max force exceeds it are rejected, kept with their values
    labelling = campaign.label(1)
    by_name = {x["name"]: x["atoms"] for x in snaps}
    emt_fmax = {}
    for n in chosen:
        a = by_name[n].copy()
        a.calc = EMT()
        emt_fmax[n] = np.linalg.norm(a.get_forces(apply_constraint=False), axis=1).max()
    done, failed, rejected = load_labels(campaign.iter_dir(1) / "labels.db")
    assert sorted(rejected) == sorted(n for n in chosen if emt_fmax[n] > cap) and rejected
    assert sorted(done) == sorted(n for n in chosen if emt_fmax[n] <= cap) and done and not failed
    for n, atoms in rejected.items():
        assert np.linalg.norm(atoms.get_forces(apply_constraint=False), axis=1).max() == pytest.approx(emt_fmax[n])
        assert "exceeds max_reference_force = 1.7 eV/Å" in atoms.info["reason"]
    assert labelling["n_rejected"] == len(rejected) and labelling["n_labelled"] == len(done)
    assert campaign._labels_used(1) == budget  # a rejected frame cost a reference calculation
    # only the accepted frames enter the training set
    trained = read(campaign.iter_dir(1) / "new_frames.extxyz", index=":")
    assert sorted(a.info["explore_name"] for a in trained) == sorted(done)
    assert campaign.train_files(1)[-1] == campaign.iter_dir(1) / "new_frames.extxyz"
    # nothing lost or redone on a rerun: labelling again computes nothing and keeps every row
    rows = sorted((r.get("name"), r.get("status")) for r in connect(str(campaign.iter_dir(1) / "labels.db")).select())
    assert campaign.label(1) == labelling
    assert sorted((r.get("name"), r.get("status"))
                  for r in connect(str(campaign.iter_dir(1) / "labels.db")).select()) == rows


def test_warm_start_copies_the_previous_model(tmp_path, tiny_nequip_run):
    """WarmStart puts the checkpoint's weights into a model whose own weights differ; configure_warm_start
    writes the checkpoint's model section (resolved numbers) and the callback into a nequip config."""
    import torch
    import yaml

    from ltau_ase.nequip.safe_load import build_checkpoint_model, load_checkpoint_model
    from ltau_ase.nequip.training import write_nequip_config
    from ltau_ase.nequip.warm_start import WarmStart, configure_warm_start

    loaded = load_checkpoint_model(tiny_nequip_run.checkpoint)
    reference = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    fresh = build_checkpoint_model(torch.load(tiny_nequip_run.checkpoint, weights_only=True))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in reference.items())

    class Module:  # the training module's model container
        model = torch.nn.ModuleDict({"sole_model": fresh})

    WarmStart(tiny_nequip_run.checkpoint).on_fit_start(None, Module())
    for k, v in reference.items():
        assert torch.equal(fresh.state_dict()[k], v), k

    class EMAModule(Module):
        ema = object()

    with pytest.raises(ValueError, match="EMA"):
        WarmStart(tiny_nequip_run.checkpoint).on_fit_start(None, EMAModule())

    config = write_nequip_config(tmp_path / "cfg.yaml", tiny_nequip_run.train_files, type_names=["Cu", "Pt", "O", "H"],
                                 val_file=tiny_nequip_run.val_file, max_epochs=2)
    configure_warm_start(config, tiny_nequip_run.checkpoint)
    cfg = yaml.safe_load(config.read_text())
    assert cfg["training_module"]["model"] == loaded.hyper_parameters["model"]
    assert isinstance(cfg["training_module"]["model"]["avg_num_neighbors"], float)  # a number, not re-resolved
    assert cfg["trainer"]["callbacks"][0] == {"_target_": WARM_START_TARGET,
                                              "checkpoint_path": str(Path(tiny_nequip_run.checkpoint).resolve())}
