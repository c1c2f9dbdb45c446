"""Fixtures shared across test folders."""
import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def quick_demo_dir(tmp_path_factory):
    """`python -m ltau_ase.demo --quick --epochs 3` run once, as a user runs it (≈ 1 minute).

    The end-to-end demo test and the examples' tests both read its output.
    """
    pytest.importorskip("nequip")
    out = tmp_path_factory.mktemp("quick_demo") / "demo_output"
    proc = subprocess.run([sys.executable, "-m", "ltau_ase.demo", "--quick", "--epochs", "3", "--output", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out
