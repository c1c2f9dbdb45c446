"""Class 1 of issue 9, as a hostile user: no code runs from a model file.

Every hostile checkpoint below is a real nequip checkpoint (the tiny session run) with one field
changed; each must be refused with a ValueError before anything it names is called. A marker file
that the payloads would create must never appear.
"""
import copy
import hashlib
import os
import pickle
import sys

import numpy as np
import pytest
import torch

from ltau_ase.nequip import safe_load
from ltau_ase.nequip.calculator import LatentNequIPCalculator
from ltau_ase.nequip.safe_load import allow_checkpoint_targets, load_checkpoint_model, verify_checkpoint


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_bomb(path, marker):
    with open(path, "wb") as fh:
        pickle.dump({"hyper_parameters": _Payload(marker), "state_dict": {}}, fh)
    return path


@pytest.fixture(scope="module")
def clean_checkpoint(tiny_nequip_run):
    return torch.load(tiny_nequip_run.checkpoint, map_location="cpu", weights_only=True)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a payload ran"


def _write(ckpt, path):
    torch.save(ckpt, path)
    return path


def _with_model(clean, model_cfg):
    ckpt = copy.deepcopy(clean)
    ckpt["hyper_parameters"]["model"] = model_cfg
    return ckpt


def _good_model(clean):
    return copy.deepcopy(clean["hyper_parameters"]["model"])


# ----------------------------------------------------------------------------- hostile _target_ strings
SHELL_TARGETS = [
    "nequip.nn.compile.os.system",  # passes a prefix check, resolves to os.system
    "nequip.model.utils.os.system",
    "nequip.train.lightning.torch.load",
    "os.system",
    "posix.system",
    "builtins.eval",
    "builtins.exec",
    "builtins.__import__",
    "subprocess.run",
    "subprocess.Popen",
    "importlib.import_module",
    "hydra.utils.call",
    "hydra.utils.instantiate",
    "functools.partial",
    "nequip.model.NequIPGNNModel.__globals__.os.system",
    "nequip.model.NequIPGNNModel ",  # an allowed name with trailing space
    "NEQUIP.model.NequIPGNNModel",
    "nequip.model..NequIPGNNModel",
]


@pytest.mark.parametrize("target", SHELL_TARGETS)
def test_model_target_outside_allow_list_never_runs(clean_checkpoint, tmp_path, marker, target):
    cfg = {"_target_": target, "command": f"touch {marker}", "source": f"open('{marker}', 'w')",
           "args": ["touch", str(marker)], "f": str(marker)}
    path = _write(_with_model(clean_checkpoint, cfg), tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="not an allowed model class or function"):
        LatentNequIPCalculator.from_model_file(path)


@pytest.mark.parametrize("where", ["pair_potential", "list", "deep", "modify_inner", "modifier"])
def test_nested_targets_are_checked_too(clean_checkpoint, tmp_path, marker, where):
    evil = {"_target_": "nequip.nn.compile.os.system", "command": f"touch {marker}"}
    cfg = _good_model(clean_checkpoint)
    if where == "pair_potential":
        cfg["pair_potential"] = evil
    elif where == "list":
        cfg["per_type_energy_shifts"] = [0.1, evil]
    elif where == "deep":
        cfg["extra"] = {"a": [{"b": {"c": evil}}]}
    elif where == "modify_inner":
        cfg = {"_target_": "nequip.model.modify", "model": evil, "modifiers": []}
    else:
        cfg = {"_target_": "nequip.model.modify", "model": cfg, "modifiers": [evil]}
    path = _write(_with_model(clean_checkpoint, cfg), tmp_path / "nested.ckpt")
    with pytest.raises(ValueError, match="'nequip.nn.compile.os.system' at model"):
        LatentNequIPCalculator.from_model_file(path)


@pytest.mark.parametrize("target", [None, 42, 3.5, ["os.system"], ("os", "system"), {"_target_": "os.system"},
                                    b"os.system", True])
