"""The layout the README draws: imports run one way between rooms, and no module cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# a room may import rooms of a lower rank (and itself); README, "Architecture"
RANKS = {
    "converters": 0,
    "core": 1,
    "files": 2,
    "model": 2,
    "train": 3,
    "export": 3,
    "plots": 3,
    "flows": 4,
    "demo": 5,
    "cli": 6,
}
CORE = {
    "errors",
    "adapter",
    "convert",
    "convert_options",
    "conversion_report",
    "measures",
    "fleet",
    "fleet_add",
    "fleet_bytes",
    "fleet_report",
    "forms",
    "quantization",
    "summary",
    "__init__",
    "__main__",
}


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
    assert not [
        m
        for m, targets in graph.items()
        if m.startswith("converters") and any(t.startswith("shareport") for t in targets)
    ]


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
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


# ------------------------------------------------------------------- the form registry (issue 27)
# a form's name is compared as a string only in the two registries: converters/forms.py (the math of
# each form) and shareport/forms.py (its names, metadata and tensor naming, torch-free for --help)
REGISTRIES = {"converters/forms.py", "shareport/forms.py"}
# comparisons allowed outside the registries, per file (none today; the test refuses a stale entry)
PENDING_FORM_COMPARISONS: dict[str, int] = {}
# imports of convert or fleet below them that are allowed (none today; the test refuses a stale entry)
PENDING_FLOOR_IMPORTS: set[tuple[str, str]] = set()


def _form_names() -> set[str]:
    from shareport.forms import FORM_NAMES

    return set(FORM_NAMES)


def _names_a_form(node: ast.AST, names: set[str]) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in names
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_a_form(e, names) for e in node.elts)
    return False


def _form_comparisons(path: Path, names: set[str]) -> list[int]:
    """Lines of ``path`` that compare something with a form name literal (==, !=, in, not in)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare) and any(_names_a_form(x, names) for x in [node.left, *node.comparators]):
            lines.append(node.lineno)
    return lines


def test_form_names_are_compared_only_in_the_registries():
    names = _form_names()
    found = {}
    for module, path in _modules().items():
        relative = str(path.relative_to(ROOT))
        if relative not in REGISTRIES:
            lines = _form_comparisons(path, names)
            if lines:
                found[relative] = lines
    unexpected = {f: lines for f, lines in found.items() if len(lines) != PENDING_FORM_COMPARISONS.get(f, 0)}
    assert not unexpected, f"compare form names in converters/forms.py or shareport/forms.py only: {unexpected}"
    assert set(PENDING_FORM_COMPARISONS) <= set(found), "a pending file is done: drop it from the allow-list"


def test_the_scan_sees_a_form_comparison(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('if to == "aslora" or form in ("sharea", "x") or "lora" != name or kind == "auto":\n    pass\n')
    assert _form_comparisons(sample, _form_names()) == [1, 1, 1]


def _private_uses(module: str, path: Path, known: set[str]) -> list[str]:
    """``from X import _name`` and ``X._name`` where X is another module of the project."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    bound: dict[str, str] = {}  # local name -> project module it is bound to
    wrong = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:  # "import a.b as c" binds c to a.b, "import a.b" binds a to a
                    top = alias.name.split(".")[0]
                    bound[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base not in known:
                continue
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
                elif alias.name.startswith("_") and not alias.name.startswith("__") and base != module:
                    wrong.append(f"{module}: from {base} import {alias.name}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
        ):
            wrong.append(f"{module}: {bound[node.value.id]}.{node.attr}")
    return wrong


def test_no_module_uses_another_modules_private_names():
    modules = _modules()
    wrong = [w for m, p in modules.items() for w in _private_uses(m, p, set(modules))]
    assert not wrong, "\n".join(wrong)


def test_the_private_scan_sees_both_spellings(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import converters\nfrom converters.truncate import _plan\nx = converters._SPECTRA\n")
    known = set(_modules())
    assert _private_uses("shareport.sample", sample, known) == [
        "shareport.sample: from converters.truncate import _plan",
        "shareport.sample: converters._SPECTRA",
    ]


# the floors: below the conversion and the fleet builder, the adapter's queries live in adapter.py
ABOVE = {
    "shareport.convert",
    "shareport.convert_options",
    "shareport.conversion_report",
    "shareport.measures",
    "shareport.fleet",
}


def test_files_model_and_summary_never_import_convert_or_fleet():
    found = set()
    for module, targets in _graph().items():
        below = module.startswith(("shareport.files", "shareport.model")) or module in (
            "shareport.adapter",
            "shareport.summary",
            "shareport.forms",
            "shareport.errors",
        )
        if below:
            found |= {(module, target) for target in targets & ABOVE}
    wrong = sorted(found - PENDING_FLOOR_IMPORTS)
    assert not wrong, "\n".join(f"{m} imports {t}" for m, t in wrong)
    assert PENDING_FLOOR_IMPORTS <= found, "a pending import is gone: drop it from the allow-list"
