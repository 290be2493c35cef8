"""The base model: loading it from a folder, what task its class serves, and module access by path.

One table (``TASKS``) maps a transformers class-name suffix to its PEFT task type and Auto
class; every question "is this a causal LM / which Auto class / which task type" is answered
from it, so adding a task is one row.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..adapter import carried_parameter_name
from ..errors import ShareportError, note

# (class-name suffix, PEFT task type, transformers Auto class); first match wins
CAUSAL_LM_CLASS = "AutoModelForCausalLM"
TASKS = (
    ("ForCausalLM", "CAUSAL_LM", CAUSAL_LM_CLASS),
    ("LMHeadModel", "CAUSAL_LM", CAUSAL_LM_CLASS),
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


# carried head weights whose first dimension is the number of labels
HEAD_WEIGHTS = ("classifier.weight", "classifier.out_proj.weight", "score.weight")


def head_labels(carried: Mapping[str, torch.Tensor], config) -> int | None:
    """The number of labels a carried classifier head has, when the base config says otherwise.

    A classification LoRA carries its head (PEFT ``modules_to_save``); the stock encoder folder
    it was trained on usually has no ``num_labels`` (transformers' default is 2), so the base
    must be built with the head's size or the head cannot be loaded.
    """
    for key, value in sorted(carried.items()):
        if carried_parameter_name(key).endswith(HEAD_WEIGHTS) and value.dim() == 2:
            labels = int(value.shape[0])
            return labels if labels != getattr(config, "num_labels", labels) else None
    return None


def read_base_config(base_dir: str | os.PathLike):
    """The base folder's transformers config: cheap, so commands check the base before any output."""
    import transformers

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise ShareportError(f"{base_dir}: not a transformers model folder (no config.json)")
    try:
        return transformers.AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
    except Exception as exc:
        raise ShareportError(f"{base_dir}/config.json: cannot read model config ({str(exc).splitlines()[0]})") from None


def load_base_model(
    base_dir: str | os.PathLike,
    task_type: str | None = None,
    dtype: torch.dtype = torch.float32,
    carried: Mapping[str, torch.Tensor] | None = None,
):
    """Load a transformers model from a local folder (never from a hub), in eval mode.

    ``carried``: the adapter's ``modules_to_save`` tensors. A classifier head among them sets
    the number of labels (said in one line), and weights the base lacks but the adapter
    supplies are not reported as newly initialised; any other missing weight is.
    """
    base_dir = Path(base_dir)
    auto, config = _auto_and_config(base_dir, task_type, carried or {})
    try:
        with _quiet_transformers():
            model, info = auto.from_pretrained(
                str(base_dir),
                config=config,
                local_files_only=True,
                dtype=dtype,
                use_safetensors=True,
                output_loading_info=True,
            )
    except Exception as exc:
        raise ShareportError(f"{base_dir}: cannot load the base model ({str(exc).splitlines()[0]})") from None
    supplied = {carried_parameter_name(k) for k in carried or {}}
    missing = sorted(set(info.get("missing_keys", ())) - supplied)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        note(f"{base_dir}: '{missing[0]}'{more} not in the checkpoint, newly initialised")
    return model.eval()


def empty_base_model(
    base_dir: str | os.PathLike,
    task_type: str | None = None,
    dtype: torch.dtype = torch.float32,
    carried: Mapping[str, torch.Tensor] | None = None,
):
    """The model :func:`load_base_model` would load, with no weight read: its parameters are on the
    meta device (shapes and dtypes only), its buffers (e.g. rotary frequencies, which no checkpoint
    holds) computed as usual. For a caller that places each weight itself (``shareport.train.accel``
    loads one shard of each per process); :func:`checkpoint_name` finds a parameter in the file."""
    from accelerate import init_empty_weights

    base_dir = Path(base_dir)
    auto, config = _auto_and_config(base_dir, task_type, carried or {})
    try:
        with _quiet_transformers(), init_empty_weights(include_buffers=False):
            model = auto.from_config(config, dtype=dtype)
        # outside the context: there, every parameter set is replaced by a new one on meta, which unties
        # a tied head (saved once, as the input embeddings)
        model.tie_weights()
    except Exception as exc:
        raise ShareportError(f"{base_dir}: cannot build the base model ({str(exc).splitlines()[0]})") from None
    return model.eval()


def checkpoint_name(model: nn.Module, name: str, keys) -> str | None:
    """The key of ``model``'s parameter or buffer ``name`` among a checkpoint's ``keys`` (None if absent):
    the name itself, else with the base model's prefix added or dropped (a bare ``BertModel`` checkpoint
    under ``BertForSequenceClassification`` names ``bert.x`` as ``x``), as transformers matches them."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [name]
    if prefix:
        candidates += [name[len(prefix) + 1 :]] if name.startswith(prefix + ".") else [f"{prefix}.{name}"]
    return next((key for key in candidates if key in keys), None)


def _auto_and_config(base_dir: Path, task_type: str | None, carried: Mapping[str, torch.Tensor]):
    """(transformers Auto class, config) for the base: the number of labels set by a carried head."""
    import transformers

    config = read_base_config(base_dir)
    labels = head_labels(carried, config)
    if labels is not None:
        note(
            f"{base_dir}: the adapter's classifier head has {labels} labels, the base config "
            f"{config.num_labels}; building the base with num_labels={labels}"
        )
        config.num_labels = labels
    return getattr(transformers, auto_class_name(task_type, config)), config


@contextlib.contextmanager
def _quiet_transformers():
    """transformers reports every weight it had to initialise; shareport reports only those
    the adapter does not supply (above), in one line. Its loading bar is off too."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with shareport's own
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ShareportError(
            f"the base model has no module '{path}' (adapter made for another architecture?)"
        ) from None


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
