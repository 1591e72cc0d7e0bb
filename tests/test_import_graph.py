"""The package's own import graph, read statically: no cycles; the package's modules imported at module top.

An import inside a function hides a cycle (it runs after both modules finished loading), so the cycle check
reads every import, in functions too, plus `importlib.import_module("kaggle_utils....")` calls with a literal
name. In-function imports of the package's own modules are refused, except in the command-line front
(`LAZY_IMPORT_PACKAGES`: kaggle_utils.cli, kaggle_utils.__main__), whose handlers import their stage modules
when they run so that `--help` and the light commands never load torch (tests/cli/test_fast_help.py).
Heavy optional third-party libraries may be imported lazily anywhere; this test does not look at them. An
import by a computed name (`import_module(variable)`) is refused too: the graph could not contain it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "kaggle_utils"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE
# Modules (and their submodules) whose functions may import package modules: the CLI's handlers.
LAZY_IMPORT_PACKAGES: tuple[str, ...] = (f"{PACKAGE}.cli", f"{PACKAGE}.__main__")
# (importing module, imported module) -> why it must stay inside a function. Empty: nothing needs it now.
IN_FUNCTION_ALLOWED: dict[tuple[str, str], str] = {}


def lazy_imports_allowed(module: str) -> bool:
    """True for the CLI front, whose handlers import their (heavy) stage modules when they run."""
    return any(module == name or module.startswith(f"{name}.") for name in LAZY_IMPORT_PACKAGES)


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    in_function: bool


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    return {module_name(path, package_dir): path for path in sorted(package_dir.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module `name` is, or lives in (an attribute imported from a module resolves to it)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_edges(modules: dict[str, Path]) -> list[Edge]:
    """Every import of a package module by a package module (TYPE_CHECKING blocks left out: never run)."""
    edges: list[Edge] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"

        def visit(
            node: ast.AST, in_function: bool, module: str = module, is_package: bool = is_package
        ) -> None:
            if isinstance(node, ast.If) and _is_type_checking(node):
                for child in node.orelse:
                    visit(child, in_function)
                return
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                in_function = True
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, module, is_package)
                # `from pkg import submodule` imports the submodule; `from mod import name` imports mod.
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            elif isinstance(node, ast.Call) and _is_import_module_call(node):
                targets = [node.args[0].value]
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved is None or resolved == module:
                    continue
                edge = Edge(module, resolved, node.lineno, in_function)
                if edge not in edges:
                    edges.append(edge)
            for child in ast.iter_child_nodes(node):
                visit(child, in_function)

        visit(tree, False)
    return edges


def _is_import_module_call(node: ast.Call) -> bool:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return (
        name in ("import_module", "__import__")
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
        and node.args[0].value.startswith(PACKAGE)
    )


def find_cycles(edges: list[Edge]) -> list[list[str]]:
    """One cycle (a closed path of module names) per strongly connected component of several modules."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(node: str) -> None:  # Tarjan; the package is small, recursion depth is no concern
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                strongconnect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return [_cycle_path(component, graph) for component in components]


def _cycle_path(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest closed path from the component's first module back to it (breadth-first inside it)."""
    members = set(component)
    start = component[0]
    parents: dict[str, str | None] = {start: None}
    queue = [start]
    for node in queue:
        for succ in sorted(graph[node] & members):
            if succ == start:
                path = [node]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])  # type: ignore[arg-type]
                return [*reversed(path), start]
            if succ not in parents:
                parents[succ] = node
                queue.append(succ)
    return [*component, start]


def _describe(cycle: list[str], edges: list[Edge]) -> str:
    ordered = sorted(edges, key=lambda e: (e.in_function, e.line), reverse=True)
    lines = {(e.source, e.target): e for e in ordered}  # the first top-level import of each pair wins
    hops = []
    for source, target in zip(cycle, cycle[1:], strict=False):
        edge = lines[(source, target)]
        hops.append(f"{source} -> {target} (line {edge.line}{', in a function' if edge.in_function else ''})")
    return " ; ".join(hops)


