"""Latent descriptors of the nequip adapter: what they are, where they come from, their order."""
from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("nequip")

from ltau_ase.core.atom_ids import global_atom_ids  # noqa: E402
from ltau_ase.nequip.calculator import LatentNequIPCalculator  # noqa: E402
from ltau_ase.nequip.descriptors import extract_descriptors, read_training_frames  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def extracted(latent_calc, tiny_nequip_run):
    return extract_descriptors(latent_calc, tiny_nequip_run.frames, batch_size=16, progress=False)


def last_convnet(model):
    """The last message-passing layer, found by name in the eager model (layer{i}_convnet)."""
    layers = {int(m.group(1)): mod for name, mod in model.named_modules()
              if (m := re.fullmatch(r".*layer(\d+)_convnet", name))}
    return layers[max(layers)]


def test_descriptors_are_last_convnet_scalars_of_the_same_pass(latent_calc, tiny_nequip_run):
    atoms = tiny_nequip_run.frames[3].copy()
    atoms.rattle(0.05, seed=1)
    captured = []
    calls = []
    layer = last_convnet(latent_calc.model)
    h1 = layer.register_forward_hook(lambda m, i, out: captured.append(out["node_features"].detach().clone()))
    h2 = latent_calc.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        atoms.calc = latent_calc
        atoms.get_potential_energy()
        atoms.get_forces()
        desc = atoms.calc.get_property("descriptors", atoms)
    finally:
        h1.remove()
        h2.remove()
    assert len(calls) == 1 and len(captured) == 1  # energy, forces and descriptors: one forward pass
    assert desc.dtype == np.float32 and desc.shape == (len(atoms), 8)  # tiny model: 8 scalar features
    np.testing.assert_array_equal(desc, captured[0].numpy().astype(np.float32))
    assert str(latent_calc.model.irreps_out["node_features"]) == "8x0e"


def test_calculator_descriptors_equal_batch_extraction(latent_calc, extracted, tiny_nequip_run):
    atom_ids, descriptors = extracted
    frames = tiny_nequip_run.frames
    row = {int(i): r for r, i in enumerate(atom_ids)}
    for f in (0, 17, 41, len(frames) - 1):  # frames of both training files
        atoms = frames[f].copy()
        atoms.calc = latent_calc
        atoms.get_forces()
        fid = frames[f].info["frame_id"]
        rows = [row[fid * 2**20 + a] for a in range(len(atoms))]
        np.testing.assert_allclose(descriptors[rows], atoms.calc.results["descriptors"], rtol=1e-5, atol=1e-5)


def test_extraction_returns_global_atom_id_order_independent_of_frame_order(latent_calc, extracted, tiny_nequip_run):
    atom_ids, descriptors = extracted
    frames = tiny_nequip_run.frames
    expected_ids = global_atom_ids([a.info["frame_id"] for a in frames], [len(a) for a in frames])
    np.testing.assert_array_equal(atom_ids, expected_ids)
    assert descriptors.dtype == np.float32 and descriptors.shape == (expected_ids.size, 8)

    perm = np.random.default_rng(0).permutation(len(frames))[:30]
    ids2, desc2 = extract_descriptors(latent_calc, [frames[i] for i in perm], batch_size=7, progress=False)
    row = {int(i): r for r, i in enumerate(atom_ids)}
    np.testing.assert_allclose(desc2, descriptors[[row[int(i)] for i in ids2]], rtol=1e-5, atol=1e-5)


def test_extraction_refuses_output_that_does_not_line_up_with_the_frames(tiny_nequip_run):
    class ReversingCalculator(LatentNequIPCalculator):
        """A data pipeline that silently reverses the atoms of every structure."""

        def atoms_to_data(self, atoms):
            return super().atoms_to_data(atoms[::-1])

    calc = ReversingCalculator.from_model_file(tiny_nequip_run.checkpoint, chemical_species_to_atom_type_map=True)
    with pytest.raises(ValueError, match="in the model output but at|has model type"):
        extract_descriptors(calc, tiny_nequip_run.frames[:6], batch_size=4, progress=False)


