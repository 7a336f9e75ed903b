"""The package's house rules, read from its source: layers bottom to top, no circles.

Every import counts, including the ones inside functions and under ``TYPE_CHECKING``: a lazy
import still makes the importer depend on the imported module, it only hides the edge. A module
may import from its own layer or any layer below it; never from above. No set of modules may
import each other round in a circle, within a layer or across. The package never imports the
test helpers under ``tests/``.

``docs/architecture.md`` draws the same layers; a new top-level module or sub-package must be
placed in :data:`LAYERS` (the test fails for one that is not), which is the moment to decide
where it belongs.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "megatron_autothink"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Bottom to top. Names are the first component under the package.
LAYERS: list[tuple[str, frozenset[str]]] = [
    (
        "foundation",
        frozenset(
            {"__init__", "config", "modes", "fileio", "cpus", "compat", "parallel", "checkpoint_io"}
        ),
    ),
    ("data", frozenset({"data"})),
    ("models", frozenset({"models"})),
    ("weights", frozenset({"weights"})),
    ("train and rollout", frozenset({"train", "rollout"})),
    ("rl", frozenset({"rl"})),
    ("convert and eval", frozenset({"convert", "eval"})),
    ("pipeline and tools", frozenset({"pipeline", "demo", "report", "serve", "launch"})),
    ("cli", frozenset({"cli"})),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imported(
    module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: set[str]
) -> set[str]:
    """The package modules one import statement reaches.

    ``from a import b`` reaches module ``a.b`` when there is one, else ``a`` (``b`` is a name in
    it); a name is cut back to the longest existing module. Parent packages, which Python also
    runs, are not counted: every package ``__init__`` re-exporting its modules would otherwise be
    a circle.
    """
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join([*base, node.module] if node.module else base)
        else:
            prefix = node.module or ""
        names = [
            f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names
        ]
    reached = set()
    for name in names:
        if name.split(".")[0] != PACKAGE:
            continue
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in modules and name != module:
            reached.add(name)
    return reached


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                graph[name] |= _imported(name, path.name == "__init__.py", node, set(modules))
    return graph


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer_of(module: str) -> int:
    room = _room(module)
    for level, (_, rooms) in enumerate(LAYERS):
        if room in rooms:
            return level
    raise KeyError(room)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph.get(nxt, ()))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_room_is_placed_in_a_layer() -> None:
    unplaced = sorted({_room(m) for m in _modules()} - set().union(*(r for _, r in LAYERS)))
    assert not unplaced, f"place these in tests/test_layers.py LAYERS: {unplaced}"


def test_no_upward_imports() -> None:
    graph = import_graph()
    upward = [
        f"{src} ({LAYERS[_layer_of(src)][0]}) imports {dst} ({LAYERS[_layer_of(dst)][0]})"
        for src, targets in sorted(graph.items())
        for dst in sorted(targets)
        if _layer_of(dst) > _layer_of(src)
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_circles() -> None:
    cycles = _cycles(import_graph())
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_package_never_imports_test_helpers() -> None:
    offenders = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                targets = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                if any(t == "tests" or t.startswith(("tests.", "conftest")) for t in targets):
                    offenders.append(name)
    assert not offenders, f"package modules importing tests/: {sorted(set(offenders))}"


# The checks above must be able to fail: on a made-up graph they find what is planted.
def test_the_cycle_finder_finds_a_planted_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_lazy_and_relative_imports_count() -> None:
    graph = import_graph()
    # ``train/loop.py`` imports the loader inside a function (energon is slow to import).
    assert f"{PACKAGE}.data.loader" in graph[f"{PACKAGE}.train.loop"]
    # ``from megatron_autothink.train import resume`` reaches the module, not the package.
    assert f"{PACKAGE}.train.resume" in graph[f"{PACKAGE}.train.state"]
    assert f"{PACKAGE}.train" not in graph[f"{PACKAGE}.train.state"]
    # Relative imports resolve against the importing module's package.
    node = ast.parse("from ..data.schema import Sample").body[0]
    assert isinstance(node, ast.ImportFrom)
    reached = _imported(f"{PACKAGE}.rl.stage", False, node, set(_modules()))
    assert reached == {f"{PACKAGE}.data.schema"}
