"""The house rules of ARCHITECTURE.md, checked on the source itself (every import statement, including the ones inside
functions): imports run down the floors and never in a circle, no module takes a private name from another package,
and no file in ppml/, kernels/ or benchmarks/ grows past 800 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# ARCHITECTURE.md's floor order, lowest first. A module may import from its own floor or any floor below, never above.
# Keys are the first name under ppml (a top-level module or a subpackage); "kernels" is ppml.kernels (kernels/).
FLOORS: list[set[str]] = [
    # leaves: neutral helpers, the key and anchor maths, the oracle, the Triton kernels, the build facts
    {"_checks", "_constants", "_layout", "_paths", "_progress", "_device", "_extension", "_toolchain", "_import_hooks",
     "anchors", "keys", "reference", "kernels"},
    # the ops and the one dispatch point; "__init__" is the public API `from ppml import x`, which re-exports the ops
    # (its own imports of every floor are not checked: the root package is the door, not a floor)
    {"ops", "_dispatch", "__init__"},
    {"models", "augment", "_timm"},
    {"data", "train", "show"},
    {"attacks", "detection"},
    # the commands, and the build's self-test of the whole installed package
    {"cli", "__main__", "_selftest"},
]
FLOOR_OF = {name: i for i, names in enumerate(FLOORS) for name in names}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    if parts[0] == "kernels":
        parts = ["ppml", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in sorted((ROOT / "ppml").rglob("*.py")):
        if "kernels" in f.relative_to(ROOT / "ppml").parts[:1]:
            continue  # ppml/kernels is a link to kernels/ in development checkouts
        mods[_module_name(f)] = f
    for f in sorted((ROOT / "kernels").rglob("*.py")):
        mods[_module_name(f)] = f
    return mods


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom | ast.Import) -> list[tuple[str, list[str]]]:
    """(absolute module imported, names taken from it) for one import statement; only imports of ppml itself."""
    if isinstance(node, ast.Import):
        return [(a.name, []) for a in node.names if a.name == "ppml" or a.name.startswith("ppml.")]
    if node.level == 0:
        if node.module is None or not (node.module == "ppml" or node.module.startswith("ppml.")):
            return []
        base = node.module
    else:
        package = module if _is_package(path) else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    out = []
    plain = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in MODULES:  # `from . import augment` imports a module, not a name
            out.append((sub, []))
        else:
            plain.append(alias.name)
    if plain:
        out.append((base, plain))
    return out


def _imports() -> list[tuple[str, str, list[str], int]]:
    edges = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, names in _resolve(module, path, node):
                    edges.append((module, target, names, node.lineno))
    return edges


EDGES = _imports()


def _room(module: str) -> str:
    """ppml.train.trainer -> train; ppml -> __init__; ppml.kernels.x -> kernels."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_floor():
    missing = sorted({_room(m) for m in MODULES} - set(FLOOR_OF))
    assert not missing, f"modules with no floor in ARCHITECTURE.md (add them to FLOORS and the doc): {missing}"


def test_imports_run_down_the_floors():
    upward = []
    for src, dst, _, line in EDGES:
        a, b = _room(src), _room(dst)
        if a == "__init__":
            continue
        if a != b and FLOOR_OF.get(b, -1) > FLOOR_OF.get(a, 99):
            upward.append(f"{src}:{line} imports {dst} ({b} is above {a})")
    assert not upward, "\n".join(upward)


def test_no_import_circle_between_rooms():
    graph: dict[str, set[str]] = {}
    for src, dst, _, _ in EDGES:
        a, b = _room(src), _room(dst)
        if a != b and "__init__" not in (a, b):  # the public API re-exports lower rooms by design
            graph.setdefault(a, set()).add(b)
    # Depth-first search for a back edge.
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif state.get(nxt) is None:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import circles: {cycles}"


def test_no_private_name_taken_from_another_module():
    taken = []
    for src, dst, names, line in EDGES:
        if src == dst or src == "ppml":
            continue
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        # A private *module* (ppml._checks, ppml.ops._common) may be imported by name and its public names used;
        # taking a private *name* out of another module is what the rule forbids: it is that module's business.
        if private:
            taken.append(f"{src}:{line} takes {private} from {dst}")
    assert not taken, "\n".join(taken)


def test_kernels_take_nothing_from_the_layers_above():
    """Triton kernels get their constants as arguments or from the neutral leaves, never from ppml.reference or ops."""
    allowed = {"kernels", "_checks", "_constants", "_layout"}
    wrong = [f"{src}:{line} imports {dst}" for src, dst, _, line in EDGES
             if _room(src) == "kernels" and _room(dst) not in allowed]
    assert not wrong, wrong


@pytest.mark.parametrize("folder", ["ppml", "kernels", "benchmarks"])
def test_no_file_over_800_lines(folder):
    big = []
    for f in sorted((ROOT / folder).rglob("*.py")):
        if f.is_relative_to(ROOT / "ppml" / "kernels"):
            continue
        n = len(f.read_text().splitlines())
        if n > 800:
            big.append(f"{f.relative_to(ROOT)}: {n} lines")
    assert not big, big
