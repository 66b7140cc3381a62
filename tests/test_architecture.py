"""The package's rooms and the order between them: no import circles, and no import from a lower room into a
higher one. Every import counts, at module level or inside a function (a lazy import hides a circle from
Python, not from a reader), except those under `if TYPE_CHECKING:` (annotations only). Run as a script to print the counts:

    python tests/test_architecture.py
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "diffusion_ao"
NAME = PACKAGE.name

# Rooms from the bottom up; a module may import its own room and any room below it. A room is a module or a
# package (every module under it). The deprecated aliases of moved modules (`gpu`, `lowering`, `cpu`) sit at the
# top: they import their new home and nothing imports them.
ROOMS = [
    ("primitives", "method_configs", "config", "quiet", "serialization.target"),  # no diffusion_ao imports
    ("denoisers", "models", "metrics"),  # the model families, the shipped models and their metrics
    ("graph", "observers"),  # graph facts and the one interpreter; the observers the quantizer inserts
    ("passes",),  # FX rewrites of exported graphs
    ("grouped_graph",),  # the time-grouped container
    ("backends", "serialization"),  # where a converted graph runs; how it is saved and weighed
    ("quantizer", "wrapper"),  # the PT2E quantizer; a quantized graph as a pipeline's denoiser
    ("calibration",),  # calibration data, its capture and store, the calibration loop
    ("export",),  # torch.export of a denoiser (from a captured step)
    ("methods",),  # the quantization methods
    ("recipe",),  # every method in order
    ("quantize_cli", "gpu", "lowering", "cpu", "__init__"),  # entry points and deprecated aliases
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts)


def room_of(module: str) -> int:
    best, rank = -1, None
    for i, room in enumerate(ROOMS):
        for prefix in room:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank is None:
        raise AssertionError(f"diffusion_ao.{module} is in no room: add it to tests/test_architecture.py ROOMS")
    return rank


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(module: str, known: dict[str, Path]) -> str:
    """The module an import of `module` loads: itself, or its package's __init__."""
    if module in known:
        return module
    if f"{module}.__init__" in known:
        return f"{module}.__init__"
    raise AssertionError(f"diffusion_ao.{module} is imported but does not exist")


def _is_module(dotted: str, known: dict[str, Path]) -> bool:
    inner = dotted[len(NAME) + 1:] if dotted.startswith(NAME + ".") else None
    return inner is not None and (inner in known or f"{inner}.__init__" in known)


def _runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:`, which name types for annotations and import nothing at run
    time (how a report names the result types of the methods that fill it)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports(known: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the diffusion_ao modules it imports (submodules named in `from pkg import sub` included)."""
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        found = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from pkg import sub` imports the submodule; `from pkg import name`, the package's __init__
                targets = [f"{node.module}.{a.name}" if _is_module(f"{node.module}.{a.name}", known) else node.module
                           for a in node.names]
            else:
                assert not (isinstance(node, ast.ImportFrom) and node.level), f"{name}: relative import"
                continue
            for target in targets:
                if target.startswith(NAME + "."):
                    found.add(resolve(target[len(NAME) + 1:], known))
        found.discard(name)
        edges[name] = found
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in edges.items() for b in targets if room_of(b) > room_of(a))


def test_every_module_is_in_a_room():
    for name in modules():
        room_of(name)


def test_no_import_circles():
    assert cycles(imports(modules())) == []


def test_no_import_from_a_lower_room_into_a_higher_one():
    assert upward(imports(modules())) == []


@pytest.mark.parametrize("old, new, name", [("gpu", "backends.cuda", "lower_to_int_mm"),
                                             ("lowering", "backends.x86", "compile_for_cpu"),
                                             ("cpu", "backends.x86_features", "cpu_has_vnni")])
def test_the_moved_modules_old_paths_still_import_with_a_deprecation_warning(old, new, name):
    code = ("import importlib, warnings\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            f"    old = importlib.import_module('diffusion_ao.{old}')\n"
            f"new = importlib.import_module('diffusion_ao.{new}')\n"
            f"assert old.{name} is new.{name}\n"
            "messages = [str(w.message) for w in caught if w.category is DeprecationWarning]\n"
            f"assert any('diffusion_ao.{old} moved to diffusion_ao.{new}' in m for m in messages), messages\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


if __name__ == "__main__":
    edges = imports(modules())
    found_cycles, found_upward = cycles(edges), upward(edges)
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports between them")
    print(f"import circles: {len(found_cycles)}")
    for c in found_cycles:
        print("  ", " <-> ".join(c))
    print(f"upward imports: {len(found_upward)}")
    for a, b in found_upward:
        print(f"   {a} -> {b}")
