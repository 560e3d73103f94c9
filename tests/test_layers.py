"""Layering (STYLE.md): nothing in L0-L2 imports lightning; the drop-in API imports without it."""

import subprocess
import sys

L0_L2 = ["ktr._imports", "ktr.config", "ktr.types", "ktr.families", "ktr.optim", "ktr.ops", "ktr.advantages",
         "ktr.losses", "ktr.fused", "ktr.answers", "ktr.rewards", "ktr.probes.select", "ktr.probes.visual", "ktr.probes.temporal", "ktr.probes.keytokens",
         "ktr.probes.scores", "ktr.probes.compare", "ktr.probes.weighting", "ktr.baselines", "ktr.baseline_rollout",
         "ktr.policy", "ktr.forward", "ktr.sampling", "ktr.rollout", "ktr.rollout_shared", "ktr.rollout_vllm", "ktr.tokenizer",
         "ktr.data.video", "ktr.data.decoders", "ktr.data.patches",
         "ktr.data.processor", "ktr.data.prompts", "ktr.data.synthetic", "ktr.eval", "ktr.eval.benchmarks.synthetic",
         "ktr.quant", "ktr.distributed", "ktr.report", "ktr.report.chromium"]


def test_lower_layers_do_not_import_lightning() -> None:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in L0_L2) +
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


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
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "ktr"
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
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
    assert "ktr.module" in graph and "ktr.families" in graph["ktr.policy"]  # the graph sees real imports
    cycles = _cycles(graph)
    assert not cycles, f"import cycles (imports inside functions count too): {cycles}"
