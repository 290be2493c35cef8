"""Model surgery: load a base model, attach any adapter form, fold it in, take it off.

Attaching replaces each adapted module by a :class:`LoRALinear` wrapper that computes
``base(x) + scale * (x A^T) B^T``. Factors that the adapter shares are the *same*
``nn.Parameter`` object in every wrapper that uses them, so a shared A is one parameter,
counted once by ``model.parameters()``, and its gradient is the sum over the sites that use it.
Folding writes ``W += dW`` (transposed for GPT-2's Conv1D, which stores W as (in, out)).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from ..adapter import Adapter, Site
from ..errors import ShareportError
from ..files.peft import PEFT_PREFIX

# PEFT task types -> transformers Auto classes.
_AUTO_FOR_TASK = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}


def auto_class_name(task_type: str | None, config) -> str:
    """The Auto class for a base model: from the adapter's task type, else from the config."""
    if task_type:
        if task_type not in _AUTO_FOR_TASK:
            raise ShareportError(f"task type '{task_type}' is not supported (known: {', '.join(sorted(_AUTO_FOR_TASK))})")
        return _AUTO_FOR_TASK[task_type]
    for arch in getattr(config, "architectures", None) or []:
        for suffix, auto in (
            ("ForCausalLM", "AutoModelForCausalLM"),
            ("LMHeadModel", "AutoModelForCausalLM"),
            ("ForSequenceClassification", "AutoModelForSequenceClassification"),
            ("ForTokenClassification", "AutoModelForTokenClassification"),
            ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
        ):
            if arch.endswith(suffix):
                return auto
    return "AutoModel"


def load_base_model(base_dir: str | os.PathLike, task_type: str | None = None, dtype: torch.dtype = torch.float32):
    """Load a transformers model from a local folder (never from a hub), in eval mode."""
    import transformers

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise ShareportError(f"{base_dir}: not a transformers model folder (no config.json)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
    except Exception as exc:
        raise ShareportError(f"{base_dir}/config.json: cannot read model config ({str(exc).splitlines()[0]})") from None
    auto = getattr(transformers, auto_class_name(task_type, config))
    try:
        model = auto.from_pretrained(str(base_dir), local_files_only=True, dtype=dtype, use_safetensors=True)
    except Exception as exc:
        raise ShareportError(f"{base_dir}: cannot load the base model ({str(exc).splitlines()[0]})") from None
    return model.eval()


class LoRALinear(nn.Module):
    """A linear (or Conv1D) layer plus ``scale * (x A^T) B^T``; A and B may be shared."""

    def __init__(self, base: nn.Module, lora_A: nn.Parameter, lora_B: nn.Parameter, scale: float):
        super().__init__()
        self.base = base
        self.lora_A = lora_A  # (r, n_in); the same object in every site that shares it
        self.lora_B = lora_B  # (n_out, r)
        self.scale = scale
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        a, b = self.lora_A, self.lora_B
        if a.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            a, b = a.to(x.dtype), b.to(x.dtype)
        return out + (x @ a.T) @ b.T * self.scale


def _get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ShareportError(f"the base model has no module '{path}' (adapter made for another architecture?)") from None


def _weight_shape(module: nn.Module, path: str, fan_in_fan_out: bool) -> tuple[int, int]:
    """(n_out, n_in) of a linear-like module; Conv1D stores its weight as (n_in, n_out)."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ShareportError(f"module '{path}' is a {type(module).__name__}, not a linear layer")
    is_conv1d = type(module).__name__ == "Conv1D"
    n0, n1 = weight.shape
    return (n1, n0) if (is_conv1d or fan_in_fan_out) else (n0, n1)


def _check_site(model: nn.Module, adapter: Adapter, site: Site) -> nn.Module:
    module = _get_module(model, site.path)
    if isinstance(module, LoRALinear):
        raise ShareportError(f"module '{site.path}' already has an adapter attached")
    expected = adapter.shape(site.path)
    actual = _weight_shape(module, site.path, adapter.fan_in_fan_out)
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

    def to_adapter(self) -> Adapter:
        """The adapter with the attached parameters' current values (e.g. after training)."""
        tensors = {n: p.detach().to("cpu", torch.float32).clone() for n, p in self.parameters.items()}
        return self.adapter.with_sites(tensors, dict(self.adapter.sites), self.adapter.form)

    def detach(self) -> nn.Module:
        """Put the original modules back; return the model."""
        for path, wrapper in self.wrappers.items():
            parent, _, leaf = path.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, leaf, wrapper.base)
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
        wrapper = LoRALinear(module, parameters[site.a], parameters[site.b], site.scale)
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, wrapper)
        wrappers[path] = wrapper
    _load_extras(model, adapter)
    return Attached(model, adapter, parameters, wrappers)


def _load_extras(model: nn.Module, adapter: Adapter) -> None:
    """Copy carried ``modules_to_save`` tensors (e.g. a classifier head) into the model."""
    if not adapter.extra_tensors:
        return
    state = model.state_dict()
    for key, value in sorted(adapter.extra_tensors.items()):
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        name = name.replace(".modules_to_save.default.", ".")
        if name not in state:
            raise ShareportError(f"carried tensor '{key}' has no matching parameter '{name}' in the base model")
        if state[name].shape != value.shape:
            raise ShareportError(
                f"carried tensor '{key}' has shape {tuple(value.shape)}, the base model's is {tuple(state[name].shape)}"
            )
        with torch.no_grad():
            state[name].copy_(value.to(state[name].dtype))


def fold(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Merge the adapter into the base weights in place: ``W += scale * B @ A``."""
    modules = {path: _check_site(model, adapter, site) for path, site in sorted(adapter.sites.items())}
    with torch.no_grad():
        for path, module in modules.items():
            delta = adapter.update(path, torch.float32)
            if type(module).__name__ == "Conv1D" or adapter.fan_in_fan_out:
                delta = delta.T
            module.weight.add_(delta.to(module.weight.device, module.weight.dtype))
    _load_extras(model, adapter)
    return model
