"""A hard, real text-classification task that every machine has offline: Python's own docstrings.

**What it is.** Each example is one docstring of CPython's standard library (a module, class,
function or method docstring, as written by the CPython developers), labelled by the top-level
package it belongs to: ``asyncio``, ``email``, ``xml``, ... (``CLASSES``). The task is "which part
of the standard library is this documentation from?".

**Why this text.** It is real technical prose that nobody on this project wrote, it ships with
every Python, so the benchmark needs no download, and its provenance is exact: the interpreter's
version (recorded in the metadata) fixes every byte. Man pages were the other candidate, but
their presence and sections differ between distributions and containers (many images strip
them); the standard library is the same wherever the same Python is.

**Why it is hard.** The classes overlap in vocabulary and purpose, by design of the choice:
``http``/``urllib``/``email`` (headers, messages, URLs), ``asyncio``/``multiprocessing``
(processes, queues, events, transports), ``typing``/``inspect``/``importlib``/``collections``
(objects, types, modules, signatures), ``unittest``/``logging`` (handlers, results, formatting).
Many docstrings are one line ("Return the value.") that says little about where they live. A
frozen sentence encoder with a trained linear head does poorly; adapting the encoder helps a lot
but does not saturate (both measured by ``bench_frontier.py``).

**How it is built (deterministic).**
- Import each class's package and, for packages, every submodule (``pkgutil.walk_packages``),
  skipping ``__main__`` and test modules and those that fail to import.
- Collect the docstring (``__doc__`` as written, never inherited: ``inspect.getdoc`` would copy a
  base class's text) of each module, and of each class and function *defined* in that module
  (``__module__`` is the module), and of each method, classmethod, staticmethod and property
  defined in such a class's own ``__dict__``.
- Normalise whitespace (``inspect.cleandoc``, then runs of whitespace to one space), drop texts
  shorter than ``MIN_CHARS``, cut to ``MAX_CHARS``.
- A text that occurs under two labels is dropped entirely; a text repeated under one label is
  kept once. So no text is in both splits, and none is ambiguous by construction.
- Each class is capped at ``PER_CLASS`` examples, chosen by the sha256 of the text (a fixed,
  content-based order, not an import-order accident).
- Split by the sha256 of the text: the examples whose hash falls in the lowest ``TEST_SHARE`` of
  the range are the test split. Disjoint by construction, and checked.

Build it in a fresh interpreter (run this file as a script, as ``bench_frontier.py`` does): some
libraries patch a few stdlib functions when imported (with torch loaded, three docstrings fewer
count as the stdlib's own), which would change the data.

``python3 -m tests.benchmarks.docstrings_data OUT`` writes ``OUT/train.jsonl``, ``OUT/test.jsonl``
(rows ``{"text", "label", "name", "source"}``) and ``OUT/meta.json`` (classes, counts, Python version,
the sha256 of both files).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import pkgutil
import re
import subprocess
import sys
import warnings
from pathlib import Path

CLASSES = (
    "asyncio",
    "collections",
    "email",
    "http",
    "importlib",
    "inspect",
    "logging",
    "multiprocessing",
    "typing",
    "unittest",
    "urllib",
    "xml",
)
MIN_CHARS = 40
MAX_CHARS = 400
PER_CLASS = 220
TEST_SHARE = 0.25


def _import(name: str):
    """The module, or None when it is a script entry point, a test module or fails to import."""
    if name.endswith("__main__") or ".test" in name or "idle_test" in name:
        return None
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - a module that cannot load here is simply not a source
        return None


def _modules(package: str) -> list:
    top = _import(package)
    if top is None:
        raise SystemExit(f"docstrings_data: the standard-library package '{package}' does not import here")
    found = {top.__name__: top}
    if hasattr(top, "__path__"):
        for info in pkgutil.walk_packages(top.__path__, package + ".", onerror=lambda _name: None):
            module = _import(info.name)
            if module is not None:
                found[module.__name__] = module
    return [found[name] for name in sorted(found)]


def _own_doc(obj) -> str | None:
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) else None


def _members(cls) -> list[tuple[str, object]]:
    """(name, function-like) for what ``cls`` defines itself, unwrapping class/static methods."""
    out = []
    for name, value in sorted(vars(cls).items()):
        if isinstance(value, (classmethod, staticmethod)):
            value = value.__func__
        if isinstance(value, property):
            value = value.fget
        if inspect.isfunction(value) and value.__qualname__.startswith(cls.__qualname__ + "."):
            out.append((name, value))
    return out


def _docstrings(module) -> list[tuple[str, str]]:
    """(qualified source name, raw docstring) for a module and what it defines."""
    out = []
    if isinstance(module.__doc__, str):
        out.append((module.__name__, module.__doc__))
    for name, value in sorted(vars(module).items()):
        if getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(value):
            doc = _own_doc(value)
            if doc:
                out.append((f"{module.__name__}.{value.__qualname__}", doc))
            for member_name, member in _members(value):
                if member.__doc__:
                    out.append((f"{module.__name__}.{value.__qualname__}.{member_name}", member.__doc__))
        elif inspect.isfunction(value) and value.__doc__:
            out.append((f"{module.__name__}.{value.__qualname__}", value.__doc__))
    return out


def normalise(doc: str) -> str:
    return re.sub(r"\s+", " ", inspect.cleandoc(doc)).strip()[:MAX_CHARS]


def _text_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def build_rows() -> tuple[list[dict], list[dict]]:
    """(train rows, test rows), each ``{"text", "label", "name", "source"}``; disjoint texts."""
    by_text: dict[str, set[str]] = {}
    source_of: dict[tuple[str, str], str] = {}
    for package in CLASSES:
        for module in _modules(package):
            for source, doc in _docstrings(module):
                text = normalise(doc)
                if len(text) < MIN_CHARS:
                    continue
                by_text.setdefault(text, set()).add(package)
                source_of.setdefault((text, package), source)
    rows = []
    for label, package in enumerate(CLASSES):
        texts = sorted((t for t, owners in by_text.items() if owners == {package}), key=_text_hash)[:PER_CLASS]
        rows += [{"text": t, "label": label, "name": package, "source": source_of[(t, package)]} for t in texts]
    cut = int(TEST_SHARE * 2**64)
    test = sorted((r for r in rows if _text_hash(r["text"]) < cut), key=lambda r: (r["label"], r["source"]))
    train = sorted((r for r in rows if _text_hash(r["text"]) >= cut), key=lambda r: (r["label"], r["source"]))
    assert not {r["text"] for r in train} & {r["text"] for r in test}, "train and test overlap"
    return train, test


def write(out: Path) -> dict:
    """Write ``train.jsonl``, ``test.jsonl`` and ``meta.json`` under ``out``; returns the metadata."""
    train, test = build_rows()
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "source": "docstrings of CPython's standard library, labelled by top-level package",
        "python": sys.version.split()[0],
        "classes": list(CLASSES),
        "min_chars": MIN_CHARS,
        "max_chars": MAX_CHARS,
        "per_class": PER_CLASS,
        "test_share": TEST_SHARE,
    }
    for split, rows in (("train", train), ("test", test)):
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
        meta[f"{split}_examples"] = len(rows)
        meta[f"{split}_per_class"] = [sum(r["label"] == i for r in rows) for i in range(len(CLASSES))]
        meta[f"{split}_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return meta


def write_fresh(out: Path) -> dict:
    """:func:`write` in a fresh interpreter (``python -I`` on this file): what a caller that has
    imported torch or transformers must use, since those patch stdlib functions."""
    subprocess.run([sys.executable, "-I", __file__, str(out)], check=True, stdout=subprocess.DEVNULL)
    return json.loads((Path(out) / "meta.json").read_text())


def read_split(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


if __name__ == "__main__":
    # no argparse: this interpreter imports nothing beyond what write() needs (see the docstring)
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        raise SystemExit("usage: python3 -m tests.benchmarks.docstrings_data OUT_DIR")
    print(json.dumps(write(Path(sys.argv[1])), indent=2))
