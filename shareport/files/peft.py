"""PEFT LoRA folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

``load(folder)`` reads one into an :class:`Adapter`; ``dump(adapter)`` gives the config and
tensors of a plain LoRA (the native module has the same two verbs).

Reading turns every ``<path>.lora_A.weight`` / ``<path>.lora_B.weight`` pair into a site whose
scale follows PEFT's rules (``lora_alpha / r``, ``/ sqrt(r)`` with rsLoRA, per-module
``rank_pattern`` / ``alpha_pattern``). Writing produces a plain LoRA that
``peft.PeftModel.from_pretrained`` loads with the same outputs: ranks and scales that differ
from the common one are written as per-module patterns, and ``target_modules`` is an exact
regex of the adapted paths, so nothing else in the model gets a LoRA.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections import Counter
from pathlib import Path

import torch

from ..adapter import PEFT_PREFIX, UNKNOWN_LAYOUT, Adapter, kinds_for_paths
from ..errors import ShareportError
from .folder import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, read_config
from .tensorfile import StreamedTensors, check_finite, check_floating, load_pickled, load_tensors

# Config fields that change what the adapter computes and that shareport cannot represent.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
}
_UNSUPPORTED_VALUES = {
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
}
_FACTOR_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


def _field(config: dict, path: Path, name: str, types: tuple, default):
    value = config.get(name, default)
    if value is None:
        return default
    # bool is an int in Python; a rank of `true` is still wrong.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        expected = " or ".join(t.__name__ for t in types)
        raise ShareportError(f"{path}: field '{name}' must be {expected}, got {value!r}")
    return value


def _check_items(path: Path, name: str, value, types: tuple) -> None:
    """Every element of a list, or every value of a dict, must have one of ``types``."""
    items = value.values() if isinstance(value, dict) else value
    for item in items:
        if not isinstance(item, types) or (isinstance(item, bool) and bool not in types):
            raise ShareportError(
                f"{path}: field '{name}' holds {item!r}, expected {' or '.join(t.__name__ for t in types)}"
            )
    if isinstance(value, dict):
        for key in value:
            try:
                re.compile(key)
            except re.error as exc:
                raise ShareportError(f"{path}: field '{name}' has an invalid pattern {key!r} ({exc})") from None


def pattern_value(patterns: dict, path: str, default):
    """PEFT's rule: the first pattern that matches the end of the module path wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _check_supported(config: dict, cfg_path: Path) -> None:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ShareportError(f"{cfg_path}: peft_type '{peft_type}' is not supported (only LORA)")
    for flag, name in _UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise ShareportError(f"{cfg_path}: {name} is not supported: it changes the update beyond B @ A")
    for field, name in _UNSUPPORTED_VALUES.items():
        if config.get(field):
            raise ShareportError(f"{cfg_path}: {name} is not supported")


def load_weights(folder: Path, allow_pickle: bool, stream: bool = False) -> tuple[Path, dict[str, torch.Tensor]]:
    """The adapter's tensors: safetensors (``stream``: a ``StreamedTensors`` mapping that reads each
    tensor from the file's map when asked), or a pickled ``.bin`` only when allowed."""
    st, pkl = folder / WEIGHTS_NAME, folder / PICKLE_NAME
    if st.is_file():
        return st, StreamedTensors(st) if stream and sys.byteorder == "little" else load_tensors(st)
    if pkl.is_file():
        if not allow_pickle:
            raise ShareportError(
                f"{pkl}: only a pickled checkpoint is present; shareport does not unpickle files "
                "unless you pass --allow-pickle (loaded with torch.load(weights_only=True))"
            )
        return pkl, load_pickled(pkl)
    raise ShareportError(f"{st}: missing adapter weights")


