"""The house's rules, checked from the source: imports flow one way (no cycle, lazy imports included) and
the algorithm core is pure (no I/O libraries, no transformers / peft / flwr, nothing of the package above it)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "hetlora"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """Every package module ``name`` imports, at the top or inside a function (TYPE_CHECKING too)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for candidate in [target] + [f"{target}.{a.name}" for a in node.names]:
                if candidate in MODULES and candidate != name:
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in MODULES and a.name != name}
    return found


def external(name: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
    return found


def cycle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    stack, path = [(start, iter(sorted(graph[start])))], [start]
    while stack:
        node, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            path.pop()
        elif child == start:
            return path + [start]
        elif child not in path and child.startswith(start.split(".")[0]):
            stack.append((child, iter(sorted(graph[child]))))
            path.append(child)
    return None


def test_no_module_imports_itself_back_through_others():
    graph = {name: imports(name) for name in MODULES}
    cycles = [c for c in (cycle_from(name, graph) for name in sorted(graph)) if c]
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_the_core_is_pure():
    core = [name for name in MODULES if name.startswith("hetlora.core")]
    assert core
    for name in core:
        assert not {m for m in imports(name) if not m.startswith("hetlora.core")}, f"{name} imports above the core"
        assert not external(name) & {"transformers", "peft", "flwr", "safetensors", "json", "pathlib", "os"}, name


def test_a_cycle_is_found_when_there_is_one():
    assert cycle_from("a.x", {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}}) == ["a.x", "a.y", "a.z", "a.x"]
    assert cycle_from("a.x", {"a.x": {"a.y"}, "a.y": set()}) is None


#: the packages from the bottom up (docs/algorithm.md §8): a module imports its own package or one below it,
#: never one above and never a sibling on its own level.
LAYERS = [
    ("core",),  # pure tensor algorithm
    ("methods",),  # one aggregation rule per module
    ("files", "provenance"),  # crash-safe files; commit, device and library versions
    ("config",),  # the run's settings, checked
    ("data",),  # datasets and their federated partitions
    ("models",),  # base models and the GGUF cache
    ("device",),  # what runs on a device: host, LoRA bank, training, evaluation, memory, footprint
    ("clients",),  # one class per client kind
    ("server",),  # federation, runner, round report, checkpoints, outputs, privacy
    ("export", "study"),  # what a run hands to devices; the pre-registered study
    ("flower",),  # the Flower apps, their credentials and secure rounds
    ("engines",),  # which engine runs a run
    ("cli",),  # the command line
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}


def package_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def test_every_package_has_its_place():
    """A new package (or top-level module) is placed in LAYERS on purpose, not by accident."""
    placed = {package_of(m) for m in MODULES} - {"__init__"}
    assert placed <= LEVEL.keys(), f"place these in LAYERS: {sorted(placed - LEVEL.keys())}"


def test_imports_flow_down_the_packages():
    upward = []
    for name in MODULES:
        package = package_of(name)
        if package == "__init__":
            continue  # the public face (hetlora/__init__.py) may import anything it re-exports
        for target in imports(name):
            other = package_of(target)
            if other != package and (other == "__init__" or LEVEL[other] >= LEVEL[package]):
                upward.append(f"{name} → {target}")
    assert not upward, "imports against the package order: " + "; ".join(sorted(upward))


def test_the_top_level_holds_packages_and_a_few_modules():
    """26 modules side by side was a flat house; what stays at the top is the public face and a few small rooms."""
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert top == ["cli", "config", "engines", "files", "provenance"], top
