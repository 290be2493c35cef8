"""When the step size shrinks and when recovery looks at held-out data: pure arithmetic, no torch.

**Learning rate.** AdamW normalises every step to about ``lr`` per entry, even where the gradient
is only noise, so at a constant ``lr`` the adapter ends as a random walk of that size around a
good point (issue 26 measured a floor near KL 0.25 on the docstrings task, and good starts made
worse). The schedule warms up linearly over the first ``warmup`` share of the steps (the first
steps' moments are estimates of one or two gradients), then decays to zero: the walk shrinks with
the step, and the last steps only polish.

**Evaluation.** Recovery evaluates the held-out split at step 0, every ``eval_every`` steps and
at the last step, and publishes the best of those adapters (``recipe.BestKept``). The default
``eval_every`` keeps that cost at about ``EVAL_SHARE`` of the run, counted in forward passes:
a training step costs about ``STEP_UNITS`` forwards per example (the teacher's, the student's and
its backward, which computes input gradients only), an evaluation one forward per held-out
example (the teacher's outputs are computed once and kept, ``evaluation.TeacherCache``) or two.

**More signal per example**, by what the model outputs, as measured by
``tests/benchmarks/bench_recovery.py`` (docs/results.md): a sequence classifier gives one
distribution over a few classes per example, peaked, so at T = 1 the KL carries a few bits and
little about the classes the teacher ranks second. Softened (``--temperature``) the same example
teaches more. A causal LM gives one distribution per token over its vocabulary, already spread:
softening it moves the student's effort from the top tokens to the tail. Likewise each adapted site's
update at every token against the teacher's (``--site-weight``, ``sites.py``) teaches a classifier
more per example, and pulls a causal LM away from its outputs: see CLASSIFIER_SITE_WEIGHT.
"""

from __future__ import annotations

import math

from ..errors import ShareportError

# the peak lr: chosen by the sweep in tests/benchmarks/bench_recovery.py (docs/results.md), 150 steps:
# on the docstrings classifier (real MiniLM, truncation at 10%) 3e-3 lowered held-out KL most
# (0.336 -> 0.185; 1e-2 and 5e-3 made every or nearly every step worse than the start); on the demo's
# causal LM 1e-2 was best and 5e-3 / 3e-3 close behind: 3e-3 is the largest lr that is safe on both.
# (Over 300 steps, and from good starts, 1e-3 did better on the docstrings task and worst on the demo.)
DEFAULT_LR = 3e-3
# --steps' default. Measured with the other defaults (lr 3e-3, warmup then cosine decay over the run), test
# KL / accuracy or agreement kept: docstrings 10% truncation 0.159 / 0.942 at 100 steps, 0.108 / 0.984 at
# 300; the demo's causal LM 10% 0.0377 / 0.899 at 100, 0.0326 / 0.901 at 150, 0.0244 / 0.941 at 300, 25%
# 0.0128 -> 0.0054. 100 (the old default) stopped on both while the held-out KL was still falling fast;
# 300 is the "short fine-tune" and what every recovery target is measured at.
DEFAULT_STEPS = 300
# --lr-scaling. Adam moves every entry by about the lr whatever the entry's size, so the same lr is a
# larger relative step on a wide model (small entries: a unit-norm row of width n has rms 1/sqrt(n)) than
# on a narrow one; that is why the docstrings classifier (MiniLM, width 384) wanted lr 3e-3 and the demo's
# causal LM (width 64) 1e-2. "tensor": each trainable tensor's step is scaled by its own rms at the start
# over LR_SCALE_REFERENCE, so --lr means the step of a tensor whose entries have rms 0.05 (~1/sqrt(384)).
# Measured with the other defaults (test KL / accuracy or agreement kept, "none" -> "tensor"): docstrings
# truncation 5% 0.187 / 0.934 -> 0.179 / 0.955, 10% (five seeds) 0.108 / 0.987 -> 0.113 / 0.989, 25%
# (three) 0.040 / 0.992 -> 0.044 / 0.998; demo 10% 0.0326 / 0.901 -> 0.0230 / 0.947, 25% 0.0086 -> 0.0071
# (150 steps): one lr for both tasks, where before each wanted its own (results.md). The default only
# where it was measured: recovery of whole factors. `train` starts from B = 0, whose rms would stop it;
# on cores (--trainable cores) it was mixed and on a fleet member's not measured: "none" there.
LR_SCALINGS = ("tensor", "none")
LR_SCALE_REFERENCE = 0.05