def test_extraction_input_errors(latent_calc, tiny_nequip_run):
    frames = [a.copy() for a in tiny_nequip_run.frames[:3]]
    no_id = [a.copy() for a in frames]
    del no_id[1].info["frame_id"]
    with pytest.raises(ValueError, match="frame 1 has no info\\['frame_id'\\]"):
        extract_descriptors(latent_calc, no_id, progress=False)
    dup = [a.copy() for a in frames]
    dup[2].info["frame_id"] = dup[0].info["frame_id"]
    with pytest.raises(ValueError, match="repeat"):
        extract_descriptors(latent_calc, dup, progress=False)
    gold = frames[0].copy()
    gold.numbers[0] = 79  # Au: not a model type
    with pytest.raises(ValueError, match=r"\['Au'\]"):
        extract_descriptors(latent_calc, [gold], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        extract_descriptors(latent_calc, frames, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="expected a path"):
        extract_descriptors(latent_calc.model, frames, progress=False)


def test_read_training_frames_reads_all_files_with_ids(tiny_nequip_run):
    frames = read_training_frames(tiny_nequip_run.train_files)
    assert [a.info["frame_id"] for a in frames] == [a.info["frame_id"] for a in tiny_nequip_run.frames]
    with pytest.raises(FileNotFoundError):
        read_training_frames([tiny_nequip_run.train_files[0].with_name("missing.xyz")])


def test_calculator_refuses_unknown_elements_and_model_files_without_latents(latent_calc, tiny_nequip_run, tmp_path):
    atoms = tiny_nequip_run.frames[0].copy()
    atoms.numbers[-1] = 79  # Au
    atoms.calc = latent_calc
    with pytest.raises(ValueError, match=r"elements \['Au'\].*not know"):
        atoms.get_forces()

    compiled = tmp_path / "model.nequip.pt2"
    compiled.write_bytes(b"")
    with pytest.raises(ValueError, match="compiled model.*trusted=True"):  # native code: never run untrusted
        LatentNequIPCalculator.from_model_file(compiled)
    aoti = tmp_path / "model.pt2"
    aoti.write_bytes(b"")
    with pytest.raises(ValueError, match="AOTI.*latent"):
        LatentNequIPCalculator.from_model_file(aoti)
    with pytest.raises(ValueError, match=r"expected a nequip checkpoint \(\.ckpt\)"):
        LatentNequIPCalculator.from_model_file(tmp_path / "model.pth")
    with pytest.raises(FileNotFoundError):
        LatentNequIPCalculator.from_model_file(tmp_path / "missing.ckpt")


def test_implemented_properties_are_per_instance(latent_calc):
    from nequip.integrations.ase import NequIPCalculator

    assert "descriptors" in latent_calc.implemented_properties
    assert "descriptors" not in NequIPCalculator.implemented_properties
    assert "descriptors" not in LatentNequIPCalculator.implemented_properties


def test_nequip_package_file_gives_the_checkpoint_descriptors(latent_calc, tiny_nequip_run, tmp_path):
    """A ``nequip-package`` .nequip.zip of the checkpoint loads eagerly and yields the same latents."""
    import subprocess
    import sys

    package = tmp_path / "tiny.nequip.zip"
    subprocess.run([sys.executable, "-m", "nequip.scripts.package", "build", str(tiny_nequip_run.checkpoint),
                    str(package)], check=True, capture_output=True, timeout=300)
    frames = tiny_nequip_run.frames[:4]
    ids_ckpt, from_ckpt = extract_descriptors(latent_calc, frames, progress=False)
    with pytest.raises(ValueError, match="imports code stored in the file"):
        LatentNequIPCalculator.from_model_file(package)  # packages carry code: refused unless trusted
    pkg_calc = LatentNequIPCalculator.from_model_file(package, trusted=True, chemical_species_to_atom_type_map=True)
    ids_pkg, from_pkg = extract_descriptors(pkg_calc, frames, progress=False)
    np.testing.assert_array_equal(ids_pkg, ids_ckpt)
    np.testing.assert_allclose(from_pkg, from_ckpt, rtol=1e-6, atol=1e-6)
