"""An adapter folder's file names, its config, deterministic JSON and content digests.

Both formats (PEFT and native) use the same two file names; this module is the one place that
knows them, so the format modules never borrow from each other.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import ShareportError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


def read_config(folder: Path) -> dict:
    """Load and parse ``adapter_config.json`` with errors that name the file."""
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise ShareportError(f"{folder}: adapter folder not found")
    if not path.is_file():
        raise ShareportError(f"{path}: missing adapter config (is '{folder}' a PEFT adapter folder?)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShareportError(f"{path}: malformed JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ShareportError(f"{path}: expected a JSON object")
    return config


def dump_json(data: dict) -> str:
    """Deterministic JSON: sorted keys, fixed indentation, trailing newline."""
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(folder: str | os.PathLike) -> str | None:
    """Digest of the folder's safetensors weights (None for a pickled-only adapter)."""
    path = Path(folder) / WEIGHTS_NAME
    return file_sha256(path) if path.is_file() else None


def adapter_file_size(folder: str | os.PathLike) -> int:
    """Bytes on disk of the adapter's weights file (0 if absent)."""
    path = Path(folder) / WEIGHTS_NAME
    return path.stat().st_size if path.is_file() else 0
