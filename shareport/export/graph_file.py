"""The exported folder: graph, its metadata, overridable adapter inputs, side files.

The graph is post-processed as an ``onnx_ir`` model (what ``torch.onnx`` produces), which has
no 2 GB protobuf limit in memory; over that size the weights are saved as external data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx

from ..errors import ShareportError

GRAPH_NAME = "model.onnx"
DATA_NAME = "model.onnx_data"
ADAPTER_NAME = "adapter.onnx_adapter"
# a fleet member's export also holds one "<member>.onnx_adapter" per member of its fleet
INFO_KEY = "shareport.export"
# protobuf cannot serialise a message over 2 GiB; leave room for the graph itself
EXTERNAL_DATA_BYTES = 1_800_000_000
# files a runtime needs next to the graph (config and tokenizer), copied when BASE_DIR has them
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
# what ``shareport generate`` loads a tokenizer from (onnxruntime-genai reads tokenizer.json): a folder
# without either cannot turn text into token ids
TOKENIZER_NEEDED = ("tokenizer.json", "tokenizer_config.json")


def tokenizer_warning(base_dir: str | Path, copied: list[str]) -> str | None:
    """The warning for an export whose base gave no tokenizer files (None where it gave one).

    Not a refusal: a graph for an app that tokenizes text itself needs none."""
    if any(name in copied for name in TOKENIZER_NEEDED):
        return None
    return (
        f"{base_dir} has no tokenizer files ({' or '.join(TOKENIZER_NEEDED)}), so the export holds no "
        "tokenizer: 'shareport generate' and onnxruntime-genai cannot tokenize text with it; put the "
        "base model's tokenizer files in that folder and export again (an app that tokenizes text "
        "itself can use the graph as it is)"
    )


def member_adapter_name(member: str) -> str:
    return f"{member}.onnx_adapter"


def make_overridable(ir_model, defaults: dict[str, np.ndarray]) -> None:
    """Give each named graph input an initializer of the same name (ORT's adapter slots)."""
    import onnx_ir as ir

    graph = ir_model.graph
    inputs = {v.name: v for v in graph.inputs}
    for name, array in defaults.items():
        value = inputs[name]
        value.const_value = ir.tensor(np.ascontiguousarray(array), name=name)
        graph.register_initializer(value)


def strip_debug(ir_model) -> None:
    """Drop what torch's exporter records about how it traced the graph: per node the stack trace
    (absolute paths, line numbers and source text of shareport's and transformers' files), module
    names and FX nodes; per value and graph the original names and torch.export's signature; doc
    strings. None of it is read by a runtime, and it made the same inputs give other bytes from
    another install path or after an edit that moved lines. The model's own metadata (ours) stays."""
    import onnx_ir as ir

    graphs = [ir_model.graph, *ir_model.functions.values()]
    seen: list = []
    for graph in graphs:
        values = [*graph.inputs, *graph.outputs, *getattr(graph, "initializers", {}).values()]
        for node in ir.traversal.RecursiveGraphIterator(graph):
            _clear(node)
            values += [*node.inputs, *node.outputs]
            if node.graph is not None and all(node.graph is not g for g in seen):
                seen.append(node.graph)  # a subgraph's own metadata, as the top graph's
        for value in values:
            if value is not None:
                _clear(value)
        _clear(graph)
    for graph in seen:
        _clear(graph)


def _clear(item) -> None:
    item.metadata_props.clear()
    item.doc_string = None


def save_graph(ir_model, folder: Path, info: dict) -> Path:
    """Write ``model.onnx`` (plus ``model.onnx_data`` when the weights are too big for one file),
    without the exporter's debug records (:func:`strip_debug`), so the bytes depend on the inputs only."""
    import onnx_ir as ir

    strip_debug(ir_model)
    ir_model.metadata_props[INFO_KEY] = json.dumps(info, sort_keys=True)
    weight_bytes = sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)
    path = folder / GRAPH_NAME
    ir.save(ir_model, path, external_data=DATA_NAME if weight_bytes > EXTERNAL_DATA_BYTES else None)
    return path


def load_proto(folder: str | Path) -> onnx.ModelProto:
    """The graph without its weights (enough for names, shapes and metadata)."""
    path = Path(folder) / GRAPH_NAME
    if not path.is_file():
        raise ShareportError(f"{folder}: no {GRAPH_NAME} (not a folder written by 'shareport export')")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise ShareportError(f"{path}: cannot read the ONNX graph ({str(exc).splitlines()[0]})") from None


def read_info(proto: onnx.ModelProto, folder: str | Path) -> dict:
    for prop in proto.metadata_props:
        if prop.key == INFO_KEY:
            return json.loads(prop.value)
    raise ShareportError(f"{folder}/{GRAPH_NAME}: no shareport metadata (not written by 'shareport export')")


def graph_slots(proto: onnx.ModelProto) -> dict[str, tuple[np.dtype, tuple]]:
    """Overridable initializers: name -> (numpy dtype, shape with dim names for symbolic dims)."""
    initializers = {i.name for i in proto.graph.initializer}
    slots = {}
    for inp in proto.graph.input:
        if inp.name not in initializers:
            continue
        tensor_type = inp.type.tensor_type
        shape = tuple(d.dim_param or d.dim_value for d in tensor_type.shape.dim)
        slots[inp.name] = (np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)), shape)
    return slots


def copy_side_files(base_dir: str | Path, folder: Path, use_cache: bool | None = None) -> list[str]:
    """Copy config and tokenizer files so the folder is self-contained; return their names.

    Copies are adjusted so other runtimes load the folder: for a decoder (``use_cache`` not None),
    ``config.json`` and ``generation_config.json`` say ``use_cache`` as the graph does (Optimum reads
    a decoder without past as ``use_cache: false``, and generation would ask for a cache) and
    ``tokenizer_config.json`` names the graph's text inputs as ``model_input_names`` (a fast
    tokenizer otherwise returns ``token_type_ids``, which a decoder graph has no input for); a
    ``tokenizer_config.json`` naming transformers 5's ``TokenizersBackend`` (unknown to
    transformers 4.x) names ``PreTrainedTokenizerFast``, which loads the same ``tokenizer.json`` in both.
    """
    copied = []
    for name in SIDE_FILES:
        source = Path(base_dir) / name
        if source.is_file():
            shutil.copy2(source, folder / name)
            copied.append(name)
    if use_cache is not None:
        for name in ("config.json", "generation_config.json"):
            if name in copied:
                _edit_json(folder / name, {"use_cache": use_cache})
        if "tokenizer_config.json" in copied:
            _edit_json(folder / "tokenizer_config.json", {"model_input_names": list(DECODER_TEXT_INPUTS)})
    if "tokenizer_config.json" in copied and "tokenizer.json" in copied:
        _edit_json(
            folder / "tokenizer_config.json",
            {"tokenizer_class": PORTABLE_TOKENIZER},
            only_if=("tokenizer_class", NEW_TOKENIZER),
        )
    return copied


DECODER_TEXT_INPUTS = ("input_ids", "attention_mask")  # what a decoder's tokenizer gives its graph
NEW_TOKENIZER = "TokenizersBackend"  # transformers 5's class for a plain tokenizer.json
PORTABLE_TOKENIZER = "PreTrainedTokenizerFast"


def _edit_json(path: Path, changes: dict, only_if: tuple[str, object] | None = None) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # not ours to repair: the file is copied as it was
    if not isinstance(data, dict) or (only_if and data.get(only_if[0]) != only_if[1]):
        return
    data.update(changes)
    path.unlink()  # a copy of a read-only file is read-only too
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
