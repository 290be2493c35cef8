"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint folder (written atomically, replacing the previous one) holds

- the adapter in the native format (``adapter_config.json`` + ``adapter_model.safetensors``):
  its current values *and* its current site map, i.e. the ASLoRA grouping so far;
- ``trainer_state.safetensors``: optimizer state tensors as ``optim/<pool name>/<key>``, the
  ASLoRA running averages as ``average/<pool name>``, RNG states as ``rng/...``;
- ``trainer_state.json``: the step, the data position, the recipe it was started with, the
  optimizer's hyperparameters, the merge log and the evaluation taken before training.

Optimizer state is keyed by pool name, not by position, so it survives merges that remove
parameters from the optimizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..adapter import Adapter
from ..errors import ShareportError
from ..files.adapters import load_adapter, write_adapter_files
from ..files.atomic import atomic_dir
from ..files.folder import dump_json
from ..files.tensorfile import load_tensors, save_tensors
from .accel import unwrap_optimizer

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
FORMAT = "shareport-checkpoint-1"


def optimizer_state(optimizer, parameters: dict[str, torch.nn.Parameter]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(hyperparameters, state tensors by pool name) of a one-group optimizer."""
    opt = unwrap_optimizer(optimizer)
    group = opt.param_groups[0]
    hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
    tensors = {}
    for name, param in parameters.items():
        for key, value in opt.state.get(param, {}).items():
            if not torch.is_tensor(value):
                raise ShareportError(f"optimizer state '{key}' is not a tensor; cannot checkpoint it")
            tensors[f"optim/{name}/{key}"] = value
    return hyper, tensors


def load_optimizer_state(
    optimizer, parameters: dict[str, torch.nn.Parameter], hyper: dict, tensors: dict[str, torch.Tensor]
) -> None:
    opt = unwrap_optimizer(optimizer)
    group = opt.param_groups[0]
    for key, value in hyper.items():
        group[key] = tuple(value) if isinstance(group.get(key), tuple) else value
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            name, _, field = key[len("optim/") :].rpartition("/")
            by_param.setdefault(name, {})[field] = value
    unknown = sorted(set(by_param) - set(parameters))
    if unknown:
        raise ShareportError(f"checkpoint has optimizer state for '{unknown[0]}', which the adapter does not hold")
    for name, fields in by_param.items():
        param = parameters[name]
        # Adam keeps its step counter on the CPU (fused Adam: beside the parameter); moments beside it.
        fused = bool(group.get("fused"))
        opt.state[param] = {k: (v.to(param.device) if v.dim() or fused else v.clone()) for k, v in fields.items()}


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng/torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng/cuda/{i}"] = state
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng/torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(folder: str | os.PathLike, adapter: Adapter, state: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Replace ``folder`` with a complete checkpoint (never a half-written one)."""
    with atomic_dir(folder, overwrite=True) as tmp:
        write_adapter_files(adapter, tmp, as_peft=False)
        save_tensors({**tensors, **rng_tensors()}, tmp / STATE_TENSORS)
        (tmp / STATE_JSON).write_text(dump_json({"format": FORMAT, **state}), encoding="utf-8")


def load_checkpoint(folder: str | os.PathLike) -> tuple[Adapter, dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    if not (folder / STATE_JSON).is_file():
        raise ShareportError(f"{folder}: no checkpoint to resume from ({STATE_JSON} not found)")
    try:
        state = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ShareportError(f"{folder / STATE_JSON}: not valid JSON ({exc.msg})") from None
    if state.get("format") != FORMAT:
        raise ShareportError(f"{folder / STATE_JSON}: not a {FORMAT} checkpoint")
    return load_adapter(folder), state, load_tensors(folder / STATE_TENSORS)


# recipe keys added after checkpoints were first written, with the value every run had before the key
# existed: a checkpoint without one was made with that value (and resumes with it)
ADDED_RECIPE_KEYS = {"group_by_length": False}


def check_same_recipe(saved: dict, current: dict, folder: str | os.PathLike) -> None:
    """A resumed run must be the run that was interrupted; only its length may change."""
    for key in sorted(set(saved) | set(current)):
        if key in ("steps", "checkpoint_every"):
            continue
        made_with = saved.get(key, ADDED_RECIPE_KEYS.get(key))
        if made_with != current.get(key):
            raise ShareportError(
                f"{folder}: checkpoint was made with {key}={made_with!r}, this run has {current.get(key)!r}; "
                "resume with the same options"
            )
