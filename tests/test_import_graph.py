"""The dependency rules of docs/design.md, read from the source (ast; nothing is imported).

- no import cycle among project modules, counting imports inside functions too;
- saekit is the ground floor: it imports neither segcompass nor analyses;
- analyses is imported only from segcompass.experiments and segcompass.commands;
- segcompass.modeling holds nn.Modules that depend on saekit and each other only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("saekit", "segcompass", "analyses")
ANALYSES_ALLOWED = ("segcompass.experiments", "segcompass.commands", "analyses")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imported_names(path: Path, name: str) -> set[str]:
    """Every dotted name an import statement of `path` names (module and module.attr)."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package's own __init__ counts as a module)."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_names(path, name):
            if imported in modules:
                targets.add(imported)
            elif imported.rsplit(".", 1)[0] in modules:  # `from pkg.mod import attr`
                targets.add(imported.rsplit(".", 1)[0])
        targets.discard(name)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None (iterative DFS, three colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    for root in sorted(graph):
        if colour[root]:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour[child] == 1:
                return path[path.index(child):] + [child]
            elif colour[child] == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_cycle_finder_finds_a_constructed_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_relative_imports_resolve(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("from . import x\nfrom ..y import z\n")
    assert {"pkg.sub", "pkg.sub.x", "pkg.y", "pkg.y.z"} <= imported_names(path, "pkg.sub.mod")


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_saekit_is_the_ground_floor():
    bad = {m: sorted(t for t in deps if t.split(".")[0] in ("segcompass", "analyses"))
           for m, deps in import_graph().items() if m.split(".")[0] == "saekit"}
    assert not {m: d for m, d in bad.items() if d}


@pytest.mark.parametrize("rule", ["analyses", "modeling"])
def test_layering(rule):
    graph = import_graph()
    if rule == "analyses":
        bad = {m: sorted(d for d in deps if d.split(".")[0] == "analyses")
               for m, deps in graph.items() if not m.startswith(ANALYSES_ALLOWED)}
    else:
        bad = {m: sorted(d for d in deps if d.startswith("segcompass") and not d.startswith("segcompass.modeling"))
               for m, deps in graph.items() if m.startswith("segcompass.modeling")}
    assert not {m: d for m, d in bad.items() if d}


# import name -> distribution name, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "huggingface_hub": "transformers", "sae_lens": "sae-lens",
                 "transformer_lens": "transformer-lens", "sklearn": "scikit-learn"}


def third_party_imports(package: str) -> set[str]:
    import sys

    tops = set()
    for name, path in project_modules().items():
        if name.split(".")[0] == package:
            tops |= {n.split(".")[0] for n in imported_names(path, name)}
    return {t for t in tops if t and t not in sys.stdlib_module_names and t not in PACKAGES}


def test_saekit_declares_what_it_imports_and_nothing_of_segmentation():
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in project["dependencies"]}
    used = {DISTRIBUTIONS.get(t, t).lower() for t in third_party_imports("saekit")}
    assert used <= declared, f"saekit imports undeclared packages: {sorted(used - declared)}"
    segmentation = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in project["optional-dependencies"]["segcompass"]}
    assert not declared & segmentation
    # the transformers extra (huggingface_hub) comes with transformers; anything else declared is used
    assert declared - used <= {"transformers"}, f"declared but unused: {sorted(declared - used)}"
