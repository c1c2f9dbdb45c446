"""The layering holds in the code, and docs/architecture.md's layer picture is the one the code gives."""
from __future__ import annotations

from pathlib import Path

from ltau_ase.importgraph import (
    backend_packages,
    embedded,
    imports_of,
    layer_edges,
    layer_of,
    module_imports,
    render_layer_graph,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
GRAPH = module_imports()


def test_core_and_simulate_import_no_backend():
    backends = tuple(backend_packages())
    assert backends == ("ltau_ase.nequip",)
    forbidden = backends + ("torch", "nequip", "lightning")
    assert imports_of("ltau_ase.core", forbidden, GRAPH) == {}
    assert imports_of("ltau_ase.simulate", forbidden, GRAPH) == {}


def test_layers_import_only_layers_below():
    edges = layer_edges(GRAPH)
    assert {dst for src, dst in edges if src == "core"} == set()
    assert {dst for src, dst in edges if src == "simulate"} <= {"core", "package root"}
    assert {dst for src, dst in edges if src == "analysis"} <= {"core"}
    # nothing model-agnostic imports the backend or the workflows / front ends above it
    for src, dst in edges:
        if dst in ("nequip (backend)", "learn", "cli", "demo"):
            assert src in ("learn", "cli", "demo"), (src, dst)


def test_import_graph_reads_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "ltau_ase"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    import torch\n    from . import b\n")
    (pkg / "core" / "b.py").write_text("from ltau_ase.core.a import f\nimport numpy as np\n")
    graph = module_imports(pkg)
    assert graph["ltau_ase.core.a"] == {"torch", "ltau_ase.core", "ltau_ase.core.b"}
    assert graph["ltau_ase.core.b"] == {"ltau_ase.core.a", "numpy"}
    assert imports_of("ltau_ase.core", ("torch",), graph) == {"ltau_ase.core.a": ["torch"]}
    assert layer_of("ltau_ase.nequip.fit") == "nequip (backend)" and layer_of("numpy") is None


def test_architecture_doc_shows_the_current_graph():
    assert embedded(DOC.read_text(encoding="utf-8")) == render_layer_graph(GRAPH), (
        "docs/architecture.md is stale: run python -m ltau_ase.importgraph --write docs/architecture.md")
