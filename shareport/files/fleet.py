"""Fleet members: native adapter folders whose shared tensors live in one file beside them.

A fleet folder::

    FLEET_DIR/shared.safetensors          every kind's shared basis, stored once
    FLEET_DIR/<member>/adapter_config.json      native config, with shareport.fleet = {
                                                  "shared": "../shared.safetensors",  (relative)
                                                  "sha256": <digest of that file>,
                                                  "form": "sharea" | "shareab",
                                                  "products": {B name: [U name, core name]},
                                                  "cluster": c,  (clustered fleets only)
                                                  "quantization": {...}}  (quantized fleets only)
    FLEET_DIR/<member>/adapter_model.safetensors   the member's own tensors only

A clustered fleet's shared file holds one basis per cluster and kind, named
``cluster<c>.<kind>.fleet_A`` (``adapter.kind_key``); a member's pool joins only its cluster's, and
its fleet (``fleet_members``: what an export swaps in) is its cluster. Reading a member joins the
shared tensors into its pool after checking the file's sha256 (a
missing or changed file is refused, naming the member). A two-sided ("shareab") member stores
per site a small core C (k1, k2); its B = U @ C (n_out, k2) is formed on reading (``compose``),
so the in-memory member is a plain ShareA adapter (A = V shared, B per site) and every command
works on it. The in-memory reference is ``Adapter.config["fleet"]``, with the shared file's
absolute path; writing the adapter again keeps it a member (a relative reference from the new
folder) only while the shared file is unchanged and the adapter's shared tensors and products
still equal it (``member_section``); otherwise the adapter is written whole, standalone.

A quantized fleet (``fleet --quantize``) stores its shared tensors as ``files/quantized.py`` stores a
native adapter's (integers, ``scale/NAME`` float16 scales), and every member's ``shareport.fleet``
records that file's ``quantization`` section (the scheme and each shared tensor's bits, axis, group
size, shape), beside the member's own ``shareport.quantization``: the config is where every reader
looks, and the sha256 ties the two. Reading dequantizes the shared file before anything else.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..adapter import FLEET_KEY, Adapter, compose, kind_key, reference
from ..errors import ShareportError
from . import quantized
from .atomic import MARKER_NAME
from .folder import CONFIG_NAME, file_sha256, read_config
from .tensorfile import check_finite, check_floating, load_tensors

SHARED_NAME = "shared.safetensors"
REPORT_NAME = "fleet_report.json"

__all__ = [
    "FLEET_KEY",
    "REPORT_NAME",
    "SHARED_NAME",
    "check_member_name",
    "fleet_members",
    "folder_members",
    "foreign_entries",
    "join_shared",
    "member_names",
    "member_section",
    "split_named",
]

# a member's folder name: portable on every file system, no hidden folder, no option look-alike
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 100 characters"
JOIN = "-"  # between the folder names of a member name that needs more than one


def _read_section(folder: Path, raw) -> dict:
    cfg_path = folder / CONFIG_NAME
    if not isinstance(raw, dict):
        raise ShareportError(f"{cfg_path}: 'shareport.fleet' must be an object")
    shared, digest, products = raw.get("shared"), raw.get("sha256"), raw.get("products", {})
    if not isinstance(shared, str) or not shared or not isinstance(digest, str):
        raise ShareportError(f"{cfg_path}: 'shareport.fleet' must name its shared file and its sha256")
    if not isinstance(products, dict) or not all(
        isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v) for v in products.values()
    ):
        raise ShareportError(f"{cfg_path}: 'shareport.fleet.products' must map names to [U name, core name]")
    cluster = raw.get("cluster")
    if cluster is not None and (isinstance(cluster, bool) or not isinstance(cluster, int) or cluster < 1):
        raise ShareportError(f"{cfg_path}: 'shareport.fleet.cluster' must be a positive number")
    out = {"shared": shared, "sha256": digest, "form": raw.get("form"), "products": products, "cluster": cluster}
    if "quantization" in raw:
        out["quantization"] = raw["quantization"]
    return out


def read_shared(path: Path, section: dict | None, cfg_path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(the shared file's float tensors, the quantized ones' records): ``section`` is the members'
    ``shareport.fleet.quantization`` (None: a float fleet); errors name the config and the file."""
    shared = load_tensors(path)
    check_finite(path, shared)
    if section is None:
        return shared, {}
    return quantized.load(cfg_path, path, section, shared)


def cluster_tensors(shared: dict[str, torch.Tensor], cluster: int | None) -> dict[str, torch.Tensor]:
    """The shared tensors a member of ``cluster`` uses: all of them in a fleet of one cluster, else its
    cluster's (named ``cluster<c>.<kind>...``, ``adapter.kind_key``)."""
    if cluster is None:
        return shared
    prefix = kind_key("", cluster)
    return {name: t for name, t in shared.items() if name.startswith(prefix)}


