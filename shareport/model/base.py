"""The base model: loading it from a folder, what task its class serves, and module access by path.

One table (``TASKS``) maps a transformers class-name suffix to its PEFT task type and Auto
class; every question "is this a causal LM / which Auto class / which task type" is answered
from it, so adding a task is one row.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ShareportError

# (class-name suffix, PEFT task type, transformers Auto class); first match wins
TASKS = (
    ("ForCausalLM", "CAUSAL_LM", "AutoModelForCausalLM"),
    ("LMHeadModel", "CAUSAL_LM", "AutoModelForCausalLM"),
    ("ForSequenceClassification", "SEQ_CLS", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "TOKEN_CLS", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "QUESTION_ANS", "AutoModelForQuestionAnswering"),
)
# PEFT task types an adapter config may name that no class suffix above identifies
OTHER_TASKS = {"SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "FEATURE_EXTRACTION": "AutoModel"}


def task_of_class_name(name: str) -> str | None:
    """PEFT task type of a transformers class name (None for a bare model such as BertModel)."""
    return next((task for suffix, task, _ in TASKS if name.endswith(suffix)), None)


def task_type_of(model: nn.Module) -> str | None:
    return task_of_class_name(type(model).__name__)


def is_causal_lm(model: nn.Module) -> bool:
    return task_type_of(model) == "CAUSAL_LM"


def auto_class_name(task_type: str | None, config) -> str:
    """The Auto class for a base model: from the adapter's task type, else from the config."""
    if task_type:
        autos = {**{task: auto for _, task, auto in TASKS}, **OTHER_TASKS}
        if task_type not in autos:
            known = sorted(autos)
            raise ShareportError(f"task type '{task_type}' is not supported (known: {', '.join(known)})")
        return autos[task_type]
    for arch in getattr(config, "architectures", None) or []:
        for suffix, _, auto in TASKS:
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


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ShareportError(f"the base model has no module '{path}' (adapter made for another architecture?)") from None


def swap_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``path`` inside ``model``; return the module it replaced (like PEFT's
    ``_get_submodules`` + ``setattr``)."""
    parent, _, leaf = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, leaf)
    setattr(owner, leaf, new)
    return old


def weight_shape(module: nn.Module, path: str, fan_in_fan_out: bool = False) -> tuple[int, int]:
    """(n_out, n_in) of a linear-like module; Conv1D stores its weight as (n_in, n_out)."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ShareportError(f"module '{path}' is a {type(module).__name__}, not a linear layer")
    n0, n1 = weight.shape
    return (n1, n0) if (is_conv1d(module) or fan_in_fan_out) else (n0, n1)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored transposed, (n_in, n_out)."""
    return type(module).__name__ == "Conv1D"
