"""Running the end-to-end examples in-process, as the example tests do (importing transformers once
saves most of a subprocess's start)."""

import importlib.util
import json
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name.replace('/', '_')}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def run_example(name: str, out: Path, skip: list[str]) -> dict:
    # one thread: the suite may run in parallel workers, one per core (see conftest.py)
    load_example(name).main(["--fast", "--threads", "1", "--out", str(out), *skip])
    return json.loads((out / "results.json").read_text())
