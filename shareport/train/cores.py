"""Recovery that trains only small cores between frozen orthonormal bases (``--trainable cores``).

Every trainable pool tensor is split once, at setup, by a reduced QR into a frozen basis with
orthonormal columns (or rows) and a small core, and only the core trains:

    B (n_out, r) = Q_B (n_out, k) @ C_B (k, r)        Q_B: orthonormal columns, frozen
    A (r, n_in)  = C_A (r, k)     @ Q_A (k, n_in)     Q_A: orthonormal rows, frozen

so a site's update ``B A = Q_B (C_B C_A) Q_A`` keeps its column and row spaces and trains only
the r x r mixing between them: r^2 numbers per tensor instead of (n_out + n_in) r, and a step
that Adam normalises per entry moves the update by about lr times an orthonormal basis, whatever
the factors' scale. The published adapter has the same form, shapes and sharing as the input
(each factor is composed back, ``basis @ core``); with Spectral Surgery (arXiv 2603.03995) the
idea is the same: re-weight the directions a LoRA found instead of finding new ones.

Each pool tensor is one ``nn.Parameter`` shared by every site that uses it (``model.surgery``).
Its storage becomes the core once (``set_``), and every wrapper using it gets a parametrization
without ``right_inverse``, so registering it on a second site changes nothing. The optimizer,
the best-step copies (``BestKept``) and the gradient then all see the core.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..adapter import Adapter, compose
from ..errors import ShareportError
from ..model.surgery import Attached


class Basis(nn.Module):
    """factor = basis @ core (``left``: B) or core @ basis (``right``: A); the basis a frozen buffer."""

    def __init__(self, basis: torch.Tensor, left: bool):
        super().__init__()
        self.register_buffer("basis", basis)
        self.left = left

    def forward(self, core: torch.Tensor) -> torch.Tensor:
        return self.basis @ core if self.left else core @ self.basis


def split(factor: torch.Tensor, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(basis, core) with ``basis @ core`` (left) or ``core @ basis`` (right) equal to ``factor``,
    the basis orthonormal; by a float64 reduced QR (deterministic on the CPU)."""
    matrix = factor.double() if left else factor.double().T  # a right factor (r, n_in) as (n_in, r)
    q, r = torch.linalg.qr(matrix, mode="reduced")  # (n, k), (k, r)
    if left:
        return q.to(factor.dtype), r.to(factor.dtype)
    return q.T.contiguous().to(factor.dtype), r.T.contiguous().to(factor.dtype)  # (k, n_in), (r, k)


@dataclasses.dataclass
class TrainedCores:
    """The cores attached for training and the frozen bases they are composed with."""

    bases: dict[str, tuple[torch.Tensor, bool]]  # pool name -> (basis on the CPU, left)

    def factors(self, student: Attached, start: Adapter, kept_start: bool) -> dict[str, torch.Tensor]:
        """Every trained factor composed back from its core (for ``Attached.to_adapter``). When the
        start was kept (the best step is 0), the start's tensors exactly, not a QR round trip."""
        out = {}
        for name, (basis, left) in sorted(self.bases.items()):
            if kept_start:
                out[name] = start.tensors[name].float()
                continue
            core = student.parameters[name].detach().to("cpu", torch.float32)
            out[name] = compose(basis, core) if left else compose(core, basis)
        return out


def train_cores_only(student: Attached, names: list[str]) -> TrainedCores:
    """Re-parametrise each named pool tensor of ``student`` as basis x core; only the cores train."""
    roles: dict[str, bool] = {}  # pool name -> left (a B)
    users: dict[str, list[tuple[nn.Module, str]]] = {}
    for path, wrapper in sorted(student.wrappers.items()):
        site = student.adapter.sites[path]
        for name, attr, left in ((site.a, "lora_A", False), (site.b, "lora_B", True)):
            if name in names:
                if roles.setdefault(name, left) != left:
                    raise ShareportError(f"tensor '{name}' is used both as an A and as a B; its core cannot train")
                users.setdefault(name, []).append((wrapper, attr))
    bases = {}
    for name in sorted(users):
        parameter = student.parameters[name]
        basis, core = split(parameter.detach().to("cpu", torch.float32), roles[name])
        with torch.no_grad():  # the one parameter object becomes the core: the optimizer sees only cores
            parameter.set_(core.to(parameter.device, parameter.dtype))
        on_device = basis.to(parameter.device, parameter.dtype)
        for wrapper, attr in users[name]:
            parametrize.register_parametrization(wrapper, attr, Basis(on_device, roles[name]), unsafe=True)
        bases[name] = (basis, roles[name])
    return TrainedCores(bases)
