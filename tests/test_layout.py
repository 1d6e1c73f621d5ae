"""The layout the docs describe: stage packages only under ``tasks/``, no import cycles, and
no stage that reads the environment (flows hand stages typed configs)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: reads of the process environment a stage may make: Ray's own switches, not MMRAG_* settings;
#: and torch's instruction-set caps, which change whether bf16 pays, read with the cache
#: location by the precision choice inside Ray actors (where no Settings object travels)
ENV_READS_ALLOWED = {"tasks/io/cluster.py", "tasks/models/precision.py"}


def test_tasks_holds_only_packages():
    assert [p.name for p in (ROOT / "tasks").glob("*.py")] == ["__init__.py"]
    for package in (ROOT / "tasks").iterdir():
        if package.is_dir() and package.name != "__pycache__":
            assert (package / "__init__.py").is_file(), package


def _sccs(graph) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in sorted(graph.modules):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w)))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def test_no_import_cycles():
    import grimp

    graph = grimp.build_graph("mmrag", "flows", "tasks", "schemas", "deployments")
    assert _sccs(graph) == []


def test_cycle_finder_finds_a_planted_cycle():
    class Graph:
        modules = {"a", "b", "c"}

        def find_modules_directly_imported_by(self, m):
            return {"a": {"b"}, "b": {"c"}, "c": {"a"}}[m]

    assert _sccs(Graph()) == [{"a", "b", "c"}]


def _environment_reads(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and \
                isinstance(node.value, ast.Name) and node.value.id == "os":
            lines.append(node.lineno)
    return lines


def test_stages_do_not_read_the_environment():
    found = {str(p.relative_to(ROOT)): lines for p in sorted((ROOT / "tasks").rglob("*.py"))
             if (lines := _environment_reads(p))}
    assert set(found) <= ENV_READS_ALLOWED, found
