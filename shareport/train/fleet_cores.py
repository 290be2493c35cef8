"""Recovery of a two-sided fleet member: only its cores C train, its shared U and V stay frozen.

A two-sided member's site has A = V (shared) and B = U @ C (``shareport.fleet``). Attached as an
ordinary adapter, B would train as a whole (n_out, k2) matrix and leave span(U). Here each such
B is re-parametrised on its wrapper (``torch.nn.utils.parametrize``): the trainable tensor is the
core C (k1, k2) and the wrapper computes ``B = U @ C`` with U a frozen buffer, so the gradient
reaches C only and the trained member is still ``U C V``: the same shared file, new cores.
B's parameter *object* takes C's shape and values (``set_``) and is kept by parametrize, so the pool
name of B keeps naming the one trainable tensor of that site (now the core) for the optimizer; the
basis is ``cores.Basis``, the one ``--trainable cores`` uses.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..adapter import Adapter, compose, reference
from ..errors import ShareportError
from ..model.surgery import Attached
from .cores import Basis


@dataclasses.dataclass
class Cores:
    """The trainable cores of a two-sided member attached for training."""

    products: dict[str, list[str]]  # B name -> [U name, core name]
    cores: dict[str, nn.Parameter]  # core name -> the trainable (k1, k2) parameter (B's object, reshaped)

    def finish(self, trained: Adapter, member: Adapter) -> Adapter:
        """``trained`` (the attached adapter read back) with the new cores, their products and U."""
        tensors = dict(trained.tensors)
        for b_name, (u_name, core_name) in sorted(self.products.items()):
            core = self.cores[core_name].detach().to("cpu", torch.float32).clone()
            tensors[u_name], tensors[core_name] = member.tensors[u_name], core
            tensors[b_name] = compose(member.tensors[u_name], core)
        return trained.with_sites(tensors, dict(trained.sites), trained.form)


def train_cores(student: Attached, member: Adapter, checkpointing: bool) -> Cores | None:
    """Re-parametrise a two-sided member's B's as U @ C (None for any other adapter)."""
    ref = reference(member)
    products = ref["products"] if ref else {}
    if not products:
        return None
    if checkpointing:
        raise ShareportError(
            "checkpoints (--checkpoint-every/--resume) of a two-sided fleet member's cores are "
            "not supported; run without them"
        )
    cores = {}
    for path, wrapper in sorted(student.wrappers.items()):
        b_name = member.sites[path].b
        if b_name not in products:
            continue
        u_name, core_name = products[b_name]
        b = wrapper.lora_B
        u = member.tensors[u_name].to(b.device, b.dtype)
        with torch.no_grad():  # the parameter object becomes the core (cores.py: the optimizer keeps it)
            b.set_(member.tensors[core_name].to(b.device, b.dtype).clone())
        parametrize.register_parametrization(wrapper, "lora_B", Basis(u, left=True), unsafe=True)
        core = wrapper.parametrizations.lora_B.original
        cores[core_name] = core
    return Cores(products, cores)
