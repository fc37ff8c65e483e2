"""The shape of the code: imports point one way between layers, no cycles, no private names across modules.

docs/architecture.md explains the layers; this test keeps them true. It reads the source with
`ast` (imports inside functions and under TYPE_CHECKING count too), so it needs no imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ursa"

# Lower layers first. A module may import its own package and any package of a lower rank, never
# one of a higher (or the same, other) rank.
LAYERS: dict[str, int] = {
    "errors": 0,
    "util": 1,
    "vision": 2,
    "sgd": 2,
    "acquire": 3,
    "inference": 4,
    "diagnose": 5,
    "training": 6,
    "apps": 7,
    "predict": 8,
    "cli": 9,
    "notebook": 9,
    "demo": 9,
    "__main__": 10,
    "__init__": 0,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(path: Path, name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append((a.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, [a.name for a in node.names], node.lineno))
    return out


def layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def ursa_targets(mod_names: set[str], target: str, names: list[str]) -> list[str]:
    """The ursa modules an import statement reaches (`from ursa.x import y` may name module y)."""
    if not (target == "ursa" or target.startswith("ursa.")):
        return []
    out = []
    for n in names:
        if f"{target}.{n}" in mod_names:
            out.append(f"{target}.{n}")
    if target in mod_names and (not names or len(out) < len(names)):
        out.append(target)
    return out or [target]


def test_every_package_has_a_layer():
    missing = sorted({layer(m) for m in modules()} - set(LAYERS))
    assert not missing, f"add these to LAYERS (and docs/architecture.md): {missing}"


def upward_imports(name: str, path: Path, mod_names: set[str]) -> list[str]:
    """The imports of one module that point up or sideways."""
    here, bad = layer(name), []
    for target, names, line in imports_of(path, name):
        for t in ursa_targets(mod_names, target, names):
            there = layer(t)
            if t == "ursa" or there == here:
                continue
            if LAYERS[there] >= LAYERS[here]:
                bad.append(f"{path.name}:{line} {name} ({here}) imports {t} ({there})")
    return bad


def test_imports_point_down():
    mods = modules()
    bad = [b for name, path in mods.items() for b in upward_imports(name, path, set(mods))]
    assert not bad, "imports pointing up or sideways:\n" + "\n".join(bad)


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the ursa modules it imports (a package's own __init__ left out: importing a package
    is importing its __init__ only, and __init__ files re-export)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, names, _ in imports_of(path, name):
            for t in ursa_targets(set(mods), target, names):
                if t in mods and t != name and not (mods[t].name == "__init__.py" and name.startswith(t + ".")):
                    graph[name].add(t)
    return graph


# What the walk must find, or every rule here passes on nothing (an empty, moved or unreadable tree).
MIN_MODULES = 80
KNOWN_EDGES = [("ursa.cli.train", "ursa.training.recipe"), ("ursa.training.recipe", "ursa.training.learner"),
               ("ursa.training.recipe", "ursa.vision.models"), ("ursa.inference.runtime", "ursa.inference.preprocess")]


def test_the_walk_sees_the_real_package():
    mods = modules()
    assert len(mods) >= MIN_MODULES, f"expected at least {MIN_MODULES} modules under {ROOT}, got {len(mods)}"
    assert {layer(m) for m in mods} == set(LAYERS), "every layer has modules (remove a layer from LAYERS with its package)"
    graph = import_graph(mods)
    missing = [f"{a} -> {b}" for a, b in KNOWN_EDGES if b not in graph.get(a, set())]
    assert not missing, f"expected these imports to be seen: {missing}"
    assert sum(map(len, graph.values())) >= 2 * len(mods)  # the walk reads imports, not just file names
    assert max(len(p.read_text().splitlines()) for p in mods.values()) > 200  # and reads the files whole


def test_no_import_cycles():
    mods = modules()
    graph = import_graph(mods)
    seen: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if seen.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in seen:
                visit(n)
        stack.pop()
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_names_across_modules():
    mods = modules()
    bad = []
    for name, path in mods.items():
        for target, names, line in imports_of(path, name):
            if not target.startswith("ursa"):
                continue
            for n in names:
                if n.startswith("_") and n != "__version__" and f"{target}.{n}" not in mods:
                    bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}.{n}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


# Private names of other libraries that ursa uses on purpose (torch has no public BatchNorm base class).
FOREIGN_PRIVATE = {"_BatchNorm"}


def private_attributes(path: Path) -> list[str]:
    """`x._name` where x is not self or cls: reaching into another object's or module's internals."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if node.attr in FOREIGN_PRIVATE:
                continue
            bad.append(f"{path.name}:{node.lineno} .{node.attr}")
    return bad


def test_no_private_attributes_reached_from_outside():
    bad = [b for p in modules().values() for b in private_attributes(p)]
    assert not bad, "private attributes used from outside their object:\n" + "\n".join(bad)


@pytest.mark.parametrize("limit", [420])
def test_modules_are_small(limit):
    big = {module_name(p): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > limit}
    assert not big, f"modules over {limit} lines (split them by concern): {big}"


def test_the_rules_catch_an_upward_import_and_a_private_attribute(tmp_path):
    """The checkers themselves, on a bad module (tests that can fail)."""
    f = tmp_path / "bad.py"
    f.write_text("def f(learn):\n    from ursa.training.learner import Learner\n    return learn._cache\n")
    found = upward_imports("ursa.vision.bad", f, set(modules()))
    assert found == ["bad.py:2 ursa.vision.bad (vision) imports ursa.training.learner (training)"]
    assert upward_imports("ursa.apps.bad", f, set(modules())) == []  # apps sit above training
    assert private_attributes(f) == ["bad.py:3 ._cache"]
