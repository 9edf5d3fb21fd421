"""The package's floors: each module imports only modules on its own floor or below, and no files import each
other in a loop. `python tests/test_layers.py` prints the floors with their line counts and import arrows."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lowest first. A module's floor is that of the longest prefix listed here.
FLOORS = [
    ["dsr1.config", "dsr1.fp8", "dsr1.tokenizer"],  # ground: plain data, no model
    ["dsr1.kernels"],  # fast paths (Triton, DeepGEMM, cuBLASLt FP8), each a twin of a plain path
    ["dsr1.model"],  # single-device math; the dispatcher protocol is its seam to expert parallelism
    ["dsr1.parallel"],  # placement, process groups, dispatchers, DeepEP
    ["dsr1.checkpoint"],  # HF names, safetensors reader, loader (given the experts to read)
    ["dsr1.engine", "dsr1.embedded"],  # loading a run, generation, CUDA-graph decode
    ["dsr1.eval", "dsr1.serve", "dsr1.generate_cli", "dsr1.placement_report", "dsr1.placement_stats", "dsr1"],  # adapters, the server, CLIs, the package face
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor_of(module: str) -> int:
    best = max((p for floor in FLOORS for p in floor if module == p or module.startswith(p + ".")), key=len)
    return next(i for i, floor in enumerate(FLOORS) if best in floor)


def imports() -> dict[str, set[str]]:
    """dsr1 module -> the dsr1 modules it imports (at any depth in the file, `from a import b` as a.b if b is a module)."""
    files = {module_name(p): p for p in (ROOT / "dsr1").rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in files.items():
        graph[name]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module for a in node.names]
            graph[name] |= {t for t in targets if t.split(".")[0] == "dsr1" and t != name}
    return graph


def test_no_import_runs_up_a_floor():
    upward = [f"{a} (floor {floor_of(a)}) -> {b} (floor {floor_of(b)})" for a, bs in imports().items() for b in bs if floor_of(b) > floor_of(a)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph, state, cycles = imports(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(nxt_ := node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[nxt_] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


if __name__ == "__main__":
    graph = imports()
    for i, floor in reversed(list(enumerate(FLOORS))):
        mods = sorted(m for m in graph if floor_of(m) == i)
        lines = sum(len((ROOT / (m.replace(".", "/") + ".py")).read_text().splitlines()) if (ROOT / (m.replace(".", "/") + ".py")).exists()
                    else len((ROOT / m.replace(".", "/") / "__init__.py").read_text().splitlines()) for m in mods)
        print(f"floor {i}: {', '.join(floor)} ({lines} lines)")
        for m in mods:
            print(f"    {m} -> {', '.join(sorted(graph[m])) or '-'}")
