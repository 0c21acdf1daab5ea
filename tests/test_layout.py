"""The project's layout rules, checked over the modules' own import statements (no import is
executed): no import circle, no private name imported across modules, the layers' directions
(attacks/ knows no Flower and no fl_sim; fl_sim/ knows no attack and no experiment), at most
15 modules at the top of experiments/, and an import inside a function only with a comment
that says why it is there."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("attacks", "fl_sim", "experiments")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, ast.AST, list[str]]]:
    """(imported module, the node, the names taken from it) for each import of ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            names = [a.name for a in node.names]
            # "from pkg import module" imports that module
            subs = [n for n in names if f"{target}.{n}" in MODULES]
            out += [(f"{target}.{n}", node, []) for n in subs]
            out.append((target, node, [n for n in names if n not in subs]))
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _ in _imports(m):
            while target and target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target != m:
                graph[m].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_modules_import_each_other_without_a_circle():
    assert _cycles(_graph()) == []


def test_the_circle_check_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_is_imported_across_modules():
    crossing = [
        f"{m}: {t}.{n}"
        for m in MODULES
        for t, _, names in _imports(m)
        for n in names
        if n.startswith("_") and not n.startswith("__") and t.split(".")[0] in PACKAGES
    ]
    assert crossing == []


def test_attacks_import_neither_flower_nor_the_federation_and_the_federation_no_attack():
    wrong = []
    for m in MODULES:
        top = m.split(".")[0]
        banned = {"attacks": ("flwr", "fl_sim", "experiments"), "fl_sim": ("attacks", "experiments")}.get(top, ())
        wrong += [f"{m} imports {t}" for t, _, _ in _imports(m) if t.split(".")[0] in banned]
    assert wrong == []


def test_experiments_has_at_most_15_modules_at_its_top_level():
    top = sorted(p.name for p in (ROOT / "experiments").glob("*.py"))
    assert len(top) <= 15, top


def test_an_import_inside_a_function_says_why():
    unexplained = []
    for m, path in MODULES.items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    around = lines[max(node.lineno - 2, 0) : node.end_lineno]
                    if not any("#" in line for line in around):
                        unexplained.append(f"{m}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert unexplained == []


# The layers of the project, bottom first: a module imports only from its own layer or below.
LAYERS = [
    ("attacks", "fl_sim"),
    (
        "experiments.presets",
        "experiments.plan",
        "experiments.cli",
        "experiments.observe",
        "experiments.scoring",
        "experiments.results",
        "experiments.run_folder",
        "experiments.stopping",
        "experiments.runner",
    ),
    ("experiments.report",),  # reading run folders, their figures and pages
    ("experiments.experiment",),  # one plan's run: the federation, the attack runner, the report
    ("experiments.apps",),  # what `flwr run` loads
    ("experiments.run", "experiments.deploy", "experiments.sweep"),  # the commands
    ("experiments.report.__main__", "experiments.bench", "experiments"),  # commands over the others
]


def _layer(module: str) -> int:
    best, depth = len(LAYERS), -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and name.count(".") > depth:
                best, depth = i, name.count(".")
    return best


def test_every_module_imports_only_from_its_layer_or_below():
    assert all(_layer(m) < len(LAYERS) for m in MODULES)
    upward = [
        f"{m} ({_layer(m)}) imports {t} ({_layer(t)})"
        for m, targets in _graph().items()
        for t in targets
        if _layer(t) > _layer(m)
    ]
    assert upward == []
