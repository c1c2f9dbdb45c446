"""The package's import graph, read from the source (``ast``, nothing is imported), and its layer picture.

``docs/architecture.md`` embeds :func:`render_layer_graph` between the markers
``<!-- import-graph:begin -->`` and ``<!-- import-graph:end -->``; a test regenerates it, so the
picture cannot go stale. Refresh it after changing imports with::

    python -m ltau_ase.importgraph --write docs/architecture.md

Every ``import`` statement counts, also the lazy ones inside functions: a module that imports torch
only when called still depends on it.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = "ltau_ase"
ROOT = Path(__file__).resolve().parent
BEGIN, END = "<!-- import-graph:begin -->", "<!-- import-graph:end -->"

#: layer of each module: first matching prefix wins; order = bottom (imported) to top (importing)
LAYERS: tuple[tuple[str, str], ...] = (
    ("ltau_ase.core", "core"),
    ("ltau_ase.is2rs", "analysis"),
    ("ltau_ase.cartography", "analysis"),
    ("ltau_ase.plots", "analysis"),
    ("ltau_ase.shift_metrics", "analysis"),
    ("ltau_ase.simulate", "simulate"),
    ("ltau_ase.datasets", "datasets"),
    ("ltau_ase.nequip", "nequip (backend)"),
    ("ltau_ase.learn", "learn"),
    ("ltau_ase.cli", "cli"),
    ("ltau_ase.demo", "demo"),
    ("ltau_ase.importgraph", "tools"),
    ("ltau_ase", "package root"),
)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def module_imports(root: Path = ROOT) -> dict[str, set[str]]:
    """``module -> {imported module}`` for every module of the package (all import statements)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, path.name == "__init__.py", node)
                found.add(target)
                # "from ltau_ase.core import estimator" imports the submodule
                found.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
        graph[module] = found
    known = set(graph)
    # keep package modules that exist, and third-party top-level names
    return {m: {i for i in imps if i in known or not i.startswith(PACKAGE + ".") and i != PACKAGE} for m, imps in
            graph.items()}


def layer_of(module: str) -> str | None:
    """The layer of a package module (None for a module outside the package)."""
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def backend_packages() -> list[str]:
    """The packages of the built-in model backends (``ltau_ase.BUILTIN_BACKENDS``), read from the source."""
    tree = ast.parse((ROOT / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "BUILTIN_BACKENDS" for t in node.targets):
            specs = ast.literal_eval(node.value)
            return sorted({spec.partition(":")[0].rsplit(".", 1)[0] for spec in specs.values()})
    raise ValueError("ltau_ase/__init__.py defines no BUILTIN_BACKENDS")


def imports_of(modules_under: str, targets: tuple[str, ...], graph: dict[str, set[str]] | None = None
               ) -> dict[str, list[str]]:
    """``module -> sorted imports`` of the modules under ``modules_under`` that import any of ``targets``."""
    graph = module_imports() if graph is None else graph
    hits = {}
    for module, imported in graph.items():
        if module == modules_under or module.startswith(modules_under + "."):
            bad = sorted(i for i in imported if any(i == t or i.startswith(t + ".") for t in targets))
            if bad:
                hits[module] = bad
    return hits


def layer_edges(graph: dict[str, set[str]] | None = None) -> dict[tuple[str, str], int]:
    """``(importing layer, imported layer) -> number of module-to-module imports`` inside the package."""
    graph = module_imports() if graph is None else graph
    edges: dict[tuple[str, str], int] = defaultdict(int)
    for module, imported in graph.items():
        src = layer_of(module)
        for target in imported:
            dst = layer_of(target)
            if dst is not None and dst != src and target in graph:
                edges[(src, dst)] += 1
    return dict(edges)


def third_party(graph: dict[str, set[str]] | None = None, heavy: tuple[str, ...] = ("torch", "nequip", "lightning",
                "faiss", "ase", "dask", "distributed", "matplotlib")) -> dict[str, list[str]]:
    """``layer -> sorted heavy third-party packages`` its modules import (lazily or not)."""
    graph = module_imports() if graph is None else graph
    out: dict[str, set[str]] = defaultdict(set)
    for module, imported in graph.items():
        for target in imported:
            top = target.split(".")[0]
            if top in heavy:
                out[layer_of(module)].add(top)
    return {k: sorted(v) for k, v in out.items()}


def _node(layer: str) -> str:
    return re.sub(r"\W+", "_", layer).strip("_")


def render_layer_graph(graph: dict[str, set[str]] | None = None) -> str:
    """Markdown: a Mermaid flowchart of the layers (arrow = "imports"), generated from the code."""
    graph = module_imports() if graph is None else graph
    edges = layer_edges(graph)
    deps = third_party(graph)
    layers = [layer for layer in dict.fromkeys(layer for _, layer in LAYERS) if layer != "tools"]
    lines = ["```mermaid", "flowchart BT"]
    for layer in layers:
        extra = ", ".join(deps.get(layer, []))
        label = f"{layer}<br/><small>{extra}</small>" if extra else layer
        lines.append(f'    {_node(layer)}["{label}"]')
    for (src, dst), _ in sorted(edges.items(), key=lambda e: (layers.index(e[0][0]) if e[0][0] in layers else 99,
                                                              e[0][1])):
        if "tools" in (src, dst):
            continue
        lines.append(f"    {_node(src)} --> {_node(dst)}")
    lines.append("```")
    lines.append("")
    lines.append("*Generated by `python -m ltau_ase.importgraph --write docs/architecture.md` from every import "
                 "statement (lazy ones included); an arrow means \"imports\"; under each layer the heavy third-party packages it imports. `tests/test_architecture.py` "
                 "fails when this picture differs from the code.*")
    return "\n".join(lines)


def embedded(doc: str) -> str:
    """The generated block of a document (between the markers)."""
    if BEGIN not in doc or END not in doc:
        raise ValueError(f"the document has no {BEGIN} ... {END} block")
    return doc.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def write_into(path: Path) -> bool:
    """Replace the generated block of ``path``; True when it changed."""
    doc = path.read_text(encoding="utf-8")
    old = embedded(doc)
    new = render_layer_graph()
    if old == new:
        return False
    head, rest = doc.split(BEGIN, 1)
    path.write_text(head + BEGIN + "\n" + new + "\n" + END + rest.split(END, 1)[1], encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltau_ase.importgraph", description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="update the generated block of this Markdown file")
    args = parser.parse_args(argv)
    if args.write is None:
        print(render_layer_graph())
        return 0
    changed = write_into(args.write)
    print(f"{args.write}: {'updated' if changed else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
