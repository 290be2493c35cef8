"""Per-step cost of the recovery defaults against the old loop's settings (issue 26's cost target: at
most 1.2x), interleaved in one process (not collected by pytest).

    OMP_NUM_THREADS=1 python3 -m tests.benchmarks.bench_recovery_cost [--out /tmp/br] [--steps 48] [--rounds 3] \
        [--batch-sizes 8 16] [--by-length-too]

On bench_recovery's docstrings task (its cached stages under ``--out``; built there if missing), the
10% truncation recovers ``--steps`` steps with the old settings (T 1, no site term, no backoff,
constant lr, every tensor at the lr) and with the library's defaults (T 4 and site weight 1 for this
classifier, backoff, cosine, each tensor's step scaled by its size), alternating ``--rounds`` times,
one evaluation at the end. Training seconds per step
(evaluation excluded: a few percent in both) are printed per round, with the ratio of the minima.
``--batch-sizes``: the defaults' row at each of these batch sizes (the old loop's stays at the task's
batch, 8), to price a larger batch against the same old loop. ``--by-length-too``: the defaults with
``--group-by-length`` too, at each batch size. The default 48 steps are three whole runs of the
grouped order (data.LENGTH_GROUP_BATCHES), so its batches' lengths average out.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from shareport.train.jobs import TrainingOptions, recovery_job
from shareport.train.recipe import run
from tests.benchmarks import bench_recovery

SETTINGS = {
    "old (T 1, no site term, no backoff, constant lr, no lr scaling)": dict(
        temperature=1.0, site_weight=0.0, backoff=False, schedule="constant", warmup=0.0, lr_scaling="none"
    ),
    "defaults (T 4, site weight 1, backoff, cosine, lr scaling by tensor)": {},
}
BY_LENGTH = dict(group_by_length=True)  # --by-length-too


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/br", help="bench_recovery's folder (its stages are reused)")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="the defaults' batch [the task's]")
    parser.add_argument(
        "--by-length-too", action="store_true", help="also the defaults with --group-by-length, at each batch size"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = bench_recovery.docstrings_task(Path(args.out))
    (task.out / "converted").mkdir(exist_ok=True)
    student = bench_recovery.convert(task, "lora", 0.1, False)
    job = recovery_job(
        student, task.base, task.lora, data_path=task.data, max_length=task.max_length, eval_path=task.test
    )
    job = dataclasses.replace(job, progress=False)
    (old_name, old_extra), (new_name, new_extra) = SETTINGS.items()
    rows = {old_name: (old_extra, task.batch)}
    for batch in args.batch_sizes or [task.batch]:
        rows[new_name + (f", batch {batch}" if args.batch_sizes else "")] = (new_extra, batch)
        if args.by_length_too:
            rows[f"defaults, --group-by-length, batch {batch}"] = ({**new_extra, **BY_LENGTH}, batch)
    per_step = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, (extra, batch) in rows.items():
            options = TrainingOptions(
                steps=args.steps, batch_size=batch, max_length=task.max_length, eval_every=args.steps, **extra
            )
            _, report = run(job, options.recipe(job.student, distill_weight=1.0, task_weight=0.0))
            timings = report["timings"]
            per_step[name].append((timings["seconds"] - timings["eval_seconds"]) / args.steps)
    for name, values in per_step.items():
        print(f"{name}: training s/step {min(values):.3f} (min of {args.rounds}; all {[round(v, 3) for v in values]})")
    old = min(per_step[old_name])
    for name, values in per_step.items():
        if name != old_name:
            print(f"{name} / old: {min(values) / old:.2f}")


if __name__ == "__main__":
    main()