def join_shared(
    folder: Path, raw, own: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict, set[str], dict]:
    """(pool, in-memory reference, names used only through products, the shared tensors' quantization
    records) of a member folder.

    ``raw``: the config's ``shareport.fleet``; ``own``: the member's stored tensors."""
    section = _read_section(folder, raw)
    path = (folder / section["shared"]).resolve()
    if not path.is_file():
        raise ShareportError(f"{folder}: fleet member's shared file {section['shared']} is missing (looked for {path})")
    if file_sha256(path) != section["sha256"]:
        raise ShareportError(
            f"{folder}: fleet member's shared file {section['shared']} was changed "
            "(its sha256 differs from the one in adapter_config.json)"
        )
    shared, records = read_shared(path, section.get("quantization"), folder / CONFIG_NAME)
    check_floating(path, shared, shared)
    shared = cluster_tensors(shared, section["cluster"])
    records = {name: r for name, r in records.items() if name in shared}
    if not shared:
        raise ShareportError(
            f"{folder}: {section['shared']} holds no tensor of the member's cluster {section['cluster']}"
        )
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
            raise ShareportError(
                f"{folder}: '{u_name}' {tuple(u.shape)} and '{core_name}' {tuple(core.shape)} cannot form '{b_name}'"
            )
        if b_name in pool:
            raise ShareportError(f"{folder}: '{b_name}' is stored and also formed from '{core_name}'")
        pool[b_name] = compose(u, core)
        through.update((u_name, core_name))
    ref = {
        "shared": str(path),
        "sha256": section["sha256"],
        "form": section["form"],
        "names": sorted(shared),
        "products": section["products"],
    }
    if section["cluster"] is not None:
        ref["cluster"] = section["cluster"]
    if "quantization" in section:
        ref["quantization"] = section["quantization"]
    return pool, ref, through, records


def member_section(adapter: Adapter, folder: Path) -> tuple[dict, list[str]] | None:
    """(the config's ``shareport.fleet``, the names to store) for writing ``adapter`` into ``folder``
    as a member of its fleet; None when it no longer is one (then it is written whole)."""
    ref = reference(adapter)
    if ref is None or not Path(ref["shared"]).is_file() or file_sha256(ref["shared"]) != ref["sha256"]:
        return None
    shared, _ = read_shared(Path(ref["shared"]), ref.get("quantization"), folder / CONFIG_NAME)
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
    own = sorted((used - set(ref["names"]) - set(ref["products"])) | {core for _, core in ref["products"].values()})
    section = {
        "shared": os.path.relpath(ref["shared"], folder),
        "sha256": ref["sha256"],
        "form": ref["form"],
        "products": ref["products"],
    }
    if ref.get("cluster") is not None:
        section["cluster"] = ref["cluster"]
    if ref.get("quantization") is not None:
        section["quantization"] = ref["quantization"]
    return section, own


def fleet_members(adapter: Adapter) -> dict[str, Path]:
    """Every member of ``adapter``'s fleet in its fleet folder (the shared file's folder) that shares its
    bases: the sub-folders whose config points at the same shared file with the same sha256 and names
    the same cluster (none in a fleet of one cluster), by folder name."""
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
        if (
            isinstance(section, dict)
            and section.get("sha256") == ref["sha256"]
            and section.get("cluster") == ref.get("cluster")
            and isinstance(section.get("shared"), str)
            and (folder / section["shared"]).resolve() == shared
        ):
            members[folder.name] = folder
    return members


def folder_members(fleet_dir: Path) -> dict[str, Path]:
    """The member folders of a fleet folder, by folder name: its sub-folders whose config refers to the
    folder's own ``shared.safetensors`` (whatever sha256 they record: reading them checks it). A
    sub-folder that is not an adapter, or refers elsewhere, is not a member."""
    shared = (fleet_dir / SHARED_NAME).resolve()
    members = {}
    for folder in sorted(p for p in fleet_dir.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file()):
        try:
            section = read_config(folder).get("shareport", {}).get(FLEET_KEY)
        except (ShareportError, AttributeError):
            continue
        if (
            isinstance(section, dict)
            and isinstance(section.get("shared"), str)
            and (folder / section["shared"]).resolve() == shared
        ):
            members[folder.name] = folder
    return members


def foreign_entries(fleet_dir: Path, members: dict[str, Path]) -> list[str]:
    """What a fleet folder holds besides the fleet (its shared file, report, marker and members):
    what replacing the folder whole would delete."""
    own = {SHARED_NAME, REPORT_NAME, MARKER_NAME, *members}
    return sorted(p.name for p in fleet_dir.iterdir() if p.name not in own)


