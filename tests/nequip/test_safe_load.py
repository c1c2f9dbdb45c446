"""User-supplied model files are verified before nequip unpickles them."""
import os
import pickle

import pytest
import torch

from ltau_ase.nequip.calculator import LatentNequIPCalculator
from ltau_ase.nequip.safe_load import verify_checkpoint


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "executed"
    bad = tmp_path / "evil.ckpt"
    with open(bad, "wb") as fh:
        pickle.dump({"hyper_parameters": _Payload(marker)}, fh)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        LatentNequIPCalculator.from_model_file(bad)
    assert not marker.exists()


def test_checkpoint_naming_untrusted_target_is_refused(tiny_nequip_run, tmp_path):
    hparams = verify_checkpoint(tiny_nequip_run.checkpoint)  # the real one passes
    assert hparams["info_dict"]["training_module"]["_target_"].startswith("nequip.train.")
    ckpt = torch.load(tiny_nequip_run.checkpoint, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["model"] = {"_target_": "os.system", "command": "touch pwned"}
    tampered = tmp_path / "tampered.ckpt"
    torch.save(ckpt, tampered)
    with pytest.raises(ValueError, match=r"'os\.system' at model"):
        LatentNequIPCalculator.from_model_file(tampered)
    ckpt["hyper_parameters"]["model"] = {"_target_": "nequip.model.ModelFromPackage", "package_path": "x.zip"}
    torch.save(ckpt, tampered)
    with pytest.raises(ValueError, match="loads further model files"):
        verify_checkpoint(tampered)


def test_non_nequip_file_is_refused(tmp_path):
    other = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(ValueError, match="not a nequip checkpoint"):
        verify_checkpoint(other)
