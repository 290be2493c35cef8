"""``shareport frontier``: how faithful each form is at each size, before and after recovery.

For every form (truncated LoRA, ShareA, ShareB, ShareAB, ASLoRA) and budget (a fraction of the
source LoRA's parameters) the LoRA is converted with the same code as ``shareport convert``,
evaluated on held-out data against the LoRA (KL, top-1 agreement, and accuracy when the data
has labels), and optionally recovered for N steps with the same recipe as ``shareport
finetune`` and evaluated again. One base model and one teacher serve every point.

The fidelity of a point is its accuracy relative to the LoRA's (labelled data), else its top-1
agreement with the LoRA. The Pareto front is the set of points no other point beats in both
size and fidelity; the answer to "what should I ship" is the smallest point keeping ``keep``.

With ``precisions`` (``--precisions fp16,int8,int4``) every point is also scored as stored at each
precision (``shareport.quantization.stored_as``: float16 factors, or integers with float16 scales as
``convert --quantize`` writes them) and every point, the float32 one included, records the bytes its
factors take so stored; size is then bytes, not parameters (the front and the smallest point).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from typing import Callable

from ..adapter import Adapter
from ..convert import convert_adapter
from ..convert_options import parse_buckets
from ..errors import ShareportError
from ..quantization import STORED_PRECISIONS, stored_as
from .choices import MAX_FRONTIER_BUDGET as MAX_BUDGET
from .jobs import TrainingOptions
from .recipe import Job, evaluate_adapter, run


def parse_serving(texts) -> tuple[str, ...]:
    """``--serving uniform|max-rank=R|buckets=R1,R2,...`` values, checked (one line on a bad one); each adds,
    for every form and budget, a point planned under that serving rule (``convert --uniform-rank`` ...)."""
    out = []
    for text in texts:
        serving_options(text)
        if text not in out:
            out.append(text)
    return tuple(out)


def serving_options(text: str | None) -> dict:
    """The ``convert_adapter`` keywords of one ``--serving`` value (none for None)."""
    if text is None:
        return {}
    if text == "uniform":
        return {"uniform_rank": True}
    name, _, value = text.partition("=")
    if name == "max-rank" and value.isdigit() and int(value) > 0:
        return {"max_rank": int(value)}
    if name == "buckets":
        return {"rank_buckets": parse_buckets(value)}
    raise ShareportError(f"--serving must be uniform, max-rank=R (R >= 1) or buckets=R1,R2,...; got {text!r}")


PRECISIONS = STORED_PRECISIONS[1:]  # fp32 is every point's own: always scored


def parse_precisions(texts) -> tuple[str, ...]:
    """``--precisions`` values (e.g. ("fp16", "int8", "int4")), checked (one line on a bad one), each once,
    in the order given."""
    out = []
    for text in texts:
        if text not in PRECISIONS:
            raise ShareportError(
                f"--precisions must be comma-separated values of {', '.join(PRECISIONS)} "
                f"(float32 is always scored); got {text!r}"
            )
        if text not in out:
            out.append(text)
    return tuple(out)


def check_budgets(budgets) -> tuple[float, ...]:
    budgets = tuple(sorted(set(float(b) for b in budgets)))
    bad = [b for b in budgets if not 0 < b <= MAX_BUDGET]
    if not budgets or bad:
        raise ShareportError(f"--budgets must be fractions in (0, {MAX_BUDGET}], got {bad[0] if bad else 'none'}")
    return budgets


@dataclasses.dataclass
class Point:
    form: str
    budget: float
    recovered: bool
    steps: int
    parameters: int
    ratio: float  # of the source LoRA's parameters
    max_relative_error: float  # of the projection, its worst kind (Frobenius)
    kl: float | None
    top1_agreement: float | None
    accuracy: float | None
    fidelity: float  # accuracy / LoRA accuracy, else top-1 agreement
    seconds: float  # conversion (+ recovery) wall time
    serving: str | None = None  # the --serving rule the plan was made under (None: unconstrained)
    precision: str | None = None  # with --precisions: how the factors are stored ("fp32", "fp16", "int8", "int4")
    bytes: int | None = None  # with --precisions: the bytes the factors take, stored at ``precision``

    @property
    def label(self) -> str:
        """The form, with its serving rule and precision if any: one line of the frontier's figure."""
        label = self.form if self.serving is None else f"{self.form} [{self.serving}]"
        return label if self.precision is None else f"{label} {self.precision}"

    def to_dict(self) -> dict:
        """Every field; ``precision`` and ``bytes`` only when set (without --precisions the output is
        what it was before they existed)."""
        data = dataclasses.asdict(self)
        for name in ("precision", "bytes"):
            if data[name] is None:
                del data[name]
        return data


