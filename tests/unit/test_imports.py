"""The package's import graph: no cycles, and no import from a lower layer into a higher one.

Every `import` in posttrain/ counts, at module level or inside a function (a lazy import still ties
the two modules together). The layers follow the data flow, lowest first; packages of one layer
may import each other as long as that makes no cycle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import posttrain

LAYERS = [
    {"config"},
    {"data", "algos", "cluster"},
    {"logging", "eval"},
    {"train"},
    {"envs"},
    {"rollout"},
    {"loops"},
    {"cli", "demo", "__init__"},  # the CLI, the demo and the public API (posttrain/__init__.py)
]
LAYER_OF = {name: rank for rank, names in enumerate(LAYERS) for name in names}
PACKAGE = Path(posttrain.__file__).parent


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. "posttrain.loops.grpo"
    target: str  # the imported posttrain module
    where: str  # "posttrain/loops/grpo.py:29"
    statement: str  # the import as written

    def __str__(self) -> str:
        return f"{self.where} `{self.statement}`"


def module_name(path: Path, root: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(root: Path) -> list[Import]:
    """Every import of a module of the package at `root` by one of its modules."""
    modules = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    found = []
    for source, path in modules.items():
        text = path.read_text(encoding="utf-8")
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importing module's package, up level - 1
                    package = source.split(".")[: len(source.split(".")) - node.level + is_package]
                    base = ".".join([*package, *([base] if base else [])])
                # `from pkg import sub` imports the module pkg.sub when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            statement = _as_written(node)
            where = f"{path.relative_to(root.parent)}:{node.lineno}"
            found += [Import(source, target, where, statement) for target in dict.fromkeys(targets)
                      if target in modules and target != source]
    return found


def _as_written(node: ast.Import | ast.ImportFrom) -> str:
    """The import on one line, its names cut after three."""
    names = [a.name if a.asname is None else f"{a.name} as {a.asname}" for a in node.names]
    listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    if isinstance(node, ast.Import):
        return f"import {listed}"
    return f"from {'.' * node.level}{node.module or ''} import {listed}"


def layer(module: str) -> str:
    """The layer name of a module: its first package below the root ("__init__" for the root itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def upward_imports(imports: list[Import]) -> list[str]:
    problems = []
    for imp in imports:
        for module in (imp.source, imp.target):
            if layer(module) not in LAYER_OF:
                problems.append(f"{module} is in no layer: add {layer(module)!r} to LAYERS in {__name__}")
        low, high = layer(imp.source), layer(imp.target)
        if LAYER_OF.get(low, -1) < LAYER_OF.get(high, -1):
            problems.append(f"{imp}: {imp.source} ({low}, layer {LAYER_OF[low]}) imports {imp.target} "
                            f"({high}, layer {LAYER_OF[high]}), a higher layer")
    return list(dict.fromkeys(problems))


def import_cycles(imports: list[Import]) -> list[str]:
    """One cycle per group of modules that import each other, each edge shown with its import."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        edges.setdefault(imp.source, {}).setdefault(imp.target, imp)
    reach = {module: _reachable(module, edges) for module in edges}
    cycles, done = [], set()
    for start in sorted(edges):
        group = {m for m in reach[start] if start in reach.get(m, ())}
        if start in done or not group:
            continue
        done |= group
        path = _path_back(start, start, edges)
        chain = " -> ".join([start, *(imp.target for imp in path)])
        others = sorted(group - {imp.source for imp in path})
        also = f" (also on cycles with these: {', '.join(others)})" if others else ""
        cycles.append(f"import cycle {chain}: " + "; ".join(map(str, path)) + also)
    return cycles


def _reachable(start: str, edges: dict[str, dict[str, Import]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in edges.get(todo.pop(), {}):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def _path_back(start: str, goal: str, edges: dict[str, dict[str, Import]]) -> list[Import]:
    """The shortest chain of imports from `start` back to `goal` (breadth first); there is one."""
    frontier, seen = [(start, [])], {start}
    while frontier:
        next_frontier = []
        for module, path in frontier:
            for target, imp in sorted(edges.get(module, {}).items()):
                if target == goal:
                    return [*path, imp]
                if target not in seen:
                    seen.add(target)
                    next_frontier.append((target, [*path, imp]))
        frontier = next_frontier
    raise AssertionError(f"no path from {start} to {goal}")



def test_no_import_goes_up_a_layer():
    problems = upward_imports(package_imports(PACKAGE))
    assert not problems, "imports from a lower layer into a higher one:\n" + "\n".join(problems)


def test_no_import_cycles():
    cycles = import_cycles(package_imports(PACKAGE))
    assert not cycles, "\n".join(cycles)


def test_the_checks_see_function_level_and_relative_imports(tmp_path):
    """The checks themselves, on a made-up package with one cycle and one upward import."""
    root = tmp_path / "pkg"
    for folder in ("config", "data", "loops"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "config" / "a.py").write_text("def f():\n    from pkg.loops.run import go\n")
    (root / "data" / "x.py").write_text("from . import y\n")
    (root / "data" / "y.py").write_text("import pkg.data.x\n")
    (root / "loops" / "run.py").write_text("from pkg.config import a\n\ndef go():\n    pass\n")
    imports = package_imports(root)
    assert upward_imports(imports) == [
        "pkg/config/a.py:2 `from pkg.loops.run import go`: pkg.config.a (config, layer 0) imports "
        "pkg.loops.run (loops, layer 6), a higher layer"]
    assert import_cycles(imports) == [
        "import cycle pkg.config.a -> pkg.loops.run -> pkg.config.a: pkg/config/a.py:2 `from pkg.loops.run "
        "import go`; pkg/loops/run.py:1 `from pkg.config import a`",
        "import cycle pkg.data.x -> pkg.data.y -> pkg.data.x: pkg/data/x.py:1 `from . import y`; "
        "pkg/data/y.py:1 `import pkg.data.x`"]
