"""The layers of analyzer/ hold: the import graph read with `ast` (issue #19).

Every ``.py`` file of ``analyzer/`` (and ``function_app.py``) is parsed; every import counts,
whether at module level, inside a function or under ``if TYPE_CHECKING:``, and relative imports
are resolved. The checks:

- a stage imports only the stages ``MAY_IMPORT`` gives it (the table mirrors the "May import"
  sentence of each ``analyzer/<stage>/__init__.py``, and a test keeps the two in step);
- no import cycle between modules;
- no module takes another module's private name (``from x import _y``, ``module._y``,
  ``getattr(module, "_y")``);
- no module is longer than 600 lines without a reason at its top.

A failure names the file, the line and the import statement.
"""

from __future__ import annotations

import ast
import functools
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "analyzer"

# The stages of analyzer/, bottom to top, and what each may import besides itself. present sits
# beside judge: it renders results and needs only the value objects, and judge never renders.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "base": frozenset(),
    "capture": frozenset({"base"}),
    "judge": frozenset({"base", "capture"}),
    "present": frozenset({"base"}),
    "store": frozenset({"base"}),
    "pipeline": frozenset({"base", "capture", "judge", "present", "store"}),
    "web": frozenset({"base", "capture", "judge", "present", "store", "pipeline"}),
    "cli": frozenset({"base", "capture", "judge", "present", "store", "pipeline", "web"}),
}

# analyzer/__init__.py holds only __version__: every stage may import it; it imports nothing.
PACKAGE_ROOT = "analyzer"
# function_app.py wires the Functions host to the stages: it may import any of them.
FUNCTION_APP = "function_app"
# Outside the shipped package: nothing in analyzer/ (nor function_app.py) may import these.
NOT_SHIPPED = frozenset({"tests", "tools", "bench", "scripts", "nwcap_testing"})

MAX_LINES = 600
LONG_REASON = "Longer than 600 lines because"


