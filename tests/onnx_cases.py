"""Building blocks for the ONNX tests: base/adapter folders of each form, and greedy decoding in ORT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shareport.adapter import Adapter, Site
from shareport.export import runtime
from shareport.files.adapters import load_adapter, save_adapter
from tests.tiny import make_peft_adapter


def tie(adapter: Adapter, form: str, b_groups: list[list[int]] | None = None) -> Adapter:
    """A shared form built by hand: each kind's sites use layer 0's A (sharea, aslora); with
    ``b_groups`` the layers of a group also share their first layer's B (aslora)."""
    sites = {}
    for kind_sites in adapter.kinds().values():
        by_layer = {s.layer: s for s in kind_sites}
        shared_a = kind_sites[0].a
        for s in kind_sites:
            group = next((g for g in b_groups or [] if s.layer in g), [s.layer])
            sites[s.path] = Site(s.path, s.kind, s.layer, shared_a, by_layer[group[0]].b, s.scale)
    used = {n for s in sites.values() for n in (s.a, s.b)}
    return adapter.with_sites({n: t for n, t in adapter.tensors.items() if n in used}, sites, form)


def make_case(
    folder: Path, build, form: str = "lora", seed: int = 1, b_groups=None, **lora_kwargs
) -> tuple[Path, Path]:
    """Write ``folder/base`` (the model) and ``folder/<form>`` (its adapter); return both paths."""
    base, adapter_dir = folder / "base", folder / form
    if not base.exists():
        build().save_pretrained(base)
    peft_dir = adapter_dir if form == "lora" else folder / f"{form}-peft"
    make_peft_adapter(build(), peft_dir, seed=seed, **lora_kwargs)
    if form != "lora":
        save_adapter(tie(load_adapter(peft_dir), form, b_groups), adapter_dir)
    return base, adapter_dir


def ort_greedy(sess, sig, prompt: torch.Tensor, steps: int, lora=None, dtype=np.float32) -> torch.Tensor:
    """Greedy decoding with a with-past graph: prefill, then one token per step from the cache."""
    batch, seq = prompt.shape
    ids = prompt.numpy()
    past = {n: np.zeros((batch, sig.kv_heads, 0, sig.head_dim), dtype) for n in sig.past_names}
    tokens, length = ids, 0
    for _ in range(steps):
        n = ids.shape[1]
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((batch, length + n), np.int64),
            "position_ids": np.broadcast_to(np.arange(length, length + n), (batch, n)).copy(),
            **past,
        }
        outputs = runtime.run(sess, feeds, lora)
        ids = outputs[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        past = dict(zip(sig.past_names, outputs[1:]))
        tokens = np.concatenate([tokens, ids], axis=1)
        length += n
    return torch.from_numpy(tokens)


def torch_greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    from transformers import GenerationConfig

    # no eos: both sides must produce exactly `steps` tokens
    config = GenerationConfig(max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)


def classifier_feeds() -> dict[str, np.ndarray]:
    """A tiny BERT classifier's inputs, with a padded row."""
    from tests.tiny import input_ids

    ids = input_ids(3, 9, seed=5).numpy()
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def peft_logits(base, lora, feeds) -> np.ndarray:
    """PEFT's own output for the LoRA folder (its head included): the reference, independent of shareport."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), lora).eval()
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
