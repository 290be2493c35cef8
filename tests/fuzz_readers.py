"""Fuzz the config and safetensors readers: every case ends in a ShareportError or a valid adapter.

Run as a benchmark for the full 10k cases (``python3 -m tests.benchmarks.bench_fuzz_readers``);
``tests/files/test_fuzz_readers.py`` runs a few hundred in CI.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from shareport.errors import ShareportError
from shareport.files.adapters import load_adapter, save_adapter
from shareport.files.folder import CONFIG_NAME, WEIGHTS_NAME
from tests.fuzzing import WEIGHT_MUTATIONS, mutate_config


def fuzz(good_folders: list[Path], cases: int, seed: int = 0) -> Counter:
    """Mutate the folders ``cases`` times; return outcome counts; raise on any foreign exception."""
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    work = Path(tempfile.mkdtemp(prefix="shareport-fuzz-"))
    try:
        for i in range(cases):
            src = rng.choice(good_folders)
            case = work / f"case{i}"
            shutil.copytree(src, case)
            if rng.random() < 0.5:
                text = (src / CONFIG_NAME).read_text()
                (case / CONFIG_NAME).write_text(mutate_config(text, rng))
            else:
                mutation = rng.choice(WEIGHT_MUTATIONS)
                (case / WEIGHTS_NAME).write_bytes(mutation((src / WEIGHTS_NAME).read_bytes(), rng))
            try:
                load_adapter(case)
                outcomes["loaded"] += 1
            except ShareportError:
                outcomes["refused"] += 1
            except Exception as exc:  # anything else is a bug: report the case
                raise AssertionError(f"case {i} ({case}): {type(exc).__name__}: {exc}") from exc
            shutil.rmtree(case)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return outcomes


def seed_folders(root: Path) -> list[Path]:
    """A PEFT LoRA and its native copy, built without PEFT (plain tensors)."""
    import torch

    from shareport.adapter import Adapter

    gen = torch.Generator().manual_seed(0)
    factors = {
        f"model.layers.{i}.self_attn.{k}": (torch.randn(2, 8, generator=gen), torch.randn(8, 2, generator=gen), 2.0)
        for i in range(2)
        for k in ("q_proj", "v_proj")
    }
    adapter = Adapter.from_factors(factors, task_type="CAUSAL_LM")
    save_adapter(adapter, root / "peft", as_peft=True)
    save_adapter(adapter, root / "native")
    return [root / "peft", root / "native"]