@dataclass(frozen=True)
class Import:
    """One module imported by one statement (``from m import a, b`` may give several)."""

    source: str  # the importing module, e.g. analyzer.cli.main
    line: int
    statement: str  # the import statement as written (normalised by ast.unparse)
    target: str  # the imported module, absolute, e.g. analyzer.cli.report_commands

    def where(self, modules: dict[str, Path]) -> str:
        return f"{relative(modules[self.source])}:{self.line}: `{self.statement}`"


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@functools.cache
def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for function_app.py and every .py under analyzer/."""
    modules = {FUNCTION_APP: ROOT / "function_app.py"}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


@functools.cache
def parsed(module: str) -> ast.Module:
    path = project_modules()[module]
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def in_project(name: str) -> bool:
    return name in (PACKAGE_ROOT, FUNCTION_APP) or name.startswith(PACKAGE_ROOT + ".")


def stage_of(module: str) -> str:
    """base, capture, ..., or PACKAGE_ROOT / FUNCTION_APP; a flat module answers its own name."""
    if module in (FUNCTION_APP, PACKAGE_ROOT):
        return module
    return module.split(".")[1]


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def from_base(module: str, node: ast.ImportFrom) -> str:
    """The absolute module of ``from <node.module> import ...``, relative imports resolved."""
    if node.level == 0:
        return node.module or ""
    is_package = project_modules()[module].name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    parts = package.split(".")
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, node.module] if node.module else parts)


def imports_of(module: str) -> Iterator[Import]:
    """Every module ``module`` imports, wherever the import statement stands."""
    modules = project_modules()
    for node in ast.walk(parsed(module)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, node.lineno, ast.unparse(node), alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = from_base(module, node)
            by_target: dict[str, list[ast.alias]] = {}
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                by_target.setdefault(submodule if submodule in modules else base, []).append(alias)
            for target, aliases in by_target.items():
                yield Import(module, node.lineno, from_statement(node, aliases), target)
        elif (
            isinstance(node, ast.Call)
            and dotted(node.func) in ("importlib.import_module", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield Import(module, node.lineno, ast.unparse(node), node.args[0].value)


def from_statement(node: ast.ImportFrom, aliases: list[ast.alias]) -> str:
    """``from m import a, b`` cut down to the names that matter to one message."""
    return ast.unparse(ast.ImportFrom(module=node.module, names=aliases, level=node.level))


def dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of attributes on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


@functools.cache
def all_imports() -> tuple[Import, ...]:
    found = (imp for module in project_modules() for imp in imports_of(module))
    return tuple(sorted(found, key=lambda imp: (imp.source, imp.line, imp.target)))


def test_the_table_covers_every_subpackage() -> None:
    modules = project_modules()
    assert "analyzer.capture.reader" in modules, "the walk over analyzer/ found nothing"
    assert any(in_project(imp.target) for imp in all_imports()), "no import read at all"
    subpackages = {
        path.parent.name for path in PACKAGE.glob("*/__init__.py") if path.parent != PACKAGE
    }
    assert subpackages == set(MAY_IMPORT), (
        "each subpackage of analyzer/ needs a row in MAY_IMPORT (and no row without one): "
        f"subpackages {sorted(subpackages)}, rows {sorted(MAY_IMPORT)}"
    )
    flat = [
        relative(path)
        for module, path in modules.items()
        if stage_of(module) not in (*MAY_IMPORT, PACKAGE_ROOT, FUNCTION_APP)
    ]
    assert not flat, f"modules outside every stage (move them into a subpackage): {flat}"


def may_import_sentence(stage: str) -> set[str]:
    """The stages named by the "May import ..." sentence of analyzer/<stage>/__init__.py."""
    docstring = ast.get_docstring(parsed(f"{PACKAGE_ROOT}.{stage}")) or ""
    text = " ".join(docstring.split())
    match = re.search(r"May import (.*?)(?:;|\.(?:\s|$))", text)
    if match is None:
        return set()
    if match.group(1).startswith("all of analyzer"):
        return set(MAY_IMPORT) - {stage}
    return set(re.findall(r"\b(" + "|".join(MAY_IMPORT) + r")\b", match.group(1)))


def test_the_table_matches_the_subpackage_docstrings() -> None:
    problems = []
    for stage, allowed in MAY_IMPORT.items():
        docstring = ast.get_docstring(parsed(f"{PACKAGE_ROOT}.{stage}")) or ""
        if not docstring:
            problems.append(f"analyzer/{stage}/__init__.py has no docstring")
        elif may_import_sentence(stage) != set(allowed):
            problems.append(
                f"analyzer/{stage}/__init__.py says it may import "
                f"{sorted(may_import_sentence(stage))}; MAY_IMPORT says {sorted(allowed)}"
            )
    assert not problems, "\n".join(problems)


def test_no_module_imports_a_higher_stage() -> None:
    modules = project_modules()
    problems = []
    for imp in all_imports():
        source_stage = stage_of(imp.source)
        top = imp.target.split(".")[0]
        if top in NOT_SHIPPED or (imp.target == FUNCTION_APP and imp.source != FUNCTION_APP):
            problems.append(f"{imp.where(modules)} imports {top}, which is not in the package")
            continue
        if not in_project(imp.target):
            continue
        if imp.target not in modules:
            problems.append(f"{imp.where(modules)} imports {imp.target}, which does not exist")
            continue
        target_stage = stage_of(imp.target)
        if source_stage == FUNCTION_APP or source_stage not in (*MAY_IMPORT, PACKAGE_ROOT):
            continue  # function_app may import anything; unplaced modules fail the table test
        if source_stage == PACKAGE_ROOT:
            problems.append(f"{imp.where(modules)}: analyzer/__init__.py imports nothing")
        elif target_stage not in (source_stage, PACKAGE_ROOT, *MAY_IMPORT[source_stage]):
            allowed = ", ".join(sorted(MAY_IMPORT[source_stage])) or "nothing"
            problems.append(
                f"{imp.where(modules)}: {source_stage} imports {target_stage} "
                f"({imp.target}); {source_stage} may import {allowed}"
            )
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the strongly connected components of ``graph``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside one component."""
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for successor in sorted(graph[node] & within):
            if successor == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if successor not in previous:
                previous[successor] = node
                queue.append(successor)
    raise AssertionError(f"{start} is on no cycle")  # pragma: no cover - components have one


