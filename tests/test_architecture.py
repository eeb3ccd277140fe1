"""The import graph: layers point one way (import-linter contract in pyproject.toml) and no
module-level import cycles between advguard's modules (including imports inside functions;
imports only for type checking do not count)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import pytest

grimp = pytest.importorskip("grimp", reason="import-linter (dev extra) is not installed")

ROOT = Path(__file__).resolve().parents[1]

#: Cycles that exist today and are tracked in the open architecture issue; a new cycle fails.
KNOWN_CYCLES: set[frozenset[str]] = set()


def _cycles(graph: object) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    succ = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}  # type: ignore[attr-defined]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []
    counter = 0
    for root in sorted(succ):
        if root in index:
            continue
        work = [(root, iter(sorted(succ[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(succ.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(frozenset(comp))
    return out


def test_no_new_import_cycles() -> None:
    graph = grimp.build_graph("advguard", exclude_type_checking_imports=True)
    found = set(_cycles(graph))
    new = [sorted(c) for c in found - KNOWN_CYCLES]
    assert not new, f"import cycles: {new}"


def test_cycle_finder_finds_a_cycle() -> None:
    class G:
        modules: ClassVar[set[str]] = {"a", "b", "c"}

        @staticmethod
        def find_modules_directly_imported_by(m: str) -> set[str]:
            return {"a": {"b"}, "b": {"a"}, "c": {"a"}}[m]

    assert _cycles(G()) == [frozenset({"a", "b"})]


def test_layers_point_one_way() -> None:
    from importlinter.cli import lint_imports

    cwd = os.getcwd()
    os.chdir(ROOT)  # the contract lives in pyproject.toml
    try:
        assert lint_imports() == 0, "run `lint-imports` for the broken contract"
    finally:
        os.chdir(cwd)
