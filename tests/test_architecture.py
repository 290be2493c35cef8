"""The layout the README draws: imports run one way between rooms, and no module cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a room may import rooms of a lower rank (and itself); README, "Architecture"
RANKS = {"converters": 0, "core": 1, "files": 2, "model": 2, "train": 3, "export": 3, "plots": 3, "flows": 4,
         "demo": 5, "cli": 6}
CORE = {"errors", "adapter", "convert", "fleet", "forms", "quantization", "summary", "__init__", "__main__"}


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("shareport", "converters"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _room(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "converters":
        return "converters"
    name = parts[1] if len(parts) > 1 else "__init__"
    if name == "__main__":
        return "cli"  # ``python -m shareport`` is the CLI's other door
    return "core" if name in CORE else name


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the project that ``module`` imports (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import sub" imports the module pkg.sub; "from mod import name" imports mod
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, set(modules)) for m, p in modules.items()}


def test_rooms_import_one_way():
    wrong = []
    for module, targets in _graph().items():
        for target in targets:
            a, b = _room(module), _room(target)
            if target == "shareport" and module.startswith("shareport"):  # the package's __version__
                continue
            if RANKS[b] > RANKS[a] or (a == "model" and b == "files") or (a == "files" and b == "model"):
                wrong.append(f"{module} ({a}) imports {target} ({b})")
    assert not wrong, "\n".join(wrong)


def test_converters_never_import_shareport():
    graph = _graph()
    assert not [m for m, targets in graph.items() if m.startswith("converters") and
                any(t.startswith("shareport") for t in targets)]


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_library_holds_nothing_only_tests_use():
    """Every library module is imported by another library module (or is an entry point)."""
    graph = _graph()
    used = {t for m, targets in graph.items() if m.startswith("shareport") for t in targets}
    used |= {m.rpartition(".")[0] for m in used}  # a package whose modules are used is used
    from shareport.cli.main import COMMANDS

    entry = {"shareport", "shareport.__main__", "shareport.cli", "shareport.cli.main"}
    entry |= {f"shareport.cli.{module}" for module, _ in COMMANDS.values()}  # the group imports them by name
    unused = sorted(m for m in graph if m.startswith("shareport") and m not in used | entry)
    assert not unused, unused
