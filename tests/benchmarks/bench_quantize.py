"""Quantized storage measured on a trained LoRA: error, bytes and task accuracy of int8 and int4.

    OMP_NUM_THREADS=2 python3 -m tests.benchmarks.bench_quantize --lora LORA --base BASE --data DATA [--out OUT]
        [--forms lora,sharea,...] [--skip-task]

Not collected by pytest. LORA, BASE and DATA are bench_frontier.py's docstrings LoRA (MiniLM, r=16 on
six kinds x six layers), its base folder and its data folder (``train.jsonl``, ``test.jsonl``).

1. **Group size**: the update error int8 and int4 add to the 25% truncation (``--to lora --budget
   0.25``), and the bits per parameter, at groups of 32, 64 and 128.
2. **Split by singular value** (LoRAQuant): the top fraction of each factor's rank components (rows
   of A, columns of B, largest first) at int8, the rest at int4, against the same bytes spent on rank
   instead: all int4 at a larger budget. Error of the updates against the LoRA's.
3. **Task**: accuracy, KL to the LoRA and top-1 agreement on the test split (bench_frontier.py's
   scoring) of every form at 25% in float, int8 and int4 (default group size), with their bytes
   against the LoRA's in float32 and float16.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from converters.quantize import quantize  # noqa: E402
from shareport.convert import convert_adapter  # noqa: E402
from shareport.files import load_adapter  # noqa: E402
from shareport.quantization import factor_axes, quantize_adapter, relative_update_error, storage  # noqa: E402
from shareport.train.jobs import recovery_job  # noqa: E402
from shareport.train.recipe import evaluate_adapter  # noqa: E402

FORMS = ("lora", "sharea", "shareb", "shareab", "aslora")


def group_sizes(lora, truncated) -> list[dict]:
    rows = []
    for bits in ("int8", "int4"):
        for group in (32, 64, 128):
            q, report = quantize_adapter(truncated, bits, group)
            rows.append(
                {
                    "quantize": bits,
                    "group_size": group,
                    "added_error": report["relative_error"],
                    "error_to_lora": relative_update_error(lora, q),
                    "bits_per_parameter": report["bits_per_parameter"],
                }
            )
    return rows


def split(adapter, top: float, group: int):
    """int8 for the first ``top`` of each factor's components, int4 for the rest (groups never cross a
    component: A is grouped along rows, B along columns): (dequantized adapter, bytes)."""
    tensors, stored = dict(adapter.tensors), 0
    for name, axis in factor_axes(adapter).items():
        t = adapter.tensors[name]
        rank_axis = 1 - axis  # A (r, n_in): components are rows; B (n_out, r): columns
        k = round(top * t.shape[rank_axis])
        parts = []
        for bits, piece in ((8, t.narrow(rank_axis, 0, k)), (4, t.narrow(rank_axis, k, t.shape[rank_axis] - k))):
            if piece.numel():
                q = quantize(piece, bits, group, axis)
                parts.append(q.dequantize())
                stored += q.stored_bytes()
        tensors[name] = torch.cat(parts, dim=rank_axis)
    return adapter.with_sites(tensors, dict(adapter.sites), adapter.form), stored


def splits(lora, form: str) -> list[dict]:
    rows = []
    converted, _ = convert_adapter(lora, form, budget=0.25)
    for top in (0.0, 0.25, 0.5, 1.0):
        q, stored = split(converted, top, 64)
        rows.append(
            {
                "form": form,
                "budget": 0.25,
                "int8_top": top,
                "bytes": stored,
                "error_to_lora": relative_update_error(lora, q),
            }
        )
    for budget in (0.25 * 1.25, 0.25 * 1.5):
        q, report = quantize_adapter(convert_adapter(lora, form, budget=budget)[0], "int4")
        rows.append(
            {
                "form": form,
                "budget": budget,
                "int8_top": 0.0,
                "bytes": report["bytes"],
                "error_to_lora": relative_update_error(lora, q),
            }
        )
    return rows


def task(lora_dir: Path, base: Path, data: Path, lora, forms) -> list[dict]:
    job = recovery_job(
        lora_dir,
        base,
        lora_dir,
        data_path=data / "train.jsonl",
        max_length=64,
        adapters=(lora, lora),
        eval_path=data / "test.jsonl",
    )
    rows = []
    for form in forms:
        converted, _ = convert_adapter(lora, form, budget=0.25)
        for bits in (None, "int8", "int4"):
            adapter = converted if bits is None else quantize_adapter(converted, bits)[0]
            metrics = evaluate_adapter(job, adapter, 32)
            rows.append(
                {
                    "form": form,
                    "quantize": bits or "float32",
                    **storage(adapter),
                    "error_to_lora": relative_update_error(lora, adapter),
                    "accuracy": metrics["accuracy"]["student"],
                    "lora_accuracy": metrics["accuracy"]["teacher"],
                    "kl": metrics["kl"],
                    "top1_agreement": metrics["top1_agreement"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-quantize.json"))
    parser.add_argument("--skip-task", action="store_true", help="weights only (no model runs)")
    parser.add_argument(
        "--forms",
        default=",".join(FORMS),
        help="forms scored on the task (each costs three evaluations, ~2.5 min each on 2 cores)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    lora = load_adapter(args.lora)
    truncated, _ = convert_adapter(lora, "lora", budget=0.25)
    results = {
        "lora_parameters": lora.num_parameters(),
        "lora_float32_bytes": 4 * lora.num_parameters(),
        "group_sizes": group_sizes(lora, truncated),
        "splits": [row for form in ("lora", "sharea", "shareab") for row in splits(lora, form)],
    }
    for row in results["group_sizes"]:
        print(json.dumps(row))
    for row in results["splits"]:
        print(json.dumps(row))
    if not args.skip_task:
        results["task"] = task(args.lora, args.base, args.data, lora, args.forms.split(","))
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
