"""Resumable benchmark stages: each stage's JSON result is kept under the output folder, so a
long benchmark that was interrupted reruns only what it had not finished."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def stage(out: Path, name: str, fn):
    """Run ``fn`` once; its JSON result is kept in ``OUT/name.json`` for a rerun to resume from."""
    path = out / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    print(f"[{Path(sys.argv[0]).stem}] {name} ...", file=sys.stderr, flush=True)
    result = fn()
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result
