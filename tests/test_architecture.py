"""The layers of hf_sparse import downwards only: a package may import the ones below it, never one
above (read from the source with ``ast``, so imports inside functions count too).

Bottom to top: data, runtime, models, structure, grids, methods, config, checkpoint, training,
compare, cli. Top-level modules (``registry``, ``_post_import``, ``hub_probe``, ``text``, ``families``) sit under
all of them. ``KNOWN_UPWARD`` lists the imports that still point up, each with its reason (none
today); the test fails on any other, and on an entry that no longer exists (so the list only
shrinks). With no upward import the packages form no cycle.
"""

from __future__ import annotations

import ast

from tests.helpers import REPO

LAYERS = [
    "data", "runtime", "models", "structure", "grids", "methods", "config", "checkpoint", "training", "compare", "cli",
]

#: (importing package, imported package) -> why it is still there
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


def imported_packages(source: str, module: list[str], package: str) -> set[str]:
    """hf_sparse packages other than ``package`` that ``source``, the module named ``module``
    (``["hf_sparse", "data", "idx"]``; a package's ``__init__`` keeps that last part), imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        names: list[list[str]] = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = module[: len(module) - node.level] if node.level else []
            target = base + (node.module.split(".") if node.module else [])
            names = [target] if node.module else [target + [a.name] for a in node.names]
        for parts in names:
            if len(parts) >= 2 and parts[0] == "hf_sparse" and parts[1] in LAYERS and parts[1] != package:
                found.add(parts[1])
    return found


def upward_imports() -> dict[tuple[str, str], list[str]]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    out: dict[tuple[str, str], list[str]] = {}
    for package in LAYERS:
        for path in sorted((REPO / "hf_sparse" / package).rglob("*.py")):
            module = ["hf_sparse", *path.relative_to(REPO / "hf_sparse").with_suffix("").parts]
            for other in imported_packages(path.read_text(), module, package):
                if rank[other] > rank[package]:
                    out.setdefault((package, other), []).append(str(path.relative_to(REPO)))
    return out


def test_packages_import_only_the_layers_below_them():
    found = upward_imports()
    unexpected = {k: v for k, v in found.items() if k not in KNOWN_UPWARD}
    assert not unexpected, f"upward imports: {unexpected}"
    gone = sorted(set(KNOWN_UPWARD) - set(found))
    assert not gone, f"no longer imported upwards, remove from KNOWN_UPWARD: {gone}"


def test_the_checker_sees_relative_and_function_level_imports():
    """The AST walk catches ``from .. import x``, ``from ..x.y import z``, absolute imports and
    imports inside functions, and ignores the module's own package."""
    source = ("import hf_sparse.compare.grid\nfrom . import idx\n"
              "def f():\n    from .. import training\n    from ..cli.rundir import x\n")
    assert imported_packages(source, ["hf_sparse", "data", "probe"], "data") == {"training", "cli", "compare"}
    init = "from .recipe import Recipe\nfrom ..methods import METHODS\n"
    assert imported_packages(init, ["hf_sparse", "config", "__init__"], "config") == {"methods"}
