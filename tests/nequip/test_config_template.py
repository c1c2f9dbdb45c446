"""The packaged nequip config template and the ensemble config writer (no training here)."""
from __future__ import annotations

import pytest
import yaml

from ltau_ase.core.trainingset import assign_frame_ids, write_training_file
from ltau_ase.nequip.training import (
    ERROR_LOGGER_TARGET,
    check_shared_split,
    config_template_path,
    emt_slab_frames,
    write_ensemble_configs,
    write_nequip_config,
)


def _resolved(path):
    """The config as nequip-train resolves it (nequip's own resolvers; hydra / dataset statistics stubbed)."""
    from nequip.utils.resolvers import list_to_identity_dict
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("list_to_identity_dict"):
        OmegaConf.register_new_resolver("list_to_identity_dict", list_to_identity_dict)
    for name in ("hydra", "training_data_stats"):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, lambda x, _n=name: f"<{_n}:{x}>")
    return OmegaConf.to_container(OmegaConf.create(yaml.safe_load(open(path))), resolve=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    frames = assign_frame_ids(emt_slab_frames(10, seed=0), 0)
    return d, write_training_file(d / "a.xyz", frames[:6]), write_training_file(d / "b.xyz", frames[6:])


def test_template_is_package_data_and_a_plain_nequip_config():
    text = config_template_path().read_text(encoding="utf-8")
    cfg = yaml.safe_load(text)
    assert cfg["run"] == ["train"] and cfg["training_module"]["model"]["_target_"] == "nequip.model.NequIPGNNModel"
    assert ERROR_LOGGER_TARGET in text and "include_keys: [frame_id]" in text


def test_written_config_resolves_to_the_requested_values(files):
    d, a, b = files
    path = write_nequip_config(d / "c.yaml", [a, b], type_names=["Cu", "Pt", "O", "H"], n_val=2, seed=3,
                               data_seed=7, num_features=16, r_max=5.0, max_epochs=9, error_logger={"mode": "exact"})
    cfg = _resolved(path)
    model = cfg["training_module"]["model"]
    assert (model["seed"], model["num_features"], model["radial_mlp_width"], model["r_max"]) == (3, 16, 16, 5.0)
    assert model["type_names"] == ["Cu", "Pt", "O", "H"]
    data = cfg["data"]
    assert data["seed"] == 7 and data["split_dataset"]["train"] == 8 and data["split_dataset"]["val"] == 2
    sets = data["split_dataset"]["dataset"]["datasets"]
    assert [s["file_path"] for s in sets] == [str(a.resolve()), str(b.resolve())]
    mapper = sets[1]["transforms"][0]
    assert mapper["chemical_species_to_atom_type_map"] == {"Cu": "Cu", "Pt": "Pt", "O": "O", "H": "H"}
    assert sets[1]["transforms"][1]["r_max"] == 5.0 and sets[0]["include_keys"] == ["frame_id"]
    assert cfg["trainer"]["max_epochs"] == 9
    loggers = [c for c in cfg["trainer"]["callbacks"] if c["_target_"] == ERROR_LOGGER_TARGET]
    assert loggers == [{"_target_": ERROR_LOGGER_TARGET, "log_dir": "<hydra:runtime.output_dir>/ltau_errors",
                        "mode": "exact"}]
    # without error_logger, no logger (callers pass their own), and a separate validation file
    cfg = _resolved(write_nequip_config(d / "c2.yaml", a, type_names=["Cu", "Pt", "O", "H"], val_file=b))
    assert not [c for c in cfg["trainer"]["callbacks"] if c["_target_"] == ERROR_LOGGER_TARGET]
    assert cfg["data"]["val_dataset"]["file_path"] == str(b.resolve()) and "split_dataset" not in cfg["data"]


def test_ensemble_configs_share_one_split(files):
    d, a, b = files
    paths = write_ensemble_configs(d / "ens", [a, b], type_names=["Cu", "Pt", "O", "H"], n_members=3, n_val=2,
                                   data_seed=5, max_epochs=4)
    cfgs = [_resolved(p) for p in paths]
    assert [p.name for p in paths] == ["member1.yaml", "member2.yaml", "member3.yaml"]
    assert [c["training_module"]["model"]["seed"] for c in cfgs] == [1, 2, 3]
    assert all(c["data"] == cfgs[0]["data"] for c in cfgs) and cfgs[0]["data"]["seed"] == 5
    assert all(any(cb["_target_"] == ERROR_LOGGER_TARGET for cb in c["trainer"]["callbacks"]) for c in cfgs)
    other = write_nequip_config(d / "ens" / "other.yaml", [a, b], type_names=["Cu", "Pt", "O", "H"], n_val=2,
                                seed=4, data_seed=6)
    with pytest.raises(ValueError, match=r"differ in data\.\['seed'\].*share"):
        check_shared_split([*paths, other])
    default = write_ensemble_configs(d / "ens2", a, n_members=2, n_val=1)  # type names read from the data
    assert _resolved(default[0])["training_module"]["model"]["type_names"] == ["O", "Cu", "Pt"]  # by atomic number
    with pytest.raises(ValueError, match=r"elements \['Cu'\] that type_names"):
        write_ensemble_configs(d / "bad", a, type_names=["Pt", "O"], n_val=1)