def test_non_string_targets_are_refused(clean_checkpoint, tmp_path, marker, target):
    cfg = _good_model(clean_checkpoint)
    cfg["_target_"] = target
    path = _write(_with_model(clean_checkpoint, cfg), tmp_path / "nonstr.ckpt")
    with pytest.raises(ValueError, match="_target_"):
        LatentNequIPCalculator.from_model_file(path)


@pytest.mark.parametrize("key, value", [
    ("_args_", ["touch PWNED"]),
    ("_partial_", True),
    ("_recursive_", False),
    ("_convert_", "all"),
])
def test_hydra_call_options_are_refused(clean_checkpoint, tmp_path, marker, key, value):
    # both on an allowed root builder and on a nested allowed pair potential
    for nest in (False, True):
        cfg = _good_model(clean_checkpoint)
        if nest:
            cfg["pair_potential"] = {"_target_": "nequip.nn.pair_potential.ZBL", key: value}
        else:
            cfg[key] = value
        path = _write(_with_model(clean_checkpoint, cfg), tmp_path / "hydra.ckpt")
        with pytest.raises(ValueError, match="Hydra call option"):
            LatentNequIPCalculator.from_model_file(path)


def test_interpolations_are_refused(clean_checkpoint, tmp_path, marker):
    cfg = _good_model(clean_checkpoint)
    cfg["pair_potential"] = {"_target_": "nequip.nn.pair_potential.ZBL", "units": "${oc.env:HOME}"}
    path = _write(_with_model(clean_checkpoint, cfg), tmp_path / "interp.ckpt")
    with pytest.raises(ValueError, match="interpolation"):
        LatentNequIPCalculator.from_model_file(path)


@pytest.mark.parametrize("target", ["nequip.model.ModelFromCheckpoint", "nequip.model.ModelFromPackage",
                                    "nequip.model.saved_models.checkpoint.ModelFromCheckpoint",
                                    "nequip.model.ModelTypeNamesFromPackage", "torch.load"])
def test_targets_that_load_further_files_are_refused(clean_checkpoint, tmp_path, marker, target):
    bomb = _pickle_bomb(tmp_path / "inner.ckpt", marker)  # the file they would load runs a payload
    for cfg in ({"_target_": target, "checkpoint_path": str(bomb), "package_path": str(bomb), "f": str(bomb)},
                {"_target_": "nequip.model.modify", "modifiers": [],  # nequip's fine-tuning pattern
                 "model": {"_target_": target, "checkpoint_path": str(bomb), "package_path": str(bomb)}}):
        path = _write(_with_model(clean_checkpoint, cfg), tmp_path / "loader.ckpt")
        with pytest.raises(ValueError, match="not an allowed model class"):
            LatentNequIPCalculator.from_model_file(path)


@pytest.mark.parametrize("target", ["nequip.train.lightning.os.system", "os.system",
                                    "nequip.train.ScheduleFreeLightningModule", 7])
def test_training_module_outside_allow_list_is_refused(clean_checkpoint, tmp_path, marker, target):
    ckpt = copy.deepcopy(clean_checkpoint)
    ckpt["hyper_parameters"]["info_dict"]["training_module"]["_target_"] = target
    path = _write(ckpt, tmp_path / "module.ckpt")
    with pytest.raises(ValueError, match="training module"):
        LatentNequIPCalculator.from_model_file(path)


def test_deep_nesting_is_refused(clean_checkpoint, tmp_path):
    cfg = _good_model(clean_checkpoint)
    node = cfg
    for _ in range(200):
        node["x"] = {}
        node = node["x"]
    path = _write(_with_model(clean_checkpoint, cfg), tmp_path / "deep.ckpt")
    with pytest.raises(ValueError, match="nested more than"):
        LatentNequIPCalculator.from_model_file(path)


def test_names_in_sections_never_acted_on_stay_inert(clean_checkpoint, tmp_path, marker):
    """Data, trainer, callbacks, optimizer and loss are a record of training: never resolved or called."""
    ckpt = copy.deepcopy(clean_checkpoint)
    evil = {"_target_": "nequip.nn.compile.os.system", "command": f"touch {marker}"}
    info = ckpt["hyper_parameters"]["info_dict"]
    info["data"] = evil
    info["trainer"]["callbacks"].append(evil)
    ckpt["hyper_parameters"]["optimizer"] = evil
    ckpt["hyper_parameters"]["loss"] = evil
    path = _write(ckpt, tmp_path / "record.ckpt")
    loaded = load_checkpoint_model(path)
    assert loaded.model.is_graph_model and loaded.hyper_parameters["optimizer"] == evil


