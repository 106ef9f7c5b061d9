"""Figures of a package's shape: modules, lines, the largest file, import cycles, function-level and private imports.

    python scripts/architecture_metrics.py [PACKAGE_DIR] [--list]

Issue 21's closing note quotes these before and after the refactor. The counts come from the source alone (``ast``),
so they need no installed package and no import of torch:

- *import cycles*: strongly connected groups of modules, counting every import of the package's own modules,
  module-level or inside a function (imports under ``if TYPE_CHECKING:`` are left out: they never run);
- *function-level imports*: imports of the package's own modules inside a function body, and how many of them carry
  a comment saying why (the rule: only to keep a heavy dependency off a light path, and say so);
- *private imports*: ``from pkg.a import _name`` across modules.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Figures:
    modules: dict[str, Path] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    edges: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    function_level: list[tuple[str, str, int, bool]] = field(default_factory=list)  # (module, target, line, said why)
    private: list[tuple[str, str, int]] = field(default_factory=list)

    def cycles(self) -> list[list[str]]:
        return strongly_connected(self.modules, self.edges)


def module_name(package_dir: Path, path: Path) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def measure(package_dir: Path) -> Figures:
    figures = Figures()
    for path in sorted(package_dir.rglob("*.py")):
        name = module_name(package_dir, path)
        figures.modules[name] = path
        figures.lines[name] = len(path.read_text().splitlines())
    for name, path in figures.modules.items():
        source = path.read_text()
        _ImportVisitor(figures, name, path.name == "__init__.py", source.splitlines()).visit(ast.parse(source))
    return figures


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self, figures: Figures, module: str, is_package: bool, lines: list[str]) -> None:
        self.figures, self.module, self.is_package, self.lines = figures, module, is_package, lines
        self.root = module.split(".")[0]
        self.depth = 0

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
        if name == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._absolute(node)
        for alias in node.names:
            full = f"{base}.{alias.name}"
            self._add(full if full in self.figures.modules else base, node)
            if alias.name.startswith("_") and not alias.name.startswith("__") and base.split(".")[0] == self.root:
                self.figures.private.append((self.module, f"{base}.{alias.name}", node.lineno))

    def _absolute(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def _add(self, target: str, node: ast.stmt) -> None:
        while target and target not in self.figures.modules:
            target = target.rpartition(".")[0]
        if not target or target == self.module:
            return
        self.figures.edges[self.module].add(target)
        if self.depth and not any(entry[:3] == (self.module, target, node.lineno)
                                  for entry in self.figures.function_level[-8:]):
            said_why = _commented(self.lines, node.lineno - 1)
            self.figures.function_level.append((self.module, target, node.lineno, said_why))


def _commented(lines: list[str], index: int) -> bool:
    """A comment on the import's line, or above it in the same block of imports (one comment may cover several)."""
    if "#" in lines[index]:
        return True
    for above in range(index - 1, -1, -1):
        text = lines[above].strip()
        if text.startswith("#"):
            return True
        if not text.startswith(("from ", "import ")):
            return False
    return False


def strongly_connected(nodes: dict[str, Path], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; groups of more than one module only."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("package_dir", nargs="?", default="tracediff", type=Path)
    parser.add_argument("--list", action="store_true", help="list every cycle, function-level and private import")
    args = parser.parse_args(argv)
    if not (args.package_dir / "__init__.py").is_file():
        parser.error(f"{args.package_dir}: not a package folder (no __init__.py)")
    figures = measure(args.package_dir)
    largest = max(figures.lines, key=figures.lines.__getitem__)
    cycles = figures.cycles()
    said = sum(1 for *_, why in figures.function_level if why)
    print(f"modules: {len(figures.modules)} ({sum(figures.lines.values())} lines)")
    print(f"largest file: {figures.modules[largest]} ({figures.lines[largest]} lines)")
    print(f"flat modules at the top level: {sum(1 for p in figures.modules.values() if p.parent == args.package_dir)}")
    print(f"import cycles: {len(cycles)} ({sum(map(len, cycles))} modules in them)")
    print(f"function-level imports of the package: {len(figures.function_level)} ({said} with a comment saying why)")
    print(f"private names imported across modules: {len(figures.private)}")
    if args.list:
        for group in cycles:
            print("  cycle:", " <-> ".join(group))
        for module, target, line, why in figures.function_level:
            print(f"  function-level: {module}:{line} -> {target}{'' if why else '  (no comment)'}")
        for module, target, line in figures.private:
            print(f"  private: {module}:{line} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
