"""shareport's native format for shared adapters.

A folder with ``adapter_config.json`` and ``adapter_model.safetensors``. The config has the
PEFT-like fields a reader expects (base model, task type, target modules, r) plus a
``shareport`` section: the form, every site's A name, B name and scale, and where the adapter
came from. The safetensors file holds each unique tensor once, under its pool name;
``modules_to_save`` tensors are stored under ``extra/<PEFT key>``.

``load(folder)`` and ``dump(adapter)``, the same verbs as the PEFT module. A fleet member's
config also has ``shareport.fleet``: its shared tensors are in a file beside it (see fleet.py).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..adapter import FORMS, Adapter, Site, kinds_for_paths
from ..errors import ShareportError
from . import fleet, quantized
from .folder import CONFIG_NAME, WEIGHTS_NAME, read_config
from .tensorfile import check_finite, check_floating, load_tensors

FORMAT_VERSION = 1
QUANTIZED_FORMAT_VERSION = 2  # integer factors (files/quantized.py): an older reader refuses them by version
EXTRA_PREFIX = "extra/"


def is_native(config: dict) -> bool:
    return isinstance(config.get("shareport"), dict)


def dump(adapter: Adapter, folder: Path | None = None) -> tuple[dict, dict]:
    """The config dict and the tensors (pool + extras) of the native format. A fleet member
    written into ``folder`` stores only its own tensors and a relative reference to its shared file."""
    paths = sorted(adapter.sites)
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    sites = {p: {"A": adapter.sites[p].a, "B": adapter.sites[p].b, "scale": adapter.sites[p].scale} for p in paths}
    config = {
        "base_model_name_or_path": adapter.base_model,
        "task_type": adapter.task_type,
        "fan_in_fan_out": adapter.fan_in_fan_out,
        "r": max(adapter.rank(p) for p in paths),
        "target_modules": leaves,
        "modules_to_save": adapter.config.get("modules_to_save"),
        "shareport": {
            "format_version": FORMAT_VERSION,
            "form": adapter.form,
            "sites": sites,
            "provenance": adapter.provenance,
        },
    }
    member = fleet.member_section(adapter, folder) if folder is not None else None
    names = adapter.used_tensor_names()
    if member is not None:
        config["shareport"][fleet.FLEET_KEY], names = member
    tensors = {name: adapter.tensors[name] for name in names}
    records = quantized.stored_records(adapter, names)
    if records:
        config["shareport"]["format_version"] = QUANTIZED_FORMAT_VERSION
        config["shareport"]["quantization"], stored = quantized.dump(records)
        tensors.update(stored)
    tensors.update({EXTRA_PREFIX + k: v for k, v in adapter.extra_tensors.items()})
    return config, tensors


def load(folder: str | Path, config: dict | None = None) -> Adapter:
    """Read a native folder (``config``: its already parsed config, if the caller has it)."""
    folder = Path(folder)
    config = read_config(folder) if config is None else config
    cfg_path = folder / CONFIG_NAME
    section = config["shareport"]
    version = section.get("format_version")
    if version not in (FORMAT_VERSION, QUANTIZED_FORMAT_VERSION) or (version == QUANTIZED_FORMAT_VERSION) != (
        "quantization" in section
    ):
        raise ShareportError(
            f"{cfg_path}: shareport format_version {version!r} is not supported (expected "
            f"{FORMAT_VERSION}, or {QUANTIZED_FORMAT_VERSION} with a 'quantization' section)"
        )
    form = section.get("form")
    if form not in FORMS:
        raise ShareportError(f"{cfg_path}: unknown form {form!r} (expected one of {', '.join(FORMS)})")
    raw_sites = section.get("sites")
    if not isinstance(raw_sites, dict) or not raw_sites:
        raise ShareportError(f"{cfg_path}: 'shareport.sites' must be a non-empty object")

    weights_path = folder / WEIGHTS_NAME
    stored = load_tensors(weights_path)
    check_finite(weights_path, stored)
    extras = {k[len(EXTRA_PREFIX) :]: v for k, v in stored.items() if k.startswith(EXTRA_PREFIX)}
    pool = {k: v for k, v in stored.items() if not k.startswith(EXTRA_PREFIX)}
    records = {}
    if "quantization" in section:
        pool, records = quantized.load(cfg_path, weights_path, section["quantization"], pool)
    check_floating(weights_path, pool, pool)
    member, through = None, set()
    if fleet.FLEET_KEY in section:
        pool, member, through, shared_records = fleet.join_shared(folder, section[fleet.FLEET_KEY], pool)
        records = {**records, **shared_records}

    kinds = kinds_for_paths(raw_sites)
    sites = {}
    for path in sorted(raw_sites):
        entry = raw_sites[path]
        if not isinstance(entry, dict):
            raise ShareportError(f"{cfg_path}: site '{path}' must be an object with A, B and scale")
        a, b, scale = entry.get("A"), entry.get("B"), entry.get("scale")
        if not isinstance(a, str) or not isinstance(b, str):
            raise ShareportError(f"{cfg_path}: site '{path}' must name its A and B tensors")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ShareportError(f"{cfg_path}: site '{path}' has an invalid scale {scale!r}")
        for name in (a, b):
            if name not in pool:
                raise ShareportError(f"{weights_path}: tensor '{name}' used by site '{path}' is missing")
        kind, layer = kinds[path]
        sites[path] = Site(path, kind, layer, a, b, float(scale))
    unused = sorted(set(pool) - {n for s in sites.values() for n in (s.a, s.b)} - through)
    if unused:
        raise ShareportError(f"{weights_path}: tensor '{unused[0]}' is not used by any site in {CONFIG_NAME}")
    provenance = section.get("provenance") or {}
    modules_to_save = config.get("modules_to_save")
    kept = {"modules_to_save": modules_to_save} if modules_to_save else {}
    if member is not None:
        kept[fleet.FLEET_KEY] = member
    try:
        return Adapter(
            tensors=pool,
            sites=sites,
            form=form,
            base_model=config.get("base_model_name_or_path"),
            task_type=config.get("task_type"),
            fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
            extra_tensors=extras,
            config=kept,
            provenance=provenance if isinstance(provenance, dict) else {},
            quantized=records,
        )
    except ShareportError as exc:
        raise ShareportError(f"{folder}: {exc}") from None
