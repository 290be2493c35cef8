"""``shareport generate``: greedy text from an exported with-past decoder folder.

Two engines run the same folder:

- ``genai``: onnxruntime-genai (``og.Model`` on the folder's ``genai_config.json``), adapters
  through ``og.Adapters`` and ``Generator.set_active_adapter``;
- ``ort``: ONNX Runtime with shareport's own loop: a prefill, then one token per step, feeding
  ``present.*`` back as ``past_key_values.*``; adapters through ``RunOptions``.

``auto`` picks genai where ``onnxruntime_genai`` imports and the folder has its config, else ort.
Both decode greedily (argmax) and stop at ``max_new_tokens`` or an eos token. Text is encoded and
decoded with the folder's tokenizer files through transformers, the same for both engines, so
their tokens can be compared; ``generate_ids`` takes token ids and needs no tokenizer.

Adapters: each ``.onnx_adapter`` given is one run (so several adapters compare side by side);
with none, an adapter-mode folder runs its own ``adapter.onnx_adapter``; ``no_adapter`` runs the
graph without any (the base model, or an ``--embed-adapter`` graph's default).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np

from ..errors import ShareportError
from . import graph_file, runtime
from .choices import ENGINES
from .genai_config import CONFIG_FILES, read_json_object
from .genai_config import FILE_NAME as GENAI_CONFIG
from .ort_adapter import check_fits, match_names, read_onnx_adapter, write_onnx_adapter
from .signature import Signature


@dataclasses.dataclass
class Run:
    adapter: str | None  # the .onnx_adapter file, or None for the graph without one
    tokens: list[int]  # generated ids (without the prompt)
    text: str | None = None
    note: str = ""


def genai_available() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def choose_engine(folder: Path, engine: str) -> str:
    if engine not in ENGINES:
        raise ShareportError(f"unknown engine '{engine}' (expected {', '.join(ENGINES)})")
    has_config = (folder / GENAI_CONFIG).is_file()
    if engine == "genai":
        if not genai_available():
            raise ShareportError("--engine genai needs onnxruntime-genai (see 'shareport doctor')")
        if not has_config:
            raise ShareportError(f"{folder}: no {GENAI_CONFIG} (export with --with-past writes it)")
        return "genai"
    if engine == "auto":
        return "genai" if has_config and genai_available() else "ort"
    return "ort"


def _graph(folder: Path) -> tuple[Signature, dict, dict]:
    proto = graph_file.load_proto(folder)
    info = graph_file.read_info(proto, folder)
    sig = Signature.from_dict(info["signature"])
    if not (sig.decoder and sig.with_past):
        raise ShareportError(
            f"{folder}: generate needs a decoder exported with --with-past "
            "(a graph without past recomputes the whole sequence and genai runs it wrong)"
        )
    return sig, info, graph_file.graph_slots(proto)


def _adapter_plan(folder: Path, info: dict, slots: dict, adapters, no_adapter: bool):
    """[(file or None, arrays or None, note)] per run, every adapter checked against the graph."""
    if adapters and no_adapter:
        raise ShareportError("--adapter and --no-adapter exclude each other")
    if adapters and info["mode"] != "adapter":
        raise ShareportError(f"{folder} is a folded graph: it has no adapter inputs (export with --mode adapter)")
    if not adapters and not no_adapter and (folder / graph_file.ADAPTER_NAME).is_file():
        adapters = [folder / graph_file.ADAPTER_NAME]
    plan = []
    for path in adapters or [None]:
        if path is None:
            plan.append((None, None, ""))
            continue
        if not Path(path).is_file():
            raise ShareportError(f"{path}: no such adapter file")
        arrays, note = match_names(read_onnx_adapter(path), slots, str(path))
        check_fits(arrays, slots, str(path))
        plan.append((str(path), arrays, note))
    return plan


def _eos_ids(folder: Path) -> set[int]:
    """The ids generation stops at: the folder's genai_config.json (the export resolved them), else the
    first eos_token_id in config.json, generation_config.json (an int or a list); none found: no stop."""
    genai = read_json_object(folder / GENAI_CONFIG).get("model")
    sources = [genai] if isinstance(genai, dict) else []
    sources += [read_json_object(folder / name) for name in CONFIG_FILES]
    eos = next((d["eos_token_id"] for d in sources if d.get("eos_token_id") is not None), None)
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return {i for i in ids if isinstance(i, int)}


def ort_greedy(
    sess, sig: Signature, ids: list[int], max_new_tokens: int, past_dtype, lora=None, eos: set[int] = frozenset()
) -> list[int]:
    """Greedy decoding of one sequence with a with-past graph: prefill, then one token per step."""
    past = {n: np.zeros((1, sig.kv_heads, 0, sig.head_dim), past_dtype) for n in sig.past_names}
    step, length, out = np.asarray([ids], np.int64), 0, []
    for _ in range(max_new_tokens):
        n = step.shape[1]
        feeds = {
            "input_ids": step,
            "attention_mask": np.ones((1, length + n), np.int64),
            "position_ids": np.arange(length, length + n, dtype=np.int64)[None],
            **past,
        }
        outputs = runtime.run(sess, feeds, lora)
        token = int(outputs[0][0, -1].argmax())
        out.append(token)
        past = dict(zip(sig.past_names, outputs[1:]))
        length += n
        step = np.asarray([[token]], np.int64)
        if token in eos:
            break
    return out


def _run_ort(folder: Path, sig: Signature, info: dict, plan, ids: list[int], max_new_tokens: int) -> list[Run]:
    sess = runtime.session(folder / graph_file.GRAPH_NAME)
    past_dtype = np.float16 if info["dtype"] == "fp16" else np.float32
    eos = _eos_ids(folder)
    runs = []
    for path, arrays, note in plan:
        lora = runtime.load_lora(arrays) if arrays is not None else None
        runs.append(Run(path, ort_greedy(sess, sig, ids, max_new_tokens, past_dtype, lora, eos), note=note))
    return runs


def _run_genai(folder: Path, plan, ids: list[int], max_new_tokens: int) -> list[Run]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    context = json.loads((folder / GENAI_CONFIG).read_text(encoding="utf-8"))["model"]["context_length"]
    if len(ids) >= context:
        raise ShareportError(f"the prompt has {len(ids)} tokens; {GENAI_CONFIG} allows {context} in all")
    adapters = og.Adapters(model) if any(arrays is not None for _, arrays, _ in plan) else None
    runs = []
    with tempfile.TemporaryDirectory(prefix="shareport-genai-") as tmp:
        for i, (path, arrays, note) in enumerate(plan):
            name = None
            if arrays is not None:
                name = f"adapter{i}"
                mapped = Path(tmp) / f"{name}.onnx_adapter"  # names already mapped to the graph's
                write_onnx_adapter(arrays, mapped)
                adapters.load(str(mapped), name)
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=min(context, len(ids) + max_new_tokens), do_sample=False)
            generator = og.Generator(model, params)
            if name:
                generator.set_active_adapter(adapters, name)
            generator.append_tokens(np.asarray([ids], np.int32))
            while not generator.is_done():
                generator.generate_next_token()
            tokens = [int(t) for t in generator.get_sequence(0)][len(ids) :]
            del generator
            runs.append(Run(path, tokens, note=note))
    return runs


def generate_ids(
    folder, ids: list[int], adapters=(), max_new_tokens: int = 32, engine: str = "auto", no_adapter: bool = False
) -> tuple[str, list[Run]]:
    """Greedy continuation of ``ids`` once per adapter; returns (engine used, runs)."""
    folder = Path(folder)
    sig, info, slots = _graph(folder)
    if not ids:
        raise ShareportError("the prompt is empty")
    if max_new_tokens < 1:
        raise ShareportError("--max-new-tokens must be at least 1")
    plan = _adapter_plan(folder, info, slots, list(adapters), no_adapter)
    engine = choose_engine(folder, engine)
    if engine == "genai":
        return engine, _run_genai(folder, plan, list(ids), max_new_tokens)
    return engine, _run_ort(folder, sig, info, plan, list(ids), max_new_tokens)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in graph_file.TOKENIZER_NEEDED):
        raise ShareportError(f"{folder}: no tokenizer files (the base model folder had none when it was exported)")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises many types for a folder it cannot read
        raise ShareportError(f"{folder}: cannot load its tokenizer ({str(exc).splitlines()[0][:200]})") from None


def generate(
    folder, prompt: str, adapters=(), max_new_tokens: int = 32, engine: str = "auto", no_adapter: bool = False
) -> dict:
    """Greedy text for ``prompt``, once per adapter; the report ``shareport generate`` prints."""
    folder = Path(folder)
    _graph(folder)  # a wrong folder fails before the tokenizer is loaded
    tokenizer = load_tokenizer(folder)
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    used, runs = generate_ids(folder, ids, adapters, max_new_tokens, engine, no_adapter)
    for run in runs:
        run.text = tokenizer.decode(run.tokens, skip_special_tokens=True)
    return {
        "graph": str(folder),
        "engine": used,
        "prompt": prompt,
        "prompt_ids": list(ids),
        "runs": [dataclasses.asdict(r) for r in runs],
    }
