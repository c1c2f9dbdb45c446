import subprocess
import sys

import numpy as np
import pytest

from ltau_ase.core.atom_ids import frame_ids_of, global_atom_ids, split_atom_ids


def test_import_does_not_pull_torch():
    code = "import sys, ltau_ase; ltau_ase.LTAUEstimator; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_global_atom_ids_are_stable_and_invertible():
    ids = global_atom_ids([7, 3], [2, 3])
    assert ids.tolist() == [7 * 2**20, 7 * 2**20 + 1, 3 * 2**20, 3 * 2**20 + 1, 3 * 2**20 + 2]
    frames, local = split_atom_ids(ids)
    assert frames.tolist() == [7, 7, 3, 3, 3]
    assert local.tolist() == [0, 1, 0, 1, 2]
    # same frame gives the same ids whatever its position in the list
    assert np.array_equal(global_atom_ids([3], [3]), ids[2:])


@pytest.mark.parametrize(
    "frame_ids, n_atoms, match",
    [([1, 2], [3], "one per frame"), ([-1], [3], r"\[0, 2\*\*42\)"), ([1], [2**20 + 1], "between 0 and")],
)
def test_global_atom_ids_rejects_bad_input(frame_ids, n_atoms, match):
    with pytest.raises(ValueError, match=match):
        global_atom_ids(frame_ids, n_atoms)


def test_frame_ids_of_reads_and_validates_info():
    from ase import Atoms

    frames = [Atoms("H", info={"frame_id": 5}), Atoms("H", info={"frame_id": 2.0})]
    assert frame_ids_of(frames).tolist() == [5, 2]
    with pytest.raises(ValueError, match="frame 1 has no info\\['frame_id'\\]"):
        frame_ids_of([frames[0], Atoms("H")])
    with pytest.raises(ValueError, match="expected an integer id"):
        frame_ids_of([Atoms("H", info={"frame_id": 1.5})])
    with pytest.raises(ValueError, match=r"repeat .*\[5\]"):
        frame_ids_of([frames[0], Atoms("H", info={"frame_id": 5})])


def test_nequip_backend_claims_its_files_without_importing_torch():
    code = ("import sys; from ltau_ase.simulate.backends import backend_for; "
            "b = [backend_for(p).name for p in ('r/last.ckpt', 'm.nequip.zip', 'm.nequip.pt2')]; "
            "print(b, 'torch' in sys.modules, 'nequip' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['nequip', 'nequip', 'nequip'] False False"


def test_nequip_backend_builds_the_batch_factories():
    from ltau_ase.nequip.backend import NequIPCommitteeFactory, NequIPLTAUFactory
    from ltau_ase.simulate.backends import backend_for

    backend = backend_for("run/last.ckpt")
    f = backend.ltau_factory("run/last.ckpt", "model.ltau", device="cpu", threshold=0.2)
    assert f == NequIPLTAUFactory("run/last.ckpt", "model.ltau", threshold=0.2) and hash(f) == hash(
        NequIPLTAUFactory("run/last.ckpt", "model.ltau", threshold=0.2))
    assert backend.committee_factory(["a.ckpt", "b.ckpt"]) == NequIPCommitteeFactory(("a.ckpt", "b.ckpt"))
