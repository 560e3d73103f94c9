"""Layering: the layer of every module comes from its path, through the one table in docs/architecture.md.

Imports only go down (function-level imports count), there are no import cycles, L0-L2 never import Lightning,
and a module docstring that names its layer agrees with the table.
"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYER_ROW = re.compile(r"^\| `(ktr/[\w/]*(?:\.py)?)` \| L(\d) \|", re.M)
MAX_TOP_LEVEL_MODULES = 16
MAX_MODULE_LINES = 300


def layer_table() -> dict[str, int]:
    """Dotted prefix -> layer, read from docs/architecture.md (`ktr/model/` -> `ktr.model`)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = {}
    for path, layer in LAYER_ROW.findall(text):
        name = path.removesuffix("/").removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        table[name] = int(layer)
    return table


def layer_of(module: str, table: dict[str, int]) -> int | None:
    """The layer of the most specific table row covering `module`, or None."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in table:
            return table[".".join(parts[:n])]
    return None


def _modules() -> dict[str, Path]:
    root = ROOT / "ktr"
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def test_layer_table_is_read_and_covers_every_module() -> None:
    table = layer_table()
    assert table["ktr.model"] == 2 and table["ktr.module"] == 3 and table["ktr.cli"] == 4, table
    uncovered = sorted(m for m in _modules() if layer_of(m, table) is None)
    assert not uncovered, f"modules without a row in docs/architecture.md's layer table: {uncovered}"


def test_lower_layers_do_not_import_lightning() -> None:
    table = layer_table()
    lower = sorted(m for m in _modules() if layer_of(m, table) <= 2 and m != "ktr.__main__")
    code = ("import sys\n" + "".join(f"import {m}\n" for m in lower) +
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_imports_only_go_down() -> None:
    table = layer_table()
    upward = [f"{m} (L{layer_of(m, table)}) imports {t} (L{layer_of(t, table)})"
              for m, targets in _import_graph().items() for t in sorted(targets)
              if layer_of(t, table) > layer_of(m, table)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_module_docstrings_agree_with_the_table() -> None:
    import ast

    table = layer_table()
    wrong = []
    for name, path in _modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        claim = re.search(r"\(layers? L(\d)", doc.split("\n\n")[0])
        if claim and int(claim.group(1)) != layer_of(name, table):
            wrong.append(f"{name}: docstring says L{claim.group(1)}, the table L{layer_of(name, table)}")
    assert not wrong, "\n".join(wrong)


def test_size_bar() -> None:
    top = sorted(p.name for p in (ROOT / "ktr").glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} top-level modules in ktr/: {top}"
    lines = len((ROOT / "ktr" / "module.py").read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"ktr/module.py has {lines} lines (bar: {MAX_MODULE_LINES})"


def test_every_module_imports() -> None:
    import importlib
    import pkgutil

    import ktr

    for info in pkgutil.walk_packages(ktr.__path__, "ktr."):
        if info.name != "ktr.__main__":
            importlib.import_module(info.name)


def _import_graph() -> dict[str, set[str]]:
    """`ktr` module -> the `ktr` modules it imports anywhere in its source (module level or inside functions)."""
    import ast
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule when there is one, else names from pkg itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle_hidden_in_a_function() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_ktr_modules() -> None:
    graph = _import_graph()
    assert "ktr.module" in graph and "ktr.model.families" in graph["ktr.model.policy"]  # the graph sees real imports
    cycles = _cycles(graph)
    assert not cycles, f"import cycles (imports inside functions count too): {cycles}"
