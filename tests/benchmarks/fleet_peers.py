"""The two peers of ``shareport fleet`` on PyPI, driven through their own documented APIs for ``bench_fleet.py``.

- ``lorashare`` 0.1.3 (ronantakizawa/lorashare): ``SHAREModel.from_adapters({name: path}, num_components=k)``
  stacks each (layer, side) group's factors of all adapters (A transposed, so both sides are
  (features x N*r)), takes the top-k eigenvectors of their centred covariance as a basis
  (features x k) and stores each adapter's projection (k x r, not centred) plus its classifier
  head. One k for every group; the only other setting is ``"auto"`` (the k reaching
  ``variance_threshold`` in every group), which has no byte budget. ``save_pretrained`` /
  ``from_pretrained`` / ``reconstruct(name, output_dir)`` write a PEFT folder with the original
  config and head.
- ``vlora-dev`` 1.0.0 (vlora-dev/vlora): ``SharedSubspace.from_adapters(adapters, task_ids,
  num_components=k)`` flattens each adapter's A and B per layer into one vector each, subtracts
  the mean over adapters and keeps the top-k right singular vectors (so k <= N - 1 carries
  information); it always stores the mean (a whole average adapter) plus k loadings per layer and
  side. ``adaptive_k=True`` picks k per layer by explained variance, but never below 1, so it
  cannot go under uniform k=1. ``save_quantized`` packs the components (not the means) to NF4.
  ``save_adapter`` writes ``lora_alpha = r`` unless told otherwise (the CLI's ``export --alpha``)
  and never writes a classifier head.

Every member is rebuilt by the peer's own ``reconstruct`` and written as a PEFT folder; only what a
peer cannot carry is added here, as its CLI would need a user to: vLoRA's export gets the LoRA's
``lora_alpha``, base and target modules (``export --alpha --base-model --target-modules``), and the
LoRA's own classifier head (counted in its bytes).

Stored bytes are counted one way for every method: the bytes of every tensor in the files it keeps
(``numel * element size``; packed uint8 NF4 at one byte), plus the LoRA's head where the method
drops it. Settings are chosen by those bytes alone (never by accuracy): per budget, the k whose
bytes are nearest the target.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file


def missing() -> str | None:
    """None when both peers import, else a line saying what to install."""
    absent = []
    for module, package in (("lorashare", "lorashare==0.1.3"), ("vlora", "vlora-dev==1.0.0")):
        try:
            __import__(module)
        except ImportError:
            absent.append(package)
    if not absent:
        return None
    return (
        "peers not importable (" + ", ".join(absent) + "): run the benchmark with a venv that has them, e.g. "
        "python3 -m venv --system-site-packages /work/peer-venv && /work/peer-venv/bin/pip install --no-deps "
        "lorashare==0.1.3 vlora-dev==1.0.0 click"
    )


def _tensors(files):
    """(dtype, element count) of every tensor stored in these safetensors files, read from headers."""
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                numel = 1
                for n in t.get_shape():
                    numel *= n
                yield t.get_dtype(), numel


def tensor_bytes(files) -> int:
    """Bytes of every tensor stored in these safetensors files (numel x element size)."""
    return sum(numel * _ELEMENT_SIZE[dtype] for dtype, numel in _tensors(files))


_ELEMENT_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}


def _float_numel(files) -> int:
    """Values stored (parameters; a packed NF4 byte holds two 4-bit values)."""
    return sum(numel * (2 if dtype == "U8" else 1) for dtype, numel in _tensors(files))


def head_tensors(lora_dir: Path) -> dict:
    """The LoRA's own non-LoRA tensors (its classifier head under PEFT's SEQ_CLS modules_to_save)."""
    return {k: v for k, v in load_file(str(lora_dir / "adapter_model.safetensors")).items() if "lora_" not in k}


def head_bytes(lora_dir: Path) -> int:
    return sum(v.numel() * v.element_size() for v in head_tensors(lora_dir).values())


def _lora_shapes(lora_dir: Path) -> list[tuple[int, int]]:
    return [tuple(v.shape) for k, v in load_file(str(lora_dir / "adapter_model.safetensors")).items() if "lora_" in k]


def lorashare_predicted_bytes(lora_dirs: dict[str, Path], k: int) -> int:
    """lorashare's stored bytes at k: a (features x k) basis per (layer, side) and a (k x r) loading
    per adapter and group, float32, plus every head (it keeps them)."""
    shapes = _lora_shapes(next(iter(lora_dirs.values())))
    per_group = [(max(s), min(s)) for s in shapes]
    n = len(lora_dirs)
    floats = sum(d * min(k, d) + n * min(k, d) * r for d, r in per_group)
    return 4 * floats + sum(head_bytes(d) for d in lora_dirs.values())


def lorashare_build(lora_dirs: dict[str, Path], k: int, out: Path) -> dict:
    """Compress, save, reload, and rebuild every member as a PEFT folder under ``out/members``."""
    from lorashare import SHAREModel

    ckpt, members = out / "checkpoint", out / "members"
    share = SHAREModel.from_adapters({n: str(p) for n, p in lora_dirs.items()}, num_components=k, device="cpu")
    share.save_pretrained(str(ckpt))
    share = SHAREModel.from_pretrained(str(ckpt))
    for name in lora_dirs:
        share.reconstruct(name, output_dir=str(members / name))
    stored = sorted(ckpt.rglob("*.safetensors"))
    factors = [p for p in stored if p.name != "classifier_head.safetensors"]
    return {
        "k": share.config.num_components,
        "bytes": tensor_bytes(stored),
        "parameters": _float_numel(factors),
        "members": {n: str(members / n) for n in lora_dirs},
    }


def _vlora_subspace(lora_dirs: dict[str, Path], k: int):
    import vlora
    from vlora import SharedSubspace

    return SharedSubspace.from_adapters(
        [vlora.load_adapter(p) for p in lora_dirs.values()], task_ids=list(lora_dirs), num_components=k
    )


def vlora_save(lora_dirs: dict[str, Path], k: int, ckpt: Path, nf4: bool) -> dict:
    """Build and save the subspace (``save`` or ``save_quantized``); stored bytes include the heads
    vLoRA drops (each member needs its LoRA's head)."""
    sub = _vlora_subspace(lora_dirs, k)
    if ckpt.exists():
        shutil.rmtree(ckpt)
    (sub.save_quantized if nf4 else sub.save)(str(ckpt))
    stored = sorted(ckpt.glob("*.safetensors"))
    heads = sum(head_bytes(d) for d in lora_dirs.values())
    return {"k": k, "bytes": tensor_bytes(stored) + heads, "parameters": _float_numel(stored)}


def vlora_build(lora_dirs: dict[str, Path], k: int, out: Path, nf4: bool = False, alpha: bool = True) -> dict:
    """Save the subspace, reload it, and export every member as ``vlora export`` does, with
    ``--alpha --base-model --target-modules`` from the LoRA's config (``alpha=False``: without
    ``--alpha``, as its README's minimal export); the LoRA's head is then added to the folder."""
    import vlora
    from vlora import SharedSubspace

    ckpt, members = out / "checkpoint", out / "members"
    info = vlora_save(lora_dirs, k, ckpt, nf4)
    sub = SharedSubspace.load(str(ckpt))
    for name, lora_dir in lora_dirs.items():
        config = json.loads((lora_dir / "adapter_config.json").read_text())
        weights = sub.reconstruct(name)
        if alpha:
            weights.metadata["lora_alpha"] = float(config["lora_alpha"])
        weights.metadata["base_model_name_or_path"] = config["base_model_name_or_path"]
        weights.metadata["target_modules"] = list(config["target_modules"])
        vlora.save_adapter(weights, str(members / name))
        attach_head(members / name, lora_dir)
    return {**info, "alpha_given": alpha, "members": {n: str(members / n) for n in lora_dirs}}


def attach_head(member: Path, lora_dir: Path) -> None:
    """Put the LoRA's classifier head into a PEFT folder that lacks it (tensors, task type, modules_to_save)."""
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    path = member / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors.update(head_tensors(lora_dir))
    save_file(tensors, str(path))
    mine = json.loads((member / "adapter_config.json").read_text())
    mine["task_type"] = config.get("task_type")
    mine["modules_to_save"] = config.get("modules_to_save")
    (member / "adapter_config.json").write_text(json.dumps(mine, indent=2))


def choose(candidates: dict[int, int], target: int) -> int:
    """The setting whose stored bytes are nearest the target (ties: the smaller)."""
    return min(candidates, key=lambda k: (abs(candidates[k] - target), candidates[k]))


def lorashare_choices(lora_dirs: dict[str, Path]) -> dict[int, int]:
    shapes = _lora_shapes(next(iter(lora_dirs.values())))
    k_max = min(max(s) for s in shapes)  # its clamp: the feature dimension
    return {k: lorashare_predicted_bytes(lora_dirs, k) for k in range(1, k_max + 1)}


def vlora_choices(lora_dirs: dict[str, Path], scratch: Path, nf4: bool) -> dict[int, int]:
    """Measured bytes for k = 0 .. N-1 (past N-1 the centred data has no more directions)."""
    return {k: vlora_save(lora_dirs, k, scratch / f"k{k}", nf4)["bytes"] for k in range(len(lora_dirs))}


def updates(folder: Path) -> tuple[dict, dict]:
    """A PEFT LoRA folder read with plain safetensors/json (no peer code, no shareport): per site the
    update (lora_alpha / r) * B @ A, and the other tensors (the head)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    scale = float(config["lora_alpha"]) / float(config["r"])
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            out[key.split(".lora_A.")[0]] = scale * tensors[key.replace(".lora_A.", ".lora_B.")].double() @ a.double()
    return out, {k: v for k, v in tensors.items() if "lora_" not in k}


def exactness(lora_dirs: dict[str, Path], scratch: Path) -> dict:
    """The plumbing checked against the LoRAs themselves: with a complete basis (lorashare k = the
    feature dimension, vLoRA k = N-1) each rebuilt member's updates must equal its LoRA's and its
    head be the LoRA's. Two findings are measured beside it: lorashare at k = N*r (as many
    directions as the stacked factors have) is not exact, because its basis comes from the
    *centred* covariance while it projects and rebuilds the uncentred factors and stores no mean;
    vLoRA exported without ``--alpha`` gives the ratio of its update to the LoRA's."""
    n, shapes = len(lora_dirs), _lora_shapes(next(iter(lora_dirs.values())))
    r, d = min(shapes[0]), min(max(s) for s in shapes)
    built = {
        "lorashare": lorashare_build(lora_dirs, d, scratch / "lorashare"),
        "lorashare-k=N*r": lorashare_build(lora_dirs, n * r, scratch / "lorashare-nr"),
        "vlora": vlora_build(lora_dirs, n - 1, scratch / "vlora"),
        "vlora-noalpha": vlora_build(lora_dirs, n - 1, scratch / "vlora-noalpha", alpha=False),
    }
    report = {}
    for kind, info in built.items():
        worst, ratio, heads_equal = 0.0, [], True
        for name, lora_dir in lora_dirs.items():
            ref, ref_head = updates(lora_dir)
            got, head = updates(Path(info["members"][name]))
            if set(got) != set(ref):
                raise AssertionError(f"{kind} {name}: sites differ from the LoRA's")
            for site, d in ref.items():
                worst = max(worst, float((got[site] - d).norm() / d.norm()))
                ratio.append(float((got[site] * d).sum() / (d * d).sum()))
            heads_equal &= set(head) == set(ref_head) and all(head[k].equal(ref_head[k]) for k in ref_head)
        report[kind] = {
            "k": info["k"],
            "max_rel_error": worst,
            "update_ratio_mean": sum(ratio) / len(ratio),
            "heads_equal": heads_equal,
        }
    return report