def split_named(arg: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH); anything else, or an argument that exists as a path (a folder
    whose own name holds '='), -> (None, arg)."""
    if "=" in arg and not os.path.exists(arg):
        name, _, path = arg.partition("=")
        return name, path
    return None, arg


def check_member_name(name: str, what: str) -> None:
    """Refuse, in one line naming ``what``, a member name that cannot be a fleet folder's member folder."""
    if not NAME_PATTERN.fullmatch(name) or name in (SHARED_NAME, REPORT_NAME, MARKER_NAME):
        reserved = " (a name the fleet folder uses itself)" if NAME_PATTERN.fullmatch(name) else ""
        raise ShareportError(
            f"{what}: '{name}' is not a valid member name{reserved}; a name is a folder name: {NAME_RULE}"
        )


def _suffix_names(paths: list[str]) -> list[str]:
    """Each path's shortest distinct suffix: drop the trailing folder names every path shares (e.g.
    ``lora``), then the fewest trailing names no other path ends with, joined with ``JOIN``."""
    parts = [Path(os.path.abspath(p)).parts[1:] for p in paths]  # [1:]: not the root
    if len(parts) == 1:
        return [parts[0][-1] if parts[0] else paths[0]]
    common = 0
    while common < min(len(p) for p in parts) - 1 and len({p[-1 - common] for p in parts}) == 1:
        common += 1
    rest = [p[: len(p) - common] for p in parts]
    names = []
    for i, mine in enumerate(rest):
        depth = next(
            (
                d
                for d in range(1, len(mine) + 1)
                if all(other[-d:] != mine[-d:] for j, other in enumerate(rest) if j != i)
            ),
            len(mine),
        )
        names.append(JOIN.join(mine[-depth:]))
    return names


def member_names(args: list[str]) -> list[tuple[str, str]]:
    """(name, path) per input, in order: ``NAME=PATH`` names its member, the others take their
    shortest distinct path suffix (``_suffix_names``). A folder given twice, a name that is invalid
    as a folder name, given twice, or that two inputs would both take, is refused in one line; so is a ``NAME=PATH``
    whose PATH does not exist. Nothing is read: this runs before the inputs are loaded."""
    split = [split_named(a) for a in args]
    seen_paths: dict[str, str] = {}
    for arg, (_, path) in zip(args, split):
        resolved = str(Path(path).resolve())
        if resolved in seen_paths:
            raise ShareportError(f"{arg}: given twice (also as {seen_paths[resolved]})")
        seen_paths[resolved] = arg
    for arg, (name, path) in zip(args, split):
        if name is not None:
            check_member_name(name, arg)
            if not os.path.exists(path):
                raise ShareportError(f"{arg}: {path} does not exist (NAME=PATH gives the member at PATH the name NAME)")
    unnamed = [i for i, (name, _) in enumerate(split) if name is None]
    derived = dict(zip(unnamed, _suffix_names([split[i][1] for i in unnamed]))) if unnamed else {}
    out, seen = [], {}
    for i, (arg, (name, path)) in enumerate(zip(args, split)):
        if name is None:
            name = derived[i]
            check_member_name(name, f"{path} (its name from its folders)")
        if name in seen:
            how = (
                "is given twice"
                if split[i][0] is not None and split[seen[name]][0] is not None
                else "would name two members"
            )
            raise ShareportError(
                f"{arg}: member name '{name}' {how} (also {args[seen[name]]}); member names "
                "must differ: name the inputs with NAME=PATH"
            )
        seen[name] = i
        out.append((name, path))
    return out


def added_member_name(path: str, names: list[str]) -> str:
    """The name ``fleet`` would have given the LoRA at ``path`` among the inputs of a fleet whose members
    are ``names``: its shortest distinct path suffix. The inputs' paths are not recorded, so the
    trailing folder names they shared are those the path shares with a member's input still on disk
    (``run4/lora`` beside ``run1/lora`` of member ``run1``: ``lora``); they are dropped, then the fewest
    trailing folder names that are no member's name are joined with ``JOIN`` (``run4``; ``runs-run4``
    when ``run4`` is taken). Nothing left that is distinct: the whole path's, which the caller refuses.
    """
    parts = Path(os.path.abspath(path)).parts[1:]  # [1:]: not the root
    above = Path(os.path.abspath(path)).parents
    # the longest tail (at most all but one folder) that a member's input <above>/<member>/<tail> has too
    common = max(
        (
            c
            for c in range(1, len(parts))
            if any(
                (above[c] / name).joinpath(*parts[len(parts) - c :]).is_dir() and name != parts[len(parts) - c - 1]
                for name in names
            )
        ),
        default=0,
    )
    rest = parts[: len(parts) - common]
    taken = set(names)
    return next(
        (JOIN.join(rest[-d:]) for d in range(1, len(rest) + 1) if JOIN.join(rest[-d:]) not in taken),
        JOIN.join(rest),
    )