def _fidelity(metrics: dict, lora_accuracy: float | None) -> tuple[float | None, float]:
    accuracy = metrics.get("accuracy", {}).get("student")
    if accuracy is not None and lora_accuracy:
        return accuracy, accuracy / lora_accuracy
    if "top1_agreement" not in metrics:
        raise ShareportError("frontier needs a model with logits (a causal LM or a classifier) to score fidelity")
    return accuracy, metrics["top1_agreement"]


def measure(
    job: Job,
    lora: Adapter,
    forms,
    *,
    budgets,
    options: TrainingOptions,
    recover_steps: int,
    cached: Callable[[str], dict | None],
    store: Callable[[str, dict], None],
    on_stage: Callable[[str, float, str], None],
    on_point: Callable[[Point], None],
    serving: tuple[str, ...] = (),
    precisions: tuple[str, ...] = (),
) -> tuple[dict, list[Point]]:
    """Every (form, budget) point, converted and, with ``recover_steps``, recovered; with ``serving``
    (``parse_serving``'s values) also one point per rule, planned under it (none where the budget
    cannot pay for it); with ``precisions`` (``parse_precisions``'s values) every such point also
    stored at each precision (after its recovery, for a recovered one), and every point given its bytes.

    ``cached(key)``/``store(key, data)`` keep finished points so an interrupted run resumes.
    ``on_stage(form, budget, what)`` is called as each conversion or recovery starts ("converting",
    "recovering"), ``on_point(point)`` as each point is finished (cached ones too).
    Returns the LoRA's own metrics and the points.
    """
    reference = cached("lora-reference") or evaluate_adapter(job, lora, options.batch_size)
    store("lora-reference", reference)
    lora_accuracy = reference.get("accuracy", {}).get("student")
    points = []
    for form in forms:
        for budget, rule in itertools.product(budgets, (None,) + tuple(serving)):
            key = f"{form}-{budget:g}-{recover_steps}" + (f"-{rule}" if rule else "")
            key += f"-bytes-{'+'.join(precisions)}" if precisions else ""
            data = cached(key)
            if data is None:
                stage = functools.partial(on_stage, form if rule is None else f"{form} [{rule}]", budget)
                data = [
                    p.to_dict()
                    for p in _point(
                        job,
                        lora,
                        form,
                        budget=budget,
                        options=options,
                        recover_steps=recover_steps,
                        lora_accuracy=lora_accuracy,
                        on_stage=stage,
                        on_point=on_point,
                        serving=rule,
                        precisions=precisions,
                    )
                ]
                store(key, data)
            else:
                for d in data:
                    on_point(Point(**d))
            points += [Point(**d) for d in data]
    return reference, points