def test_pickle_payload_never_runs(tmp_path, marker):
    bad = _pickle_bomb(tmp_path / "evil.ckpt", marker)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        LatentNequIPCalculator.from_model_file(bad)


def test_payload_hidden_in_state_dict_never_runs(clean_checkpoint, tmp_path, marker):
    with open(tmp_path / "sd.ckpt", "wb") as fh:
        torch.save({**clean_checkpoint, "state_dict": {"model.x": _Payload(marker)}}, fh)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        LatentNequIPCalculator.from_model_file(tmp_path / "sd.ckpt")


# ----------------------------------------------------------------------------- one read, no swap window
_opens: list = []
_watch: list = []


def _audit(event, args):
    if event == "open" and _watch and args and str(args[0]) in _watch:
        _opens.append(args[0])


sys.addaudithook(_audit)


def test_model_file_is_opened_exactly_once(tiny_nequip_run, tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(tiny_nequip_run.checkpoint.read_bytes())
    _opens.clear()
    _watch[:] = [str(path)]
    try:
        calc = LatentNequIPCalculator.from_model_file(path, chemical_species_to_atom_type_map=True)
    finally:
        _watch.clear()
    assert len(_opens) == 1
    assert calc.model_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_file_swapped_after_the_read_is_not_used(tiny_nequip_run, tmp_path, marker, monkeypatch, atoms_pair):
    """An attacker replaces the file right after it was read: the model comes from the bytes read."""
    path = tmp_path / "model.ckpt"
    original = tiny_nequip_run.checkpoint.read_bytes()
    path.write_bytes(original)
    real_read = safe_load.read_model_bytes

    def read_then_swap(p):
        data = real_read(p)
        _pickle_bomb(path, marker)
        return data

    monkeypatch.setattr(safe_load, "read_model_bytes", read_then_swap)
    calc = LatentNequIPCalculator.from_model_file(path, chemical_species_to_atom_type_map=True)
    assert calc.model_sha256 == hashlib.sha256(original).hexdigest()
    reference, atoms = atoms_pair
    atoms.calc = calc
    np.testing.assert_array_equal(atoms.get_forces(), reference)


@pytest.fixture
def atoms_pair(latent_calc, tiny_nequip_run):
    atoms = tiny_nequip_run.frames[0].copy()
    atoms.calc = latent_calc
    forces = atoms.get_forces().copy()
    atoms = atoms.copy()
    return forces, atoms


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_or_device_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.ckpt"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        LatentNequIPCalculator.from_model_file(fifo)
    dev = tmp_path / "zero.ckpt"
    dev.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="not a regular file"):
        LatentNequIPCalculator.from_model_file(dev)


# ----------------------------------------------------------------------------- corrupt weights, other files
@pytest.mark.parametrize("key, value", [("num_features", 10**9), ("num_layers", 10**6), ("l_max", 400),
                                        ("radial_mlp_width", [8, 10**8]), ("num_features", -1),
                                        ("type_names", [f"X{i}" for i in range(10**4)])])
