"""Fleet members: native adapter folders whose shared tensors live in one file beside them.

A fleet folder::

    FLEET_DIR/shared.safetensors          every kind's shared basis, stored once
    FLEET_DIR/<member>/adapter_config.json      native config, with shareport.fleet = {
                                                  "shared": "../shared.safetensors",  (relative)
                                                  "sha256": <digest of that file>,
                                                  "form": "sharea" | "shareab",
                                                  "products": {B name: [U name, core name]}}
    FLEET_DIR/<member>/adapter_model.safetensors   the member's own tensors only

Reading a member joins the shared tensors into its pool after checking the file's sha256 (a
missing or changed file is refused, naming the member). A two-sided ("shareab") member stores
per site a small core C (k1, k2); its B = U @ C (n_out, k2) is formed on reading (``compose``),
so the in-memory member is a plain ShareA adapter (A = V shared, B per site) and every command
works on it. The in-memory reference is ``Adapter.config["fleet"]``, with the shared file's
absolute path; writing the adapter again keeps it a member (a relative reference from the new
folder) only while the shared file is unchanged and the adapter's shared tensors and products
still equal it (``member_section``); otherwise the adapter is written whole, standalone.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..adapter import Adapter
from ..errors import ShareportError
from ..fleet import FLEET_KEY, compose, reference
from .folder import CONFIG_NAME, file_sha256, read_config
from .tensorfile import check_finite, load_tensors

SHARED_NAME = "shared.safetensors"

__all__ = ["FLEET_KEY", "SHARED_NAME", "fleet_members", "join_shared", "member_section"]


def _read_section(folder: Path, raw) -> dict:
    cfg_path = folder / CONFIG_NAME
    if not isinstance(raw, dict):
        raise ShareportError(f"{cfg_path}: 'shareport.fleet' must be an object")
    shared, digest, products = raw.get("shared"), raw.get("sha256"), raw.get("products", {})
    if not isinstance(shared, str) or not shared or not isinstance(digest, str):
        raise ShareportError(f"{cfg_path}: 'shareport.fleet' must name its shared file and its sha256")
    if not isinstance(products, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v) for v in products.values()):
        raise ShareportError(f"{cfg_path}: 'shareport.fleet.products' must map names to [U name, core name]")
    return {"shared": shared, "sha256": digest, "form": raw.get("form"), "products": products}


def join_shared(folder: Path, raw, own: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict, set[str]]:
    """(pool, in-memory reference, names used only through products) of a member folder.

    ``raw``: the config's ``shareport.fleet``; ``own``: the member's stored tensors."""
    section = _read_section(folder, raw)
    path = (folder / section["shared"]).resolve()
    if not path.is_file():
        raise ShareportError(f"{folder}: fleet member's shared file {section['shared']} is missing "
                             f"(looked for {path})")
    if file_sha256(path) != section["sha256"]:
        raise ShareportError(f"{folder}: fleet member's shared file {section['shared']} was changed "
                             "(its sha256 differs from the one in adapter_config.json)")
    shared = load_tensors(path)
    check_finite(path, shared)
    clash = sorted(set(shared) & set(own))
    if clash:
        raise ShareportError(f"{folder}: tensor '{clash[0]}' is both in the member and in {section['shared']}")
    pool = {**own, **shared}
    through = set()
    for b_name, (u_name, core_name) in sorted(section["products"].items()):
        for name in (u_name, core_name):
            if name not in pool:
                raise ShareportError(f"{folder}: tensor '{name}' used to form '{b_name}' is missing")
        u, core = pool[u_name], pool[core_name]
        if u.dim() != 2 or core.dim() != 2 or u.shape[1] != core.shape[0]:
            raise ShareportError(f"{folder}: '{u_name}' {tuple(u.shape)} and '{core_name}' {tuple(core.shape)} "
                                 f"cannot form '{b_name}'")
        if b_name in pool:
            raise ShareportError(f"{folder}: '{b_name}' is stored and also formed from '{core_name}'")
        pool[b_name] = compose(u, core)
        through.update((u_name, core_name))
    ref = {"shared": str(path), "sha256": section["sha256"], "form": section["form"], "names": sorted(shared),
           "products": section["products"]}
    return pool, ref, through


def member_section(adapter: Adapter, folder: Path) -> tuple[dict, list[str]] | None:
    """(the config's ``shareport.fleet``, the names to store) for writing ``adapter`` into ``folder``
    as a member of its fleet; None when it no longer is one (then it is written whole)."""
    ref = reference(adapter)
    if ref is None or not Path(ref["shared"]).is_file() or file_sha256(ref["shared"]) != ref["sha256"]:
        return None
    shared = load_tensors(ref["shared"])
    for name in ref["names"]:
        mine = adapter.tensors.get(name)
        if mine is None or mine.dtype != shared[name].dtype or not torch.equal(mine, shared[name]):
            return None  # a shared tensor was trained or replaced: no longer this fleet's
    used = set(adapter.used_tensor_names())
    for b_name, (u_name, core_name) in ref["products"].items():
        if b_name not in adapter.tensors or core_name not in adapter.tensors:
            return None
        if not torch.equal(compose(shared[u_name], adapter.tensors[core_name]), adapter.tensors[b_name]):
            return None  # B moved off U @ C (e.g. trained): store it whole
    if not set(ref["products"]) <= used:
        return None
    own = sorted((used - set(ref["names"]) - set(ref["products"]))
                 | {core for _, core in ref["products"].values()})
    section = {"shared": os.path.relpath(ref["shared"], folder), "sha256": ref["sha256"], "form": ref["form"],
               "products": ref["products"]}
    return section, own


def fleet_members(adapter: Adapter) -> dict[str, Path]:
    """Every member of ``adapter``'s fleet in its fleet folder (the shared file's folder): the
    sub-folders whose config points at the same shared file with the same sha256, by folder name."""
    ref = reference(adapter)
    if ref is None or not ref.get("shared") or not ref.get("sha256"):
        return {}
    shared = Path(ref["shared"])
    members = {}
    for folder in sorted(p for p in shared.parent.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file()):
        try:
            section = read_config(folder).get("shareport", {}).get(FLEET_KEY)
        except ShareportError:
            continue
        if (isinstance(section, dict) and section.get("sha256") == ref["sha256"]
                and isinstance(section.get("shared"), str) and (folder / section["shared"]).resolve() == shared):
            members[folder.name] = folder
    return members
