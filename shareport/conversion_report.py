"""What a conversion reports: per kind and in total, against the source LoRA's parameters.

Sizes are counted against one denominator everywhere: the parameters of the *source LoRA*, the
plain LoRA the adapter first came from (``provenance["source_parameters"]``, kept through
recovery and any re-conversion); ``--budget`` is a fraction of it and ``ratio`` is measured by it.
"""

from __future__ import annotations

import dataclasses
import math

# a kind keeping less than this fraction of its energy gets a warning
LOW_ENERGY = 0.5


@dataclasses.dataclass
class KindReport:
    kind: str
    sites: int
    lora_rank: int
    rank: int  # the largest site rank (shared forms: the shared rank)
    groups: list[list[int]]  # layers that share a B
    relative_error: float
    retained_energy: float
    parameters_before: int
    parameters_after: int
    already_shared: bool
    site_ranks: dict[str, int]  # per site path; 0: the site is no longer adapted (dropped)
    error: float  # sum_l ||dW_l - dW'_l||_F^2 over the kind's sites (calibrated: the calibrated objective)
    energy: float  # sum_l ||dW_l||_F^2 (calibrated: the same objective of dW' = 0)
    calibration: dict | None = None  # calibrated conversions only: see ``convert_options.Calibration``


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did. ``ratio`` is measured against ``source_parameters``, the source
    LoRA's parameter count (the same denominator ``inspect`` and ``--budget`` use)."""

    form: str
    parameters_before: int  # the input adapter's
    parameters_after: int
    kinds: list[KindReport]
    source_parameters: int
    settings: dict = dataclasses.field(default_factory=dict)  # as recorded in the provenance
    warnings: list[str] = dataclasses.field(default_factory=list)
    candidates: list[dict] = dataclasses.field(default_factory=list)  # --to auto: every form tried
    winner: str | None = None  # --to auto: the form written
    ranked_by: str | None = None  # --to auto: what the candidates were ranked by (the error measure's ``describes``)
    serving: dict | None = None  # a serving rule's plan against the unconstrained one (``measures.serving_summary``)

    @property
    def ratio(self) -> float:
        return self.parameters_after / self.source_parameters

    @property
    def error(self) -> float:
        return sum(k.error for k in self.kinds)

    @property
    def energy(self) -> float:
        return sum(k.energy for k in self.kinds)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for kind in data["kinds"]:
            if kind["calibration"] is None:
                del kind["calibration"]  # plain conversions report what they always did
        if data["serving"] is None:
            del data["serving"]  # only a serving rule reports it
        data["ratio"] = self.ratio
        data["relative_error"] = relative(self.error, self.energy)
        return data


def relative(error: float, energy: float) -> float:
    """sqrt(error / energy): an error relative to the updates' norm (0 for no energy)."""
    return math.sqrt(error / energy) if energy > 0 else 0.0


def size_hint(
    *, rank: int | None = None, energy: float | None = None, budget: float | None = None, default_budget: float | None
) -> str:
    """What to try for a result that keeps more, named by the option that set its size (or the
    default budget that did): one wording for conversions and fleets."""
    if rank is not None:
        return f"a larger --rank than {rank}"
    if energy is not None:
        return f"a larger --energy than {energy:g}"
    if budget is not None:
        return f"a larger --budget than {budget:g}"
    if default_budget is not None:
        return f"a --budget above the default {default_budget:g}"
    return "a larger --rank or --budget"


def energy_warnings(kinds: list[KindReport], hint: str) -> list[str]:
    """One line per kind keeping under ``LOW_ENERGY`` of its energy (the CLI prints them); ``hint``:
    ``ConvertOptions.size_hint``."""
    return [
        f"{k.kind} keeps only {k.retained_energy:.1%} of its energy (under {LOW_ENERGY:.0%}); try {hint}"
        for k in kinds
        if k.retained_energy < LOW_ENERGY
    ]