def test_huge_declared_sizes_are_refused_before_building(clean_checkpoint, tmp_path, key, value):
    import resource

    cfg = _good_model(clean_checkpoint)
    cfg[key] = value
    path = _write(_with_model(clean_checkpoint, cfg), tmp_path / "huge.ckpt")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="at most|outside"):
        load_checkpoint_model(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: nothing was built


def test_weights_not_matching_or_not_finite_are_refused(clean_checkpoint, tmp_path):
    ckpt = copy.deepcopy(clean_checkpoint)
    key = next(k for k, v in ckpt["state_dict"].items() if k.startswith("model.") and v.ndim == 2)
    ckpt["state_dict"][key] = torch.full_like(ckpt["state_dict"][key], float("nan"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_checkpoint_model(_write(ckpt, tmp_path / "nan.ckpt"))
    ckpt["state_dict"][key] = torch.zeros(3, 3, 3)
    with pytest.raises(ValueError, match="do not match the model"):
        load_checkpoint_model(_write(ckpt, tmp_path / "shape.ckpt"))
    del ckpt["state_dict"]
    with pytest.raises(ValueError, match="state_dict"):
        load_checkpoint_model(_write(ckpt, tmp_path / "nostate.ckpt"))


def test_non_nequip_file_and_untrusted_package_are_refused(tmp_path):
    other = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(ValueError, match="not a nequip checkpoint"):
        verify_checkpoint(other)
    (tmp_path / "m.nequip.zip").write_bytes(b"PK")
    with pytest.raises(ValueError, match="nequip-package archive"):
        LatentNequIPCalculator.from_model_file(tmp_path / "m.nequip.zip")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        LatentNequIPCalculator.from_model_file(tmp_path / "empty.ckpt")


# ----------------------------------------------------------------------------- the extension hook
def plugin_builder(**kwargs):
    """Stands in for a plugin's model builder (e.g. Allegro's): builds nequip's model."""
    from nequip.model import NequIPGNNModel

    plugin_builder.calls += 1
    return NequIPGNNModel(**kwargs)


plugin_builder.calls = 0


def test_plugins_are_trusted_by_object_never_by_string(clean_checkpoint, tmp_path):
    cfg = _good_model(clean_checkpoint)
    cfg["_target_"] = f"{__name__}.plugin_builder"
    path = _write(_with_model(clean_checkpoint, cfg), tmp_path / "plugin.ckpt")
    with pytest.raises(ValueError, match="not an allowed model class"):
        load_checkpoint_model(path)
    with pytest.raises(TypeError, match="objects themselves"):
        load_checkpoint_model(path, trusted_targets=(f"{__name__}.plugin_builder",))
    with pytest.raises(TypeError, match="objects themselves"):
        allow_checkpoint_targets("allegro.model")
    before = plugin_builder.calls
    loaded = load_checkpoint_model(path, trusted_targets=(plugin_builder,))
    assert plugin_builder.calls == before + 1 and loaded.model.is_graph_model
    assert plugin_builder not in safe_load._plugin_targets  # a per-call trust does not persist


# ----------------------------------------------------------------------------- EMA weights as nequip picks them
def test_ema_checkpoint_uses_ema_weights_like_nequip(clean_checkpoint, latent_calc, tmp_path, tiny_nequip_run):
    """Independent reference: nequip's own loader on the same (test-made, trusted) file."""
    from nequip.integrations.ase import NequIPCalculator

    ckpt = copy.deepcopy(clean_checkpoint)
    ckpt["hyper_parameters"]["info_dict"]["training_module"]["_target_"] = "nequip.train.EMALightningModule"
    params = list(latent_calc.model.parameters())
    for i, p in enumerate(params):
        ckpt["state_dict"][f"ema.ema_weight_{i}"] = p.detach().clone() * 0.5
    ckpt["state_dict"]["ema._extra_state"] = {"decay": 0.999, "num_updates": 3, "is_holding_ema_weights": True}
    path = _write(ckpt, tmp_path / "ema.ckpt")
    ours = LatentNequIPCalculator.from_model_file(path, chemical_species_to_atom_type_map=True)
    theirs = NequIPCalculator._from_saved_model(str(path), chemical_species_to_atom_type_map=True)
    atoms = tiny_nequip_run.frames[0]
    results = []
    for calc in (ours, theirs, latent_calc):
        a = atoms.copy()
        a.calc = calc
        results.append((a.get_potential_energy(), a.get_forces()))
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert abs(results[0][0] - results[2][0]) > 1e-6  # the EMA weights were really used

    ckpt["state_dict"]["ema._extra_state"]["is_holding_ema_weights"] = False
    with pytest.raises(ValueError, match="EMA"):
        load_checkpoint_model(_write(ckpt, tmp_path / "ema_raw.ckpt"))
