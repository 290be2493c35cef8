"""Calibration statistics: each adapted module's input second moment, in its kind's small basis.

The calibrated converters (``converters/calibration.py``) need, per site l of a kind,

    S_l = (1 / N_l) sum_n (Q^T x_n)(Q^T x_n)^T          (p, p), float64,

where x_n runs over the N_l tokens whose input reaches the module (padding excluded) with the
*original adapter attached* (so later layers see the adapted model's activations), and
``Q = converters.calibration_basis(As)`` for exactly the A's (same order, same values) that
``shareport.convert`` hands to the converter. Forward pre-hooks on every :class:`LoRALinear`
wrapper project each batch's inputs by Q and accumulate; no (n_in, n_in) matrix is ever formed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

import converters

from ..adapter import Adapter, kind_factors
from ..errors import ShareportError
from .surgery import attach

F64 = torch.float64


@dataclasses.dataclass
class Statistics:
    """Per site path: S_l (p, p) float64 and its token count; per kind: the basis Q (n_in, p)."""

    statistics: dict[str, torch.Tensor]
    tokens: dict[str, int]
    bases: dict[str, torch.Tensor]

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.statistics.values())


def kind_bases(adapter: Adapter) -> dict[str, tuple[list[str], torch.Tensor]]:
    """Per kind: its site paths (layer order) and Q from the very A's the conversion will use."""
    out = {}
    for name, sites in adapter.kinds().items():
        As, _ = kind_factors(adapter, sites)
        out[name] = ([s.path for s in sites], converters.calibration_basis(As))
    return out


def collect_statistics(
    model: nn.Module,
    adapter: Adapter,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 8,
    where: str = "base model",
    bases: dict[str, tuple[list[str], torch.Tensor]] | None = None,
) -> Statistics:
    """Run ``sequences`` through ``model`` with ``adapter`` attached and accumulate every site's S_l.

    ``model`` is left with the adapter detached. A non-finite input at any site is refused,
    naming the site and ``where`` (the base's folder). ``bases``: ``kind_bases(adapter)`` if the
    caller already has it (one SVD per kind saved), else computed here.
    """
    bases = kind_bases(adapter) if bases is None else bases
    attached = attach(model, adapter, dtype=torch.float32)
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask_now: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(path: str, q: torch.Tensor):
        q_dev = q.to(device)

        def hook(module, args):
            x = args[0]
            rows = x[mask_now["mask"]] if x.dim() == 3 else x.reshape(-1, x.shape[-1])
            if not bool(torch.isfinite(rows).all()):
                raise ShareportError(f"{where}: non-finite activations reach '{path}' on the calibration data")
            projected = rows.to(F64) @ q_dev
            sums[path] += (projected.T @ projected).cpu()
            counts[path] += rows.shape[0]

        return hook

    try:
        for name, (paths, q) in bases.items():
            for path in paths:
                sums[path] = torch.zeros(q.shape[1], q.shape[1], dtype=F64)
                counts[path] = 0
                handles.append(attached.wrappers[path].register_forward_pre_hook(hook_for(path, q)))
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                batch = sequences[start : start + batch_size]
                width = max(len(s) for s in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, seq in enumerate(batch):
                    ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
                    mask[row, : len(seq)] = 1
                mask_now["mask"] = mask.bool().to(device)
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for handle in handles:
            handle.remove()
        attached.detach()
    statistics = {path: sums[path] / max(counts[path], 1) for path in sums}
    return Statistics(statistics, counts, {name: q for name, (_, q) in bases.items()})
