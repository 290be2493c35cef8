"""The module ``torch.onnx.export`` traces: flat tensors in, flat tensors out.

A with-past decoder takes its cache as ``past_key_values.{i}.key/value`` tensors; the wrapper
builds a ``DynamicCache`` from them inside ``forward`` (the exporter cannot take a cache object)
and returns the updated cache as flat ``present`` tensors.

In adapter mode every adapter tensor is an extra input. Forward hooks on the adapted modules add
``(x @ A_g) @ B_g`` (see ``slots``) with the tensors of the current call, so the base model keeps
its modules and parameter names, and a tensor shared by many sites is one input read by all.
A fleet member's shared basis is no input: ``constants`` become buffers of the wrapper (constant
initializers of the graph) and its sites multiply along longer chains (``slots.FleetLayout``).
``carried`` inputs (a fleet's differing heads, see ``carried``) replace the model's parameters of the
same names for the call (``torch.func.functional_call``), so the parameters themselves go unused.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .signature import Signature


def call_model(
    model: nn.Module, sig: Signature, inputs: dict[str, torch.Tensor], overrides: dict[str, torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Run ``model`` on graph-named inputs; return the graph's outputs in order. ``overrides``: parameter
    name -> tensor used in its place for this call."""
    kwargs = {name: inputs[name] for name in sig.model_inputs}
    if sig.decoder:
        kwargs["use_cache"] = sig.with_past
    if sig.with_past:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        for i in range(sig.num_layers):
            cache.update(inputs[f"past_key_values.{i}.key"], inputs[f"past_key_values.{i}.value"], i)
        kwargs["past_key_values"] = cache
    out = torch.func.functional_call(model, overrides, (), kwargs) if overrides else model(**kwargs)
    result = [out[sig.output]]
    if sig.with_past:
        for layer in out.past_key_values.layers:
            result += [layer.keys, layer.values]
    return result


class GraphModule(nn.Module):
    """``forward(*graph_inputs)`` -> graph outputs; adapter tensors (if any) come last."""

    def __init__(
        self,
        model: nn.Module,
        sig: Signature,
        slot_names: list[str],
        current: dict,
        constants: dict[str, torch.Tensor] | None = None,
        carried: frozenset = frozenset(),
    ):
        super().__init__()
        self.model = model
        self.constant_names = {}  # tensor name -> buffer name (buffer names cannot hold dots)
        for i, (name, value) in enumerate(sorted((constants or {}).items())):
            self.constant_names[name] = f"shared_{i}"
            self.register_buffer(f"shared_{i}", value.contiguous())
        self.sig = sig
        self.input_names = [*sig.input_names, *slot_names]
        self.carried = carried  # inputs that stand in for the model's parameters of the same names
        self._current = current  # read by the adapter hooks during forward

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = dict(zip(self.input_names, flat))
        self._current.update({n: inputs[n] for n in self.input_names[len(self.sig.input_names) :]})
        try:
            return tuple(call_model(self.model, self.sig, inputs, {n: inputs[n] for n in sorted(self.carried)}))
        finally:
            self._current.clear()


@contextlib.contextmanager
def graph_module(
    model: nn.Module,
    sig: Signature,
    wiring: dict[str, tuple[str, ...]] | None = None,
    constants: dict[str, torch.Tensor] | None = None,
    carried=(),
) -> Iterator[GraphModule]:
    """A ``GraphModule`` over ``model``; ``wiring`` maps site path -> (A slot, B slot), or a longer
    chain of names, some of them ``constants`` (a fleet's shared basis, in the graph layout);
    ``carried`` names parameters of ``model`` that become inputs too.

    Hooks are removed on exit, so the model is left as it was.
    """
    wiring, constants = wiring or {}, constants or {}
    current: dict[str, torch.Tensor] = {}
    slot_names = sorted(({n for chain in wiring.values() for n in chain} - set(constants)) | set(carried))
    module = GraphModule(model, sig, slot_names, current, constants, frozenset(carried))

    def hook_for(chain: tuple[str, ...]):
        def add_update(_, args, output):
            update = args[0]
            for name in chain:
                update = update @ (getattr(module, module.constant_names[name]) if name in constants else current[name])
            return output + update

        return add_update

    handles = [
        model.get_submodule(path).register_forward_hook(hook_for(chain)) for path, chain in sorted(wiring.items())
    ]
    try:
        yield module
    finally:
        for handle in handles:
            handle.remove()
