"""Load any adapter folder, and save an adapter atomically in either format.

``load_adapter`` tells the two formats apart by the ``shareport`` section of the config.
``save_adapter`` writes into a temporary folder beside the target and renames it at the end,
refuses to overwrite without ``overwrite=True``, and never writes inside an input folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from ..adapter import Adapter
from .atomic import atomic_dir
from ..errors import ShareportError
from .native import is_native, native_config_for, read_native
from .peft import CONFIG_NAME, WEIGHTS_NAME, peft_config_for, read_config, read_peft
from .tensorfile import save_tensors


def load_adapter(folder: str | os.PathLike, allow_pickle: bool = False) -> Adapter:
    """Read a PEFT LoRA folder or a shareport native folder."""
    folder = Path(folder)
    config = read_config(folder)
    try:
        if is_native(config):
            return read_native(folder, config)
        return read_peft(folder, allow_pickle=allow_pickle, config=config)
    except ShareportError as exc:
        if str(folder) in str(exc):
            raise
        raise ShareportError(f"{folder}: {exc}") from None


def dump_json(data: dict) -> str:
    """Deterministic JSON: sorted keys, fixed indentation, trailing newline."""
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_adapter_files(adapter: Adapter, folder: Path, as_peft: bool) -> None:
    """Write config and weights into an existing (temporary) folder."""
    if as_peft:
        if adapter.shared_names():
            adapter = adapter.expand()
        config, tensors = peft_config_for(adapter)
    else:
        config, tensors = native_config_for(adapter)
    (folder / CONFIG_NAME).write_text(dump_json(config), encoding="utf-8")
    save_tensors(tensors, folder / WEIGHTS_NAME)


def save_adapter(
    adapter: Adapter,
    out: str | os.PathLike,
    as_peft: bool = False,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write ``adapter`` to ``out`` (native format, or a plain PEFT LoRA with ``as_peft``)."""
    with atomic_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        write_adapter_files(adapter, tmp, as_peft)
    return Path(out)


def adapter_file_size(folder: str | os.PathLike) -> int:
    """Bytes on disk of the adapter's weights file (0 if absent)."""
    path = Path(folder) / WEIGHTS_NAME
    return path.stat().st_size if path.is_file() else 0
