"""Import rules: no import cycles among racm3's packages; no stage module imports another, no
library module imports a stage module, and nothing imports a stage module's constants (shared code
and data live in library modules); evaluation and generation never import each other (both stand
on `pipelines.inference`). Also run by `make lint`: python -m tests.pipelines.core.test_imports
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("pipelines", "storage", "model", "flows")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports anywhere in its body (lazy imports count: they are still
    dependencies), resolved to the deepest known module."""
    out: set[str] = set()
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
                break
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports_of(n, p, set(mods)) for n, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def stage_modules() -> set[str]:
    from pipelines.core.registry import STAGES

    return {ref.split(":")[0] for ref in STAGES.values()}


def stage_edges(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    stages = stage_modules()
    return sorted((a, b) for a in stages for b in g.get(a, ()) if b in stages)


# Evaluation <-> generation edges allowed for now: fid.py is being replaced in another branch
# and moves to a shared metrics module with it; nothing else may join this list.
SIBLING_EXCEPTIONS = {("pipelines.generation.showcase", "pipelines.evaluation.fid")}
SIBLINGS = ("pipelines.evaluation", "pipelines.generation")


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def sibling_edges(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports between evaluation and generation (either way)."""
    a, b = SIBLINGS
    return sorted((m, t) for m, ts in g.items() for t in ts
                  if ((in_package(m, a) and in_package(t, b)) or (in_package(m, b) and in_package(t, a)))
                  and (m, t) not in SIBLING_EXCEPTIONS)


def library_stage_edges(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Library modules under pipelines/ that import a stage module."""
    stages = stage_modules()
    return sorted((m, t) for m, ts in g.items() if in_package(m, "pipelines") and m not in stages
                  for t in ts if t in stages)


def constant_imports(mods: dict[str, Path], stages: set[str]) -> list[tuple[str, str]]:
    """(module, stage.CONSTANT) for every UPPER_CASE name imported from a stage module."""
    out = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module in stages:
                out += [(name, f"{node.module}.{a.name}") for a in node.names
                        if a.name.isupper() and a.name != "__all__"]
    return sorted(out)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_stage_imports_another_stage():
    edges = stage_edges(graph())
    assert not edges, "stage -> stage imports: " + ", ".join(f"{a} -> {b}" for a, b in edges)


def test_evaluation_and_generation_never_import_each_other():
    edges = sibling_edges(graph())
    assert not edges, "evaluation <-> generation imports: " + ", ".join(f"{a} -> {b}" for a, b in edges)


def test_no_library_module_imports_a_stage_module():
    edges = library_stage_edges(graph())
    assert not edges, "library -> stage imports: " + ", ".join(f"{a} -> {b}" for a, b in edges)


def test_nothing_imports_a_stage_module_for_its_constants():
    found = constant_imports(modules(), stage_modules())
    assert not found, "constants imported from stage modules: " + ", ".join(f"{a}: {b}" for a, b in found)


def test_the_checker_sees_sibling_library_and_constant_imports(tmp_path):
    g = {"pipelines.generation.x": {"pipelines.evaluation.metrics"}, "pipelines.evaluation.y": set(),
         "pipelines.inference.loader": {"pipelines.training.train"}}
    assert sibling_edges(g) == [("pipelines.generation.x", "pipelines.evaluation.metrics")]
    assert library_stage_edges(g) == [("pipelines.inference.loader", "pipelines.training.train")]
    src = tmp_path / "m.py"
    src.write_text("from pipelines.demo.data import BACKGROUNDS, render\n")
    assert constant_imports({"m": src}, {"pipelines.demo.data"}) == [("m", "pipelines.demo.data.BACKGROUNDS")]


def test_the_checker_sees_cycles_and_stage_edges():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    g = graph()
    assert "storage.fs" in g["storage.manifest"]  # imports are really resolved


def main() -> int:
    g = graph()
    problems = [f"import cycle: {' <-> '.join(c)}" for c in cycles(g)]
    problems += [f"stage imports stage: {a} -> {b}" for a, b in stage_edges(g)]
    problems += [f"evaluation <-> generation: {a} -> {b}" for a, b in sibling_edges(g)]
    problems += [f"library imports stage: {a} -> {b}" for a, b in library_stage_edges(g)]
    problems += [f"stage constant imported: {a}: {b}" for a, b in constant_imports(modules(), stage_modules())]
    print("\n".join(problems) or f"imports ok: {len(g)} modules, no cycles, no stage -> stage, "
          "no evaluation <-> generation, no library -> stage, no stage constants")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
