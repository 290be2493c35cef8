"""ASLoRA during training: track each B's running average and merge the closest B's on schedule.

As the paper describes it (reference.md §1): after every optimizer step t each B's running
average ``Bbar(t) = mean_{k<=t} B(k)`` is updated; when ``t > T_s`` and ``(t - T_s) % m == 0``
every kind that may still merge ties its two groups whose running averages are closest in
Frobenius distance. A *group* is the set of sites (layers) that use one B parameter.

- ``tie``: the lower group takes the upper group's B (the paper's rule);
- ``mean``: both take the size-weighted mean of the two B's (and of their optimizer moments);
- ``adjacent``: only neighbouring groups may merge (groups stay contiguous runs of layers);
  ``any``: every pair is a candidate.

A merge rewires the attached model: the merged sites' wrappers then hold the *same*
``nn.Parameter``, the retired parameter leaves the optimizer (its state with it), and the
adapter's site map names the surviving tensor, so the saved adapter has one B per group.
"""

from __future__ import annotations

import dataclasses

import torch

from ..adapter import Site
from ..errors import ShareportError
from ..model.surgery import Attached
from .accel import unwrap_optimizer
from .choices import MERGE_MODES as MODES
from .choices import MERGE_PAIRS as PAIRS


@dataclasses.dataclass(frozen=True)
class MergeSchedule:
    start: int  # T_s: no merge at or before this step
    every: int  # m: steps between merges
    merges: int | None = None  # per kind; or
    groups: int | None = None  # the number of groups per kind to end with
    mode: str = "tie"
    pairs: str = "adjacent"

    def __post_init__(self) -> None:
        if (self.merges is None) == (self.groups is None):
            raise ShareportError("give exactly one of --merges and --groups")
        if self.start < 0 or self.every < 1:
            raise ShareportError(
                f"--merge-start must be >= 0 and --merge-every >= 1, got {self.start} and {self.every}"
            )
        if (self.merges is not None and self.merges < 1) or (self.groups is not None and self.groups < 1):
            raise ShareportError("--merges and --groups must be at least 1")
        if self.mode not in MODES or self.pairs not in PAIRS:
            raise ShareportError(f"merge mode must be one of {MODES} and pairs one of {PAIRS}")

    def due(self, step: int) -> bool:
        return step > self.start and (step - self.start) % self.every == 0

    def merges_needed(self, num_layers: int) -> int:
        """How many merges one kind of ``num_layers`` sites makes under this schedule."""
        if self.groups is not None:
            if self.groups > num_layers:
                raise ShareportError(f"--groups {self.groups} exceeds the {num_layers} layers of a kind")
            return num_layers - self.groups
        if self.merges > num_layers - 1:
            raise ShareportError(f"--merges {self.merges} exceeds what {num_layers} layers allow ({num_layers - 1})")
        return self.merges

    def last_merge_step(self, num_layers: int) -> int:
        """The step of the last merge (0 when there is none)."""
        needed = self.merges_needed(num_layers)
        return self.start + needed * self.every if needed else 0

    @classmethod
    def spread(cls, steps: int, num_layers: int, **fields) -> "MergeSchedule":
        """Defaults for T_s and m: train unmerged for a quarter, merge through the middle half.

        The paper's three phases (train, merge on schedule, train the final grouping) then
        all fit in ``steps``. A run too short for that keeps m >= 1 and moves T_s (or shrinks m,
        when T_s is given) so the merges still end by the last step; only when even one merge a
        step cannot fit is it refused. T_s and m given by the user are kept as given.
        """
        probe = cls(start=0, every=1, **{k: v for k, v in fields.items() if k not in ("start", "every")})
        needed = max(probe.merges_needed(num_layers), 1)
        start, every = fields.get("start"), fields.get("every")
        if every is None:
            room = steps - (steps // 4 if start is None else start)  # steps left after T_s
            every = max(1, min((steps // 2) // needed, room // needed))
        if start is None:
            if needed * every > steps:
                given = f" at --merge-every {every}" if fields.get("every") is not None else ""
                raise ShareportError(
                    f"--steps {steps} is too short for {needed} merge(s) per kind{given} (one merge step each, "
                    f"after step 0: at least {needed * every} steps); raise --steps, or merge less "
                    "(--merges/--groups)"
                )
            start = min(steps // 4, steps - needed * every)
        return cls(**{**fields, "start": start, "every": every})


@dataclasses.dataclass
class MergeEvent:
    step: int
    kind: str
    kept: list[int]  # layers of the group whose B survives
    merged: list[int]  # layers of the group that takes it
    distance: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def shared_a_per_kind(attached: Attached) -> bool:
    return all(len({s.a for s in sites}) == 1 for sites in attached.adapter.kinds().values())


class BMerger:
    """Running averages of every B parameter, and the merges of the schedule."""

    def __init__(self, attached: Attached, schedule: MergeSchedule, optimizer: torch.optim.Optimizer):
        if not shared_a_per_kind(attached):
            raise ShareportError(
                f"ASLoRA merging needs one shared A per kind (form sharea or aslora), the adapter is {attached.adapter.form}"
            )
        self.attached, self.schedule, self.optimizer = attached, schedule, optimizer
        self.observed = 0
        self.averages = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in self._b_params().items()}
        self.events: list[MergeEvent] = []
        self.remaining = {kind: schedule.merges_needed(len(sites)) for kind, sites in attached.adapter.kinds().items()}

    def _b_params(self) -> dict:
        return {
            name: self.attached.parameters[name] for name in sorted({s.b for s in self.attached.adapter.sites.values()})
        }

    def groups(self, kind: str) -> list[list[Site]]:
        """The kind's groups (sites that share a B), ordered by their lowest layer."""
        by_b: dict[str, list[Site]] = {}
        for site in self.attached.adapter.kinds()[kind]:
            by_b.setdefault(site.b, []).append(site)
        return sorted(by_b.values(), key=lambda g: g[0].layer)

    def observe(self, step: int) -> list[MergeEvent]:
        """Call after optimizer step ``step`` (1-based): update averages, merge if due."""
        self.observed += 1
        with torch.no_grad():
            for name, param in self._b_params().items():
                self.averages[name] += (param.detach().float() - self.averages[name]) / self.observed
        if not self.schedule.due(step):
            return []
        done = []
        for kind in sorted(self.remaining):
            if self.remaining[kind] > 0:
                done.append(self._merge_closest(kind, step))
                self.remaining[kind] -= 1
        self.events.extend(done)
        return done

    def _merge_closest(self, kind: str, step: int) -> MergeEvent:
        groups = self.groups(kind)
        if self.schedule.pairs == "adjacent":
            candidates = [(i, i + 1) for i in range(len(groups) - 1)]
        else:
            candidates = [(i, j) for i in range(len(groups)) for j in range(i + 1, len(groups))]
        # min() keeps the first of equal distances: the lowest layers merge first, deterministically.
        dist, i, j = min(
            (float(torch.linalg.norm(self.averages[groups[i][0].b] - self.averages[groups[j][0].b])), i, j)
            for i, j in candidates
        )
        lower, upper = sorted((groups[i], groups[j]), key=lambda g: max(s.layer for s in g))
        self._rewire(lower, upper)
        return MergeEvent(step, kind, [s.layer for s in upper], [s.layer for s in lower], dist)

    def _rewire(self, lower: list[Site], upper: list[Site]) -> None:
        """The lower group's sites take the upper group's B parameter; the lower one is retired."""
        keep, drop = upper[0].b, lower[0].b
        params = self.attached.parameters
        if self.schedule.mode == "mean":
            w_keep, w_drop = len(upper), len(lower)
            mix = lambda a, b: (a * w_keep + b * w_drop) / (w_keep + w_drop)  # noqa: E731
            with torch.no_grad():
                params[keep].copy_(mix(params[keep], params[drop]))
            self.averages[keep] = mix(self.averages[keep], self.averages[drop])
            _mix_optimizer_state(self.optimizer, params[keep], params[drop], mix)
        _retire(self.optimizer, params[drop])
        for site in lower:
            self.attached.wrappers[site.path].lora_B = params[keep]
        del params[drop], self.averages[drop]
        adapter = self.attached.adapter
        sites = {p: (dataclasses.replace(s, b=keep) if s.b == drop else s) for p, s in adapter.sites.items()}
        tensors = {n: t for n, t in adapter.tensors.items() if n != drop}
        self.attached.adapter = adapter.with_sites(tensors, sites, "aslora")

    # ---------------------------------------------------------------------- checkpointing
    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able state, tensors) for a checkpoint; the grouping itself is the adapter's site map."""
        meta = {"observed": self.observed, "remaining": self.remaining, "events": [e.to_json() for e in self.events]}
        return meta, {f"average/{name}": avg for name, avg in self.averages.items()}

    def load_state(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.observed = int(meta["observed"])
        self.remaining = {k: int(v) for k, v in meta["remaining"].items()}
        self.events = [MergeEvent(**e) for e in meta["events"]]
        names = set(self.averages)
        loaded = {k[len("average/") :]: v for k, v in tensors.items() if k.startswith("average/")}
        if set(loaded) != names:
            raise ShareportError("checkpoint's ASLoRA running averages do not match the adapter's B tensors")
        self.averages = {n: loaded[n].float().to(self.averages[n].device) for n in sorted(names)}


def _mix_optimizer_state(optimizer, keep: torch.nn.Parameter, drop: torch.nn.Parameter, mix) -> None:
    state = unwrap_optimizer(optimizer).state
    if keep not in state or drop not in state:
        return
    for key, value in state[keep].items():
        other = state[drop].get(key)
        if torch.is_tensor(value) and value.dim() > 0 and torch.is_tensor(other) and other.shape == value.shape:
            value.copy_(mix(value, other))  # moments; the step counter (a scalar) stays the survivor's


def _retire(optimizer, param: torch.nn.Parameter) -> None:
    opt = unwrap_optimizer(optimizer)
    for group in opt.param_groups:
        group["params"] = [p for p in group["params"] if p is not param]
    opt.state.pop(param, None)