def test_no_import_cycles() -> None:
    modules = project_modules()
    graph: dict[str, set[str]] = {module: set() for module in modules}
    edges: dict[tuple[str, str], list[Import]] = {}
    for imp in all_imports():
        if imp.target in modules and imp.target != imp.source:
            graph[imp.source].add(imp.target)
            edges.setdefault((imp.source, imp.target), []).append(imp)
    problems = []
    for component in strongly_connected(graph):
        if len(component) < 2:
            continue
        members = set(component)
        cycle = shortest_cycle(graph, component[0], members)
        on_cycle = set(pairwise(cycle))
        lines = [f"import cycle: {' -> '.join(cycle)}"]
        for step in pairwise(cycle):
            lines.extend(f"  {imp.where(modules)} -> {step[1]}" for imp in edges[step])
        others = [
            f"  {imp.where(modules)} -> {target}"
            for (source, target), found in sorted(edges.items())
            if source in members and target in members and (source, target) not in on_cycle
            for imp in found
        ]
        if others:
            lines.append(f"other imports among {', '.join(component)}:")
            lines.extend(others)
        problems.append("\n".join(lines))
    assert not problems, "\n".join(problems)


def module_bindings(module: str) -> dict[str, str]:
    """Local names bound to project modules by the imports of ``module`` (scopes ignored)."""
    modules = project_modules()
    bound: dict[str, str] = {}
    for node in ast.walk(parsed(module)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:  # `import a.b.c` binds `a`; `a.b.c._x` is resolved through it
                    top = alias.name.split(".")[0]
                    bound[top] = top
        elif isinstance(node, ast.ImportFrom):
            base = from_base(module, node)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
    return {name: target for name, target in bound.items() if in_project(target)}


def private_uses(module: str) -> Iterator[tuple[int, str, str]]:
    """(line, code, owner) for each use of a private name of another module ``owner``."""
    modules = project_modules()
    bound = module_bindings(module)

    def owner(expression: ast.expr) -> str | None:
        name = dotted(expression)
        if name is None:
            return None
        head, _, rest = name.partition(".")
        if head not in bound:
            return None
        resolved = f"{bound[head]}.{rest}" if rest else bound[head]
        return resolved if resolved in modules and resolved != module else None

    for node in ast.walk(parsed(module)):
        if isinstance(node, ast.ImportFrom):
            private = [alias for alias in node.names if is_private(alias.name)]
            if private:
                yield node.lineno, from_statement(node, private), from_base(module, node)
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            if (found := owner(node.value)) is not None:
                yield node.lineno, ast.unparse(node), found
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and is_private(node.args[1].value)
            and (found := owner(node.args[0])) is not None
        ):
            yield node.lineno, ast.unparse(node), found


def test_no_module_uses_another_modules_private_names() -> None:
    modules = project_modules()
    problems = [
        f"{relative(modules[module])}:{line}: `{code}` uses a private name of {owner}"
        for module in modules
        for line, code, owner in sorted(set(private_uses(module)))
    ]
    assert not problems, (
        "private names used from another module (make them public or move the code):\n"
        + "\n".join(problems)
    )


def test_long_modules_say_why() -> None:
    problems = []
    for module, path in project_modules().items():
        if module == FUNCTION_APP:
            continue
        lines = len(path.read_text(encoding="utf-8").splitlines())
        docstring = ast.get_docstring(parsed(module)) or ""
        if lines > MAX_LINES and not any(
            line.strip().startswith(LONG_REASON) for line in docstring.splitlines()
        ):
            problems.append(f"{relative(path)}: {lines} lines")
    assert not problems, (
        f"modules over {MAX_LINES} lines without a docstring line starting "
        f'"{LONG_REASON}" (split them, or say why):\n' + "\n".join(problems)
    )
