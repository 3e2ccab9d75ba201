"""The kit's layers, read from every module's imports (function-level ones too): benchmarks -> entry scripts -> the
recipe (train_gpt.py, which holds the model) -> the library (runlib/) -> the data layer (data/). Nothing imports
upward, the entry scripts do not import one another, and there is no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# layer of each kind of module, lowest first; a module may import its own layer's modules and lower ones only,
# but an entry script no other entry script
LAYERS = {"data": 0, "runlib": 1, "recipe": 2, "entry": 3, "bench": 4}


def kit_modules() -> dict[str, Path]:
    """module name -> file, for the kit's own Python files (tests aside)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests",) or any(p.startswith(".") for p in rel.parts):
            continue
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def layer(name: str) -> str:
    if name == "data" or name.startswith("data."):
        return "data"
    if name == "runlib" or name.startswith("runlib."):
        return "runlib"
    if name == "train_gpt":
        return "recipe"
    if name.startswith("bench."):
        return "bench"  # a benchmark imports what it measures (bench_generate: generate's decoder)
    return "entry"  # train_gpt_medium, generate, eval_hellaswag, records.report, bench.*, lib.torchrun


def imports(path: Path, known: set[str], package: str) -> set[str]:
    """The kit modules a file imports, wherever in the file (bench/ scripts import their siblings by bare name)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            for candidate in (n, f"{package}.{n}" if package else n):
                if candidate in known:
                    found.add(candidate)
    return found


def graph() -> dict[str, set[str]]:
    mods = kit_modules()
    known = set(mods)
    return {name: imports(path, known, name.rpartition(".")[0]) - {name} for name, path in mods.items()}


def test_imports_go_downward_only():
    wrong = []
    for name, deps in graph().items():
        for dep in deps:
            mine, theirs = LAYERS[layer(name)], LAYERS[layer(dep)]
            sideways = layer(name) == layer(dep) == "entry"
            if theirs > mine or sideways:
                wrong.append(f"{name} ({layer(name)}) imports {dep} ({layer(dep)})")
    assert wrong == []


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> list[str] | None:
        state[n] = 1
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1:
                return path + [n, d]
            if d not in state and (cycle := visit(d, path + [n])):
                return cycle
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            assert visit(n, []) is None


def test_the_layers_are_what_this_test_thinks_they_are():
    """The rule above has teeth: the library is found and the recipe imports it, an entry imports the recipe."""
    g = graph()
    assert {"runlib.checkpoints", "runlib.stopping", "runlib.devices"} <= set(g)
    assert any(d.startswith("runlib.") for d in g["train_gpt"]) and "train_gpt" in g["generate"]
    assert "records.report" in g and not any(layer(d) in ("recipe", "entry") for m, ds in g.items()
                                             if layer(m) == "runlib" for d in ds)