def test_no_import_cycles() -> None:
    edges = import_edges(package_modules())
    cycles = find_cycles(edges)
    described = "\n".join(_describe(cycle, edges) for cycle in cycles)
    assert not cycles, f"import cycles among kaggle_utils modules:\n{described}"


def test_package_imports_at_module_top() -> None:
    edges = import_edges(package_modules())
    hidden = [
        e
        for e in edges
        if e.in_function
        and not lazy_imports_allowed(e.source)
        and (e.source, e.target) not in IN_FUNCTION_ALLOWED
    ]
    listed = "\n".join(f"{e.source}:{e.line} imports {e.target}" for e in hidden)
    assert not hidden, f"{len(hidden)} in-function imports of kaggle_utils modules (move them up):\n{listed}"


def dynamic_imports(modules: dict[str, Path]) -> list[str]:
    """`importlib.import_module(...)` / `__import__(...)` calls whose module name is no literal: the checker
    cannot see what they import, so a cycle through one would go unnoticed."""
    found = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            literal = (
                bool(node.args)
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            )
            if name in ("import_module", "__import__") and not literal:
                found.append(f"{module}:{node.lineno}")
    return found


def test_no_dynamic_imports() -> None:
    found = dynamic_imports(package_modules())
    assert not found, f"imports by a computed name (import the modules by name at the top instead): {found}"


def test_cli_handlers_import_lazily_and_the_cycle_check_still_reads_them() -> None:
    """The CLI's in-function imports are allowed, and they are edges of the graph the cycle check reads."""
    assert lazy_imports_allowed("kaggle_utils.cli.data") and lazy_imports_allowed("kaggle_utils.__main__")
    assert not lazy_imports_allowed("kaggle_utils.client") and not lazy_imports_allowed(
        "kaggle_utils.demo.run"
    )
    edges = import_edges(package_modules())
    lazy = [e for e in edges if e.in_function and lazy_imports_allowed(e.source)]
    assert any(e.source == "kaggle_utils.cli.data" and e.target == "kaggle_utils.demo.run" for e in lazy)


def test_allow_list_is_current() -> None:
    """An allow-list entry whose import is gone must go too, or it would silently allow a future one."""
    edges = {(e.source, e.target) for e in import_edges(package_modules()) if e.in_function}
    stale = sorted(set(IN_FUNCTION_ALLOWED) - edges)
    assert not stale, f"IN_FUNCTION_ALLOWED entries with no such in-function import: {stale}"


def test_checker_finds_a_cycle_and_a_hidden_import(tmp_path: Path) -> None:
    """The checker: a cycle closed by an in-function relative import; one by importlib; a computed name."""
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from kaggle_utils.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import a\n    return a\n")
    (package / "c.py").write_text("import importlib\nimportlib.import_module('kaggle_utils.d')\n")
    (package / "d.py").write_text("from kaggle_utils.c import x\n")
    (package / "e.py").write_text(
        "import importlib\nNAME = 'kaggle_utils.a'\nimportlib.import_module(NAME)\n"
    )
    modules = package_modules(package)
    edges = import_edges(modules)
    assert {(e.source, e.target, e.in_function) for e in edges} == {
        ("kaggle_utils.a", "kaggle_utils.sub.b", False),
        ("kaggle_utils.sub.b", "kaggle_utils.a", True),
        ("kaggle_utils.c", "kaggle_utils.d", False),
        ("kaggle_utils.d", "kaggle_utils.c", False),
    }
    cycles = find_cycles(edges)
    assert ["kaggle_utils.c", "kaggle_utils.d", "kaggle_utils.c"] in cycles
    assert ["kaggle_utils.a", "kaggle_utils.sub.b", "kaggle_utils.a"] in cycles
    assert [e for e in edges if e.in_function] == [Edge("kaggle_utils.sub.b", "kaggle_utils.a", 2, True)]
    assert dynamic_imports(modules) == ["kaggle_utils.e:3"]