def default_lr_scaling(*, distilling: bool, whole_factors: bool) -> str:
    """--lr-scaling's default: "tensor" for recovery that trains whole factors, else "none"."""
    return "tensor" if distilling and whole_factors else "none"


SCHEDULES = ("cosine", "linear", "constant")
# what trains: every factor whole, or only a small core between frozen orthonormal bases (cores.py)
TRAINABLES = ("factors", "cores")
DEFAULT_TRAINABLE = "factors"
DEFAULT_SCHEDULE = "cosine"
# --temperature's default by the output (see the docstring). Measured at 10% of the LoRA's parameters
# (truncation), lr 3e-3: on the docstrings classifier (real MiniLM, 12 classes, 300 steps) test KL
# 0.147 at T=1, 0.127 at 2, 0.123 at 4, 0.119 at 8, accuracy kept 0.971 -> 0.984 / 0.987 / 0.982; on
# bench_fleet's eight 3-way docstring classifiers, already near their LoRAs (KL 1e-4; recovered at 1/8,
# 60 steps, lr 2e-3) T=4 and T=1 tied (min / mean accuracy kept 0.957 / 0.992); on the demo's causal LM (150 steps) T=2
# and 4 were worse than 1 (held-out KL 0.042 -> 0.044 / 0.049, agreement 0.943 -> 0.913 / 0.905; at lr
# 1e-2 likewise)
CLASSIFIER_TEMPERATURE = 4.0
TOKEN_TEMPERATURE = 1.0
# --site-weight (sites.py: each adapted site's update against the teacher's, as a share of the
# output KL) by the output, measured at 10% of the LoRA's parameters (truncation), lr 3e-3, T by the
# output (tests/benchmarks/bench_recovery.py, docs/results.md). Docstrings classifier (real MiniLM,
# 300 steps, three seeds): test KL 0.128 / 0.114 / 0.114 at weight 0, 0.108 / 0.102 / 0.102 at 1,
# 0.103 / 0.097 / 0.101 at 3 (accuracy kept 0.985, 0.989, 0.986 on average: within a few test
# docstrings); bench_fleet's eight 3-way classifiers (1/8, 60 steps), near their LoRAs (KL 1e-4):
# min / mean kept 0.979 / 0.991 at 0, 1 and 3 alike (the same term unscaled cost 9 points there);
# the demo's causal LM (150 steps): held-out KL 0.033 at 0, 0.034 at 0.25, 0.042 at 1 (per-token
# distributions over the vocabulary carry the signal already). 1 for a classifier: most of 3's KL gain
# at the same step cost; 0 for tokens.
CLASSIFIER_SITE_WEIGHT = 1.0
TOKEN_SITE_WEIGHT = 0.0
# Backoff on divergence: an evaluation whose held-out score is more than BACKOFF_RATIO times the best
# so far means the lr is too large for this start (a good start is knocked far off it, then spends the
# run climbing back): the best adapter is put back and the lr scaled by BACKOFF_FACTOR for the rest of
# the run. Measured (bench_recovery.py, docstrings, truncation, T 4, site 1, evaluations every 25
# steps): at 25% the held-out KL went 0.061 -> 0.052 at step 25 -> 0.21 at step 50 (4x), and the run
# ended at test KL 0.082 (worse than the start's 0.063); backing off at every regression ended at
# 0.044 (accuracy kept 0.960 -> 0.997), but at 10%, where regressions are noise (at most 1.18x the
# best on six runs), it cost (test KL 0.108 -> 0.120). 1.5 separates the two.
BACKOFF_RATIO = 1.5
BACKOFF_FACTOR = 0.5
DEFAULT_WARMUP = 0.1  # share of the steps
EVAL_SHARE = 0.1  # the default --eval-every keeps evaluation at about this share of the run
# forward passes' worth of compute per training example, as measured against an evaluation forward
# (bench_recovery.py, one CPU thread): 3 on paper (teacher, student, backward), but an evaluation
# forward pays the same per-call overheads for less arithmetic, and at 3 evaluation took 7.9% (MiniLM
# classifier) and 12.5-13.2% (the demo's small causal LM) of the run; 2 keeps both under 10%
STEP_UNITS = 2
# fewer held-out rows than this cannot tell two adapters apart: a KL over 3 sequences moves by
# more than the gains recovery makes, and "the best step" would be noise
MIN_HELDOUT_ROWS = 4


