"""Model surgery: attach any adapter form to a base model, fold it in, take it off.

Attaching replaces each adapted module by a :class:`LoRALinear` wrapper that computes
``base(x) + scale * (x A^T) B^T``. Factors that the adapter shares are the *same*
``nn.Parameter`` object in every wrapper that uses them, so a shared A is one parameter,
counted once by ``model.parameters()``, and its gradient is the sum over the sites that use it.
Folding writes ``W += dW`` (transposed for GPT-2's Conv1D, which stores W as (in, out)).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..adapter import Adapter, Site, carried_parameter_name
from ..errors import ShareportError
from .base import get_module, is_conv1d, swap_module, weight_shape


class LoRALinear(nn.Module):
    """A linear (or Conv1D) layer plus ``scale * (x A^T) B^T``; A and B may be shared."""

    def __init__(self, base: nn.Module, lora_A: nn.Parameter, lora_B: nn.Parameter, scale: float):
        super().__init__()
        self.base = base
        self.lora_A = lora_A  # (r, n_in); the same object in every site that shares it
        self.lora_B = lora_B  # (n_out, r)
        self.scale = scale
        self.enabled = True
        # recovery's site distillation (train/sites.py): while True, forward keeps its update in ``update``
        self.recording = False
        self.update: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        a, b = self.lora_A, self.lora_B
        if a.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            a, b = a.to(x.dtype), b.to(x.dtype)
        # PEFT's order (product, scale, sum). Measured on an H200 (1.1B base, b16 x s512): folding the
        # scale and the sum into one addmm was within noise in eager mode (+3%) and 4% slower under
        # --compile, where inductor fuses the scale and the sum into the GEMM's epilogue anyway.
        update = (x @ a.T) @ b.T * self.scale
        if self.recording:
            self.update = update
        return out + update


def _where(model: nn.Module) -> str:
    """'<base folder>: ' for error messages (transformers keeps the folder a model came from)."""
    folder = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return f"{folder}: " if folder else ""


def _check_site(model: nn.Module, adapter: Adapter, site: Site) -> nn.Module:
    try:
        return _checked_site(model, adapter, site)
    except ShareportError as exc:
        raise ShareportError(f"{_where(model)}{exc}") from None


def _checked_site(model: nn.Module, adapter: Adapter, site: Site) -> nn.Module:
    module = get_module(model, site.path)
    if isinstance(module, LoRALinear):
        raise ShareportError(f"module '{site.path}' already has an adapter attached")
    expected = adapter.shape(site.path)
    actual = weight_shape(module, site.path, adapter.fan_in_fan_out)
    if expected != actual:
        raise ShareportError(
            f"site '{site.path}': adapter update is {expected[0]}x{expected[1]} but the base module is "
            f"{actual[0]}x{actual[1]} (adapter made for another model?)"
        )
    return module


@dataclasses.dataclass
class Attached:
    """Handle on an adapter attached to a model: its parameters, and how to take it off."""

    model: nn.Module
    adapter: Adapter
    parameters: dict[str, nn.Parameter]  # pool name -> the one parameter object
    wrappers: dict[str, LoRALinear]  # site path -> wrapper

    def set_enabled(self, enabled: bool) -> None:
        for w in self.wrappers.values():
            w.enabled = enabled

    def to_adapter(self, replaced: dict[str, torch.Tensor] | None = None) -> Adapter:
        """The adapter with the attached parameters' current values (e.g. after training), or the
        tensors in ``replaced`` for the names it holds (a parameter that trains a stand-in, e.g. a core)."""
        replaced = replaced or {}
        tensors = {
            n: replaced[n] if n in replaced else p.detach().to("cpu", torch.float32).clone()
            for n, p in self.parameters.items()
        }
        return self.adapter.with_sites(tensors, dict(self.adapter.sites), self.adapter.form)

    def detach(self) -> nn.Module:
        """Put the original modules back; return the model."""
        for path, wrapper in self.wrappers.items():
            swap_module(self.model, path, wrapper.base)
        self.wrappers = {}
        return self.model


def attach(model: nn.Module, adapter: Adapter, trainable: bool = False, dtype: torch.dtype | None = None) -> Attached:
    """Wrap every adapted module of ``model``; shared factors become one parameter each.

    Checks every site before changing anything, so a bad adapter leaves the model untouched.
    """
    modules = {path: _check_site(model, adapter, site) for path, site in sorted(adapter.sites.items())}
    device = next(model.parameters()).device
    param_dtype = dtype or next(model.parameters()).dtype
    parameters = {
        name: nn.Parameter(adapter.tensors[name].to(device, param_dtype).clone(), requires_grad=trainable)
        for name in adapter.used_tensor_names()
    }
    wrappers = {}
    for path, module in modules.items():
        site = adapter.sites[path]
        wrappers[path] = LoRALinear(module, parameters[site.a], parameters[site.b], site.scale)
        swap_module(model, path, wrappers[path])
    _load_extras(model, adapter)
    return Attached(model, adapter, parameters, wrappers)


def _load_extras(model: nn.Module, adapter: Adapter) -> None:
    """Copy carried ``modules_to_save`` tensors (e.g. a classifier head) into the model."""
    if not adapter.extra_tensors:
        return
    state = model.state_dict()
    for key, value in sorted(adapter.extra_tensors.items()):
        name = carried_parameter_name(key)
        if name not in state:
            raise ShareportError(
                f"{_where(model)}carried tensor '{key}' has no matching parameter '{name}' in the base model"
            )
        if state[name].shape != value.shape:
            raise ShareportError(
                f"{_where(model)}carried tensor '{key}' has shape {tuple(value.shape)}, the base model's is "
                f"{tuple(state[name].shape)}"
            )
        with torch.no_grad():
            state[name].copy_(value.to(state[name].dtype))


def fold(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Merge the adapter into the base weights in place: ``W += scale * B @ A``."""
    modules = {path: _check_site(model, adapter, site) for path, site in sorted(adapter.sites.items())}
    with torch.no_grad():
        for path, module in modules.items():
            delta = adapter.update(path, torch.float32)
            if is_conv1d(module) or adapter.fan_in_fan_out:
                delta = delta.T  # (n_out, n_in) -> the stored (n_in, n_out)
            module.weight.add_(delta.to(module.weight.device, module.weight.dtype))
    _load_extras(model, adapter)
    return model
