"""What ``shareport inspect`` reports about an adapter, as plain data."""

from __future__ import annotations

import torch

from .adapter import Adapter, recorded_source_parameters, reference
from .quantization import factor_axes, storage


def update_norm(adapter: Adapter, path: str) -> float:
    """||scale * B @ A||_F without forming the update: sqrt(trace((Bt^T Bt)(A A^T)))."""
    a, bt = adapter.factors(path, torch.float64)
    return float(torch.sqrt(torch.clamp(((bt.T @ bt) * (a @ a.T)).sum(), min=0.0)))


def summarize(adapter: Adapter, file_size: int | None = None) -> dict:
    """Form, base model, kinds, layers, ranks, parameter counts and per-layer norms."""
    kinds = {}
    for kind, sites in adapter.kinds().items():
        n_out, n_in = adapter.shape(sites[0].path)
        kinds[kind] = {
            "shape": [n_out, n_in],
            "sites": len(sites),
            "unique_A": len({s.a for s in sites}),
            "unique_B": len({s.b for s in sites}),
            "layers": [
                {
                    "layer": s.layer,
                    "path": s.path,
                    "rank": adapter.rank(s.path),
                    "scale": s.scale,
                    "A": s.a,
                    "B": s.b,
                    "update_norm": update_norm(adapter, s.path),
                }
                for s in sites
            ],
        }
    ranks = sorted({adapter.rank(p) for p in adapter.sites})
    # the size is given against the source LoRA when the provenance names one (convert's ratio)
    source = recorded_source_parameters(adapter)
    return {
        "form": adapter.form,
        "base_model": adapter.base_model,
        "task_type": adapter.task_type,
        "layers": adapter.layers(),
        "outside_blocks": adapter.outside_kinds(),
        "ranks": ranks,
        "parameters": adapter.num_parameters(),
        "source_parameters": source,
        "source_ratio": adapter.num_parameters() / source if source else None,
        "lora_equivalent_parameters": adapter.num_lora_parameters(),  # a plain LoRA at these ranks
        "extra_tensors": sorted(adapter.extra_tensors),
        "file_size": file_size,
        "storage": storage(adapter),  # bytes of the factors as stored, bits per parameter, quantization
        "fleet": fleet_membership(adapter),
        "kinds": kinds,
    }


def fleet_membership(adapter: Adapter) -> dict | None:
    """For a fleet member: its fleet's form and cluster, the shared file, and the parameters it stores
    there (shared with the other members) and on its own (a two-sided member stores U and its cores,
    not the product B = U C that ``parameters`` counts). None for any other adapter."""
    ref = reference(adapter)
    if ref is None:
        return None
    shared_names = set(ref["names"])
    stored = factor_axes(adapter)  # the factors as stored: U and cores, never a product
    return {
        "form": ref.get("form"),
        "cluster": ref.get("cluster"),
        "shared_file": ref.get("shared"),
        "shared_parameters": sum(adapter.tensors[n].numel() for n in stored if n in shared_names),
        "own_parameters": sum(adapter.tensors[n].numel() for n in stored if n not in shared_names),
    }
