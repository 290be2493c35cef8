"""One basis against clusters (fleet --clusters 1 vs auto), per member, on tiny-Llama LoRAs trained briefly.

    python3 -m tests.benchmarks.bench_fleet_clusters [--steps 40] [--out DIR]

Two fleets of 6 PEFT LoRAs (r=4 on q_proj, v_proj, down_proj of the tests' 3-layer tiny Llama), each
trained for ``--steps`` AdamW steps on its own random next-token task (a fixed random token map):

- seeds: every LoRA from its own init seed (PEFT's random A, zero B), the common case;
- groups: two groups of 3, the LoRAs of a group from one init seed (the same A's at the start).

Each fleet is built with ``shareport fleet`` at --budget 1/8 and 1/4, --clusters 1 and auto (the
form chosen by fleet); the table prints every member's relative weight error, the clusters auto
chose, and the parameters of both (at most the budget).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from tests.tiny import VOCAB, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def train_lora(folder: Path, init_seed: int, task_seed: int, steps: int) -> None:
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()  # seeds the global generator itself, so the init seed comes after it
    torch.manual_seed(init_seed)  # PEFT draws A from the global generator: the init
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(1000 + task_seed)
    token_map = torch.randperm(VOCAB, generator=gen)  # the task: predict map[x] after x
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(steps):
        x = torch.randint(3, VOCAB, (16, 12), generator=gen)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), token_map[x].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(str(folder))


def fleet(loras: list[Path], out: Path, budget: float, clusters: str) -> dict:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "shareport",
            "fleet",
            *map(str, loras),
            "-o",
            str(out),
            "--budget",
            str(budget),
            "--clusters",
            clusters,
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(r.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="bench_clusters_"))
    cases = {"seeds": [(i, i) for i in range(6)], "groups": [(0 if i < 3 else 1, i) for i in range(6)]}
    print("| LoRAs | budget | clusters | chosen | form | parameters | per-member relative error | worst | fleet |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case, seeds in cases.items():
        loras = []
        for i, (init_seed, task_seed) in enumerate(seeds):
            folder = root / case / f"m{i}"
            if not folder.exists():
                train_lora(folder, init_seed, task_seed, args.steps)
            loras.append(folder)
        for budget in (0.125, 0.25):
            for clusters in ("1", "auto"):
                data = fleet(loras, root / f"{case}-{budget}-{clusters}", budget, clusters)
                chosen = data.get("clusters")
                groups = "-" if not chosen else " ".join(str(chosen["members"][m["name"]]) for m in data["members"])
                errors = [m["relative_error"] for m in data["members"]]
                total = f"{next(c for c in data['candidates'] if c.get('winner'))['relative_error']:.3f}"
                print(
                    f"| {case} | 1/{round(1 / budget)} | {clusters} | {groups} | {data['form']} | "
                    f"{data['parameters']:,} ({data['ratio']:.1%}) | {' '.join(f'{e:.3f}' for e in errors)} | "
                    f"{max(errors):.3f} | {total} |"
                )


if __name__ == "__main__":
    main()