def load(folder: str | Path, config: dict | None = None, allow_pickle: bool = False, stream: bool = False) -> Adapter:
    """Read a PEFT LoRA folder into a plain-LoRA :class:`Adapter`.

    ``stream``: the adapter's pool is a ``StreamedTensors`` mapping over the safetensors file, so a
    tensor is read (from the file's map) only when used and not held after; every check below is
    made all the same (header, NaN/Inf one tensor at a time, keys, ranks, shapes)."""
    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    config = read_config(folder) if config is None else config
    _check_supported(config, cfg_path)
    r = _field(config, cfg_path, "r", (int,), 8)
    alpha = _field(config, cfg_path, "lora_alpha", (int, float), 8)
    rank_pattern = _field(config, cfg_path, "rank_pattern", (dict,), {})
    alpha_pattern = _field(config, cfg_path, "alpha_pattern", (dict,), {})
    use_rslora = _field(config, cfg_path, "use_rslora", (bool,), False)
    fan_in_fan_out = _field(config, cfg_path, "fan_in_fan_out", (bool,), False)
    layers = _field(config, cfg_path, "layers_to_transform", (int, list), None)
    _field(config, cfg_path, "task_type", (str,), None)
    _field(config, cfg_path, "base_model_name_or_path", (str,), None)
    if isinstance(layers, int):
        layers = [layers]
    _check_items(cfg_path, "rank_pattern", rank_pattern, (int,))
    _check_items(cfg_path, "alpha_pattern", alpha_pattern, (int, float))
    _check_items(cfg_path, "layers_to_transform", layers or [], (int,))
    if not math.isfinite(alpha) or any(not math.isfinite(v) for v in alpha_pattern.values()):
        raise ShareportError(f"{cfg_path}: lora_alpha values must be finite")

    weights_path, state = load_weights(folder, allow_pickle, stream)
    check_finite(weights_path, state)
    streamed = isinstance(state, StreamedTensors)
    if streamed:
        state.release()  # the check touched every page: let them go
    factors, extras = _split_keys(weights_path, state)
    check_floating(weights_path, state, [key for pair in factors.values() for key in pair.values()])

    out = {}
    kinds = kinds_for_paths(factors)
    if all(layer < 0 for _, layer in kinds.values()):
        raise ShareportError(f"{weights_path}: unknown key layout (e.g. '{min(factors)}'): {UNKNOWN_LAYOUT}")
    for path in sorted(factors):
        pair = factors[path]
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise ShareportError(f"{weights_path}: module '{path}' has no {missing} tensor")
        a, b = state[pair["A"]], state[pair["B"]]
        if a.dim() != 2 or b.dim() != 2:
            raise ShareportError(
                f"{weights_path}: module '{path}' has {a.dim()}-D LoRA factors: convolution LoRA is not supported"
            )
        rank = a.shape[0]  # A/B rank agreement is Adapter.validate's check
        if rank == 0:
            raise ShareportError(f"{weights_path}: module '{path}' has rank 0 (empty LoRA factors)")
        expected = pattern_value(rank_pattern, path, r)
        if rank != expected:
            raise ShareportError(f"{weights_path}: module '{path}' has rank {rank} but {CONFIG_NAME} says r={expected}")
        if layers is not None and kinds[path][1] not in layers:
            raise ShareportError(
                f"{weights_path}: module '{path}' is in layer {kinds[path][1]}, outside layers_to_transform {layers}"
            )
        site_alpha = pattern_value(alpha_pattern, path, alpha)
        scale = site_alpha / (math.sqrt(rank) if use_rslora else rank)
        out[path] = (a, b, scale)

    modules_to_save = _field(config, cfg_path, "modules_to_save", (list,), None)
    _check_items(cfg_path, "modules_to_save", modules_to_save or [], (str,))
    target_modules = _field(config, cfg_path, "target_modules", (list, str), None)
    if isinstance(target_modules, list):
        _check_items(cfg_path, "target_modules", target_modules, (str,))
    kept = {
        k: config[k] for k in ("target_modules", "modules_to_save", "bias", "revision") if config.get(k) is not None
    }
    if modules_to_save is not None:
        kept["modules_to_save"] = sorted(set(modules_to_save))
    adapter = Adapter.from_factors(
        out,
        base_model=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        fan_in_fan_out=fan_in_fan_out,
        extra_tensors=extras,
        config=kept,
    )
    if not streamed:
        return adapter
    # the pool as names -> file keys: nothing read so far is held by the adapter
    keys = dict(sorted((f"{path}.lora_{which}", key) for path, pair in factors.items() for which, key in pair.items()))
    adapter = dataclasses.replace(adapter, tensors=state.renamed(keys))
    adapter.tensors.release()  # validating mapped the pages around each tensor's start
    return adapter


def _split_keys(weights_path: Path, state: dict) -> tuple[dict, dict]:
    """Sort checkpoint keys into LoRA factor keys per module path (``{path: {"A": key, "B": key}}``),
    and carried-through extras (tensors)."""
    factors: dict[str, dict[str, str]] = {}
    extras: dict[str, torch.Tensor] = {}
    for key in sorted(state):
        if "lora_embedding_" in key:
            raise ShareportError(f"{weights_path}: embedding LoRA ('{key}') is not supported")
        if "lora_magnitude_vector" in key:
            raise ShareportError(f"{weights_path}: DoRA ('{key}') is not supported")
        match = _FACTOR_KEY.match(key)
        if match is None:
            if ".lora_" in key:
                raise ShareportError(
                    f"{weights_path}: unsupported LoRA tensor '{key}' (LoRA bias or an unknown variant)"
                )
            extras[key] = state[key]
            continue
        path = match["path"]
        if not path.startswith(PEFT_PREFIX):
            raise ShareportError(f"{weights_path}: unknown key layout '{key}' (PEFT keys start with '{PEFT_PREFIX}')")
        path = path[len(PEFT_PREFIX) :]
        factors.setdefault(path, {})[match["which"]] = key
    if not factors:
        raise ShareportError(f"{weights_path}: no LoRA tensors found (expected keys like '<module>.lora_A.weight')")
    return factors, extras


def dump(adapter: Adapter) -> tuple[dict, dict[str, torch.Tensor]]:
    """The PEFT config and state dict of an adapter written as a plain LoRA.

    Scales are encoded as ``lora_alpha = scale * r`` (no rsLoRA); the most common rank and
    alpha become the defaults and the rest become exact per-module patterns.
    """
    ranks = {p: adapter.rank(p) for p in adapter.sites}
    alphas = {p: adapter.sites[p].scale * ranks[p] for p in adapter.sites}
    r = _most_common(ranks.values())
    alpha = _most_common(alphas.values())
    paths = sorted(adapter.sites)
    config = {
        "peft_type": "LORA",
        "task_type": adapter.task_type,
        "base_model_name_or_path": adapter.base_model,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(p): ranks[p] for p in paths if ranks[p] != r},
        "alpha_pattern": {re.escape(p): alphas[p] for p in paths if alphas[p] != alpha},
        "target_modules": "^(" + "|".join(re.escape(p) for p in paths) + ")$",
        "fan_in_fan_out": adapter.fan_in_fan_out,
        "modules_to_save": adapter.config.get("modules_to_save"),
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "bias": adapter.config.get("bias", "none"),
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_to_transform": None,
    }
    state = {}
    for path in paths:
        site = adapter.sites[path]
        state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = adapter.tensors[site.a]
        state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = adapter.tensors[site.b]
    state.update(adapter.extra_tensors)
    return config, state


def _most_common(values):
    """Most frequent value; ties go to the smallest, so the choice is deterministic."""
    counts = Counter(values)
    best = max(counts.values())
    return min(v for v, c in counts.items() if c == best)
