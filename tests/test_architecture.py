"""The package layout is the architecture: each package imports only the ones below it, and no module imports
round in a circle (function-level imports included)."""

import ast
from pathlib import Path

import edgeft

ROOT = Path(edgeft.__file__).parent

# package -> the packages it may import (besides itself)
BELOW = {
    "core": set(),
    "models": {"core"},
    "quant": {"core", "models"},
    "graph": {"core", "models", "quant"},
    "runtime": {"core"},
    "devices": {"core", "models", "runtime"},
    "data": {"core", "devices"},
    "trainer": {"core", "models", "quant", "graph", "runtime"},
    "tasks": {"core", "data"},
    "stages": {"core", "models", "quant", "graph", "runtime", "devices", "data", "trainer", "tasks"},
    "fleet": {"core", "models", "quant", "graph", "runtime", "devices", "data", "trainer", "tasks", "stages"},
    "pipeline": {"core", "models", "quant", "graph", "runtime", "devices", "data", "trainer", "tasks", "stages",
                 "fleet"},
    "service": {"core", "devices", "data", "stages"},  # runs the pipeline as `edgeft run`, in a child process
    "targets": {"core", "runtime", "devices", "data", "trainer", "stages"},  # a device over SSH: probe, bench, train there
}


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The edgeft modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgeft"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("edgeft"))
    return found - {"edgeft"}


def package(module: str) -> str:
    """edgeft.core.errors -> core; edgeft.cli -> cli."""
    return module.split(".")[1]


def test_every_package_imports_only_the_ones_below_it():
    known = set(modules())
    wrong = []
    for module, path in modules().items():
        if module == "edgeft" or package(module) not in BELOW:
            continue  # cli and __main__ sit on top of everything
        for target in imports(path, known):
            if package(target) != package(module) and package(target) not in BELOW[package(module)]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_round_in_a_circle():
    known = set(modules())
    graph = {m: imports(p, known) & known for m, p in modules().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(trail[trail.index(n):] + [n]) if n in trail else f"{m} -> {n}")
            elif n not in state:
                visit(n, trail + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_packages_are_the_layout():
    assert {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} == set(BELOW)
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["__init__.py", "__main__.py", "cli.py"]