def _point(
    job,
    lora,
    form,
    *,
    budget,
    options,
    recover_steps,
    lora_accuracy,
    on_stage,
    on_point,
    serving=None,
    precisions=(),
) -> list[Point]:
    on_stage("converting")
    started = time.perf_counter()
    try:
        converted, report = convert_adapter(lora, form, budget=budget, **serving_options(serving))
    except ShareportError:
        return []  # the budget cannot pay for this form (e.g. ShareAB's shared pair); no point
    seconds = time.perf_counter() - started
    common = dict(
        form=form,
        serving=serving,
        budget=budget,
        parameters=report.parameters_after,
        ratio=report.ratio,
        max_relative_error=max((k.relative_error for k in report.kinds), default=0.0),
    )

    def scored(metrics, **fields) -> Point:
        accuracy, fidelity = _fidelity(metrics, lora_accuracy)
        point = Point(
            kl=metrics.get("kl"),
            top1_agreement=metrics.get("top1_agreement"),
            accuracy=accuracy,
            fidelity=fidelity,
            **common,
            **fields,
        )
        on_point(point)
        return point

    def stored(adapter, **fields) -> list[Point]:
        """The adapter at each precision (float32 first, as it is), each scored; none without precisions."""
        out = []
        for precision in (STORED_PRECISIONS[0],) * bool(precisions) + tuple(precisions):
            if precision != STORED_PRECISIONS[0]:
                on_stage(f"storing as {precision}")
            as_stored, size = stored_as(adapter, precision)
            metrics = fields.pop("metrics", None) or evaluate_adapter(job, as_stored, options.batch_size)
            out.append(scored(metrics, precision=precision, bytes=size, **fields))
        return out

    before = evaluate_adapter(job, converted, options.batch_size)
    facts = dict(recovered=False, steps=0, seconds=seconds)
    out = stored(converted, metrics=before, **facts) if precisions else [scored(before, **facts)]
    if recover_steps:
        on_stage("recovering")
        started = time.perf_counter()
        recipe = dataclasses.replace(options, steps=recover_steps).recipe(
            converted, distill_weight=1.0, task_weight=0.0
        )
        student, training = run(dataclasses.replace(job, student=converted, progress=False), recipe)
        after = training["after"]
        facts = dict(recovered=True, steps=recover_steps, seconds=seconds + time.perf_counter() - started)
        out += stored(student, metrics=after, **facts) if precisions else [scored(after, **facts)]
    return out


def stages(forms, budgets, recover_steps: int, serving: tuple[str, ...] = (), precisions: tuple[str, ...] = ()) -> int:
    """How many points ``measure`` finishes (for a progress bar): one per form, budget and serving rule (and
    the unconstrained plan) and stored precision (and float32), two when recovering."""
    return len(forms) * len(budgets) * (1 + len(serving)) * (1 + len(precisions)) * (2 if recover_steps else 1)


def point_line(point: Point) -> str:
    """One finished point, as the frontier prints it while it runs."""
    state = f"recovered {point.steps} steps" if point.recovered else "converted"
    kl = "-" if point.kl is None else f"{point.kl:.4f}"
    accuracy = "" if point.accuracy is None else f", accuracy {point.accuracy:.4f}"
    size = f"{point.ratio:.1%} of the LoRA" + ("" if point.bytes is None else f", {point.bytes:,} bytes")
    return (
        f"{point.label} at {point.budget:g} ({size}), {state}: KL {kl}{accuracy}, "
        f"fidelity {point.fidelity:.4f} ({point.seconds:.0f} s)"
    )


def pareto(points: list[Point], *, size: str = "parameters") -> list[Point]:
    """Points that no other point beats in both size (fewer ``size``: "parameters" or "bytes") and
    fidelity, by size."""
    front, best = [], float("-inf")
    for p in sorted(points, key=lambda p: (getattr(p, size), -p.fidelity)):
        if p.fidelity > best:
            front.append(p)
            best = p.fidelity
    return front


def smallest_keeping(points: list[Point], keep: float, *, size: str = "parameters") -> Point | None:
    good = [p for p in points if p.fidelity >= keep]
    return min(good, key=lambda p: (getattr(p, size), -p.fidelity)) if good else None