def default_temperature(*, classifier: bool) -> float:
    """The distillation temperature when ``--temperature`` is not given: by the model's output."""
    return CLASSIFIER_TEMPERATURE if classifier else TOKEN_TEMPERATURE


def default_site_weight(*, classifier: bool) -> float:
    """The site term's weight when ``--site-weight`` is not given: by the model's output."""
    return CLASSIFIER_SITE_WEIGHT if classifier else TOKEN_SITE_WEIGHT


def diverged(score: float, best: float) -> bool:
    """Whether a held-out score this far above the best so far means the run diverged (see BACKOFF_RATIO).
    A KL of an adapter equal to its teacher can come out a hair below 0 in float sums: the best counts as 0."""
    return score > BACKOFF_RATIO * max(best, 0.0)


def check_trainable(trainable: str) -> None:
    if trainable not in TRAINABLES:
        raise ShareportError(f"--trainable: unknown choice '{trainable}' (known: {', '.join(TRAINABLES)})")


def check_lr_scaling(lr_scaling: str | None) -> None:
    """None: not chosen yet (the trainer resolves it by the job, ``default_lr_scaling``)."""
    if lr_scaling not in (None, *LR_SCALINGS):
        raise ShareportError(f"unknown --lr-scaling '{lr_scaling}' (expected one of {', '.join(LR_SCALINGS)})")


def check_schedule(schedule: str, warmup: float) -> None:
    if schedule not in SCHEDULES:
        raise ShareportError(f"--schedule: unknown schedule '{schedule}' (known: {', '.join(SCHEDULES)})")
    if not 0 <= warmup < 1:
        raise ShareportError(f"--warmup must be a share of the steps in [0, 1), got {warmup}")


def lr_factor(step: int, *, steps: int, schedule: str, warmup: float) -> float:
    """The multiple of the base lr for the update of step ``step`` (0-based) of ``steps``.

    Warmup: steps 0 .. W-1 ramp 1/W .. 1 (W = round(warmup * steps)); then "cosine" goes from 1
    down towards 0 along half a cosine, "linear" along a line, and "constant" stays at 1. The
    last step's factor is small but not 0 (an update of size 0 would be a wasted step)."""
    warm = round(warmup * steps)
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    span = steps - warm
    progress = (step - warm) / span  # 0 at the first decaying step, (span - 1) / span at the last
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def default_eval_every(*, steps: int, batch_size: int, heldout_examples: int, teacher_cached: bool) -> int:
    """The fewest steps between evaluations that keeps them at about ``EVAL_SHARE`` of the run."""
    eval_units = heldout_examples * (1 if teacher_cached else 2)
    every = math.ceil(eval_units / (EVAL_SHARE * STEP_UNITS * batch_size))
    return max(1, min(every, steps))


def eval_steps(steps: int, every: int) -> list[int]:
    """The steps after which recovery evaluates: 0 (the start), each multiple of ``every``, the last."""
    return sorted({0, *range(every, steps + 1, every), steps})


def check_eval_every(eval_every: int | None, steps: int) -> None:
    if eval_every is not None and not 1 <= eval_every <= steps:
        raise ShareportError(f"--eval-every must be between 1 and --steps ({steps}), got {eval_every}")
