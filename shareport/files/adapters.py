"""Load any adapter folder, and save an adapter atomically in either format.

``load_adapter`` tells the two formats apart by the ``shareport`` section of the config.
``save_adapter`` writes into a temporary folder beside the target and renames it at the end,
refuses to overwrite without ``overwrite=True``, and never writes inside an input folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Collection, Iterable, Protocol

import torch

from ..adapter import FLEET_KEY, Adapter, reference
from ..errors import ShareportError
from . import native, peft, quantized
from .atomic import MARKER_NAME, MARKER_TEXT, atomic_dir
from .fleet import REPORT_NAME, SHARED_NAME, folder_members, foreign_entries
from .folder import CONFIG_NAME, WEIGHTS_NAME, dump_json, file_sha256, read_config
from .tensorfile import save_tensors


def load_adapter(folder: str | os.PathLike, allow_pickle: bool = False, stream: bool = False) -> Adapter:
    """Read a PEFT LoRA folder or a shareport native folder.

    ``stream`` (PEFT LoRA folders; native ones are read whole): the pool reads each tensor from
    the file's map when used, for callers that touch one kind at a time (``convert``); the pool is
    then a read-only mapping."""
    folder = Path(folder)
    config = read_config(folder)
    try:
        if native.is_native(config):
            return native.load(folder, config)
        return peft.load(folder, config, allow_pickle=allow_pickle, stream=stream)
    except ShareportError as exc:
        if str(folder) in str(exc):
            raise
        raise ShareportError(f"{folder}: {exc}") from None


def write_adapter_files(adapter: Adapter, folder: Path, as_peft: bool) -> None:
    """Write config and weights into an existing (temporary) folder."""
    if as_peft:
        if adapter.shared_names():
            adapter = adapter.expand()
        config, tensors = peft.dump(adapter)
    else:
        config, tensors = native.dump(adapter, folder)
    (folder / CONFIG_NAME).write_text(dump_json(config), encoding="utf-8")
    save_tensors(tensors, folder / WEIGHTS_NAME)


def save_adapter(
    adapter: Adapter,
    out: str | os.PathLike,
    as_peft: bool = False,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    reports: dict[str, dict] | None = None,
) -> Path:
    """Write ``adapter`` to ``out`` (native format, or a plain PEFT LoRA with ``as_peft``),
    with ``reports`` (file name -> data) as JSON files beside it, all in one atomic step."""
    with atomic_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        write_adapter_files(adapter, tmp, as_peft)
        for name, data in sorted((reports or {}).items()):
            (tmp / name).write_text(dump_json(data), encoding="utf-8")
    return Path(out)


class FleetParts(Protocol):
    """What ``save_fleet`` writes of a ``shareport.fleet.Fleet``: named here, not imported, because
    files/ sits below the fleet builder (tests/end_to_end/test_architecture.py)."""

    names: list[str]
    shared: dict[str, torch.Tensor]
    members: list[Adapter]


def save_fleet(
    fleet: FleetParts,
    out: str | os.PathLike,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    reports: dict[str, dict] | None = None,
    previous: Path | None = None,
    unchanged: Collection[str] = (),
) -> Path:
    """Write a fleet folder in one atomic step: ``shared.safetensors`` once, one native member
    folder per adapter (its own tensors, ``../shared.safetensors`` and its sha256), ``reports``.

    ``previous``: the fleet folder this one grew from (``fleet-add``). Its entries named in
    ``unchanged`` (``SHARED_NAME``, member names) are copied byte for byte instead of written; its
    other members' folders are copied too, then their config and weights rewritten (so what else
    they hold, e.g. a training report, stays beside them).

    A quantized fleet (its members hold ``quantized`` records of shared tensors, ``fleet --quantize``)
    stores those tensors' integers and scales, and each member's reference records how (``files/fleet.py``)."""
    for name in fleet.names:
        if not name or name.startswith(".") or "/" in name or name == SHARED_NAME:
            raise ShareportError(f"{name!r}: cannot be a fleet member's folder name; rename the adapter folder")
    records = _shared_records(fleet)
    section, stored = quantized.dump(records) if records else (None, {})
    with atomic_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        shared_path = tmp / SHARED_NAME
        if SHARED_NAME in unchanged:
            shutil.copyfile(previous / SHARED_NAME, shared_path)
        else:
            save_tensors({**{n: t for n, t in fleet.shared.items() if n not in records}, **stored}, shared_path)
        digest = file_sha256(shared_path)
        for name, member in zip(fleet.names, fleet.members):
            folder = tmp / name
            if previous is not None and (previous / name).is_dir():
                shutil.copytree(previous / name, folder, symlinks=True)
                if name in unchanged:
                    continue
            else:
                folder.mkdir()
                (folder / MARKER_NAME).write_text(MARKER_TEXT, encoding="utf-8")
            ref = {**reference(member), "shared": str(shared_path), "sha256": digest}
            ref.pop("quantization", None)  # the file just written says how it is stored, nothing older
            if section is not None:
                ref["quantization"] = section
            member = dataclasses.replace(member, config={**member.config, FLEET_KEY: ref})
            write_adapter_files(member, folder, as_peft=False)
            if FLEET_KEY not in read_config(folder)["shareport"]:
                raise ShareportError(f"{name}: internal error, the member does not match its shared tensors")
        for name, data in sorted((reports or {}).items()):
            (tmp / name).write_text(dump_json(data), encoding="utf-8")
    return Path(out)


def _shared_records(fleet: FleetParts) -> dict:
    """The quantized shared tensors (the members' records whose float values are the shared tensors)."""
    found = {}
    for member in fleet.members:
        held = quantized.stored_records(member, [n for n in member.quantized if n in fleet.shared])
        found.update({n: r for n, r in held.items() if torch.equal(fleet.shared[n], r.dequantize())})
    return found


@dataclasses.dataclass
class FleetFolder:
    """A fleet folder as read back: its members (shared file checked) and its report."""

    folder: Path
    members: dict[str, Adapter]  # by member folder name: the report's order, then any other member
    report: dict  # fleet_report.json as written

    @property
    def foreign(self) -> list[str]:
        """Entries that are not the fleet's own (what replacing the folder whole would delete)."""
        return foreign_entries(self.folder, self.members)


def load_fleet(fleet_dir: str | os.PathLike, allow_pickle: bool = False) -> FleetFolder:
    """Read every member of the fleet folder ``fleet_dir`` (each checks the shared file's sha256, so a
    changed ``shared.safetensors`` is refused naming a member) and its ``fleet_report.json``."""
    folder = Path(fleet_dir)
    if not folder.is_dir():
        raise ShareportError(f"{folder}: fleet folder not found")
    if not (folder / SHARED_NAME).is_file():
        raise ShareportError(f"{folder}: not a fleet folder (no {SHARED_NAME}; 'shareport fleet' writes one)")
    report_path = folder / REPORT_NAME
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        listed = [m["name"] for m in report["members"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ShareportError(f"{report_path}: missing or not a fleet report ({exc})") from None
    found = folder_members(folder)
    if not found:
        raise ShareportError(f"{folder}: no member folder refers to its {SHARED_NAME}")
    missing = [name for name in listed if name not in found]
    if missing:
        raise ShareportError(f"{folder}: member '{missing[0]}' of {REPORT_NAME} has no folder here")
    order = listed + sorted(set(found) - set(listed))
    members = {name: load_adapter(found[name], allow_pickle=allow_pickle) for name in order}
    return FleetFolder(folder, members, report)
