"""``fleet --bytes``: a fleet sized in bytes, stored as float32, int8 or int4, whichever keeps the most.

What a user of a fleet counts is bytes, and bytes can be spent two ways: on more shared directions
(``--budget``) or on fewer bits per number (``--quantize``). A float32 factor takes 4 bytes; stored as
b-bit integers in groups of g with a float16 scale per group it takes b/8 + 2/g (int8 about 1.03, int4
about 0.53 at g = 64), so the same bytes hold about 3.9x (int8) or 7.5x (int4) the parameters, each
number rounded. Which wins depends on the LoRAs: LoRAs trained from different seeds share few
directions, and cutting directions costs them far more than rounding does (on bench_fleet's 8 MiniLM
LoRAs at 1/8 of their bytes, the worst member kept 0.946 of its LoRA's accuracy in float32 and 0.991
in int8 or int4; docs/fleets.md).

So each storage is built at the budget of parameters its bytes allow (with ``--clusters auto``, the
first storage built searches the cluster count and the others take it) and the one with the least
update error, measured on the factors as they read back (quantized), is kept. Errors within ``TIE``
of the least (relative) are a tie, which the fewest bytes win: at a share large enough for every
storage to hold nearly all of the LoRAs (from about 0.27 up, int8 and int4 reach budget 1), float32
would otherwise take 4x int8's bytes for a thousandth less error. The bytes counted are the stored
factors' against the LoRAs' factors in float32; carried tensors (classifier heads) and configs are the
same in every storage and not counted. The guarantee: the chosen fleet's factors never take more than
the share.
"""

from __future__ import annotations

import dataclasses
import math

from .adapter import Adapter
from .errors import ShareportError
from .fleet import Fleet, build_fleet, check_compatible, fleet_share, floor_share
from .forms import AUTO_CLUSTERS, DEFAULT_GROUP_SIZE
from .quantization import BITS, quantize_fleet, update_error

STORAGES = (None, "int8", "int4")  # None: float32, the fleet as built
FLOAT32_BYTES = 4
TIE = 0.02  # relative errors within 2% of the least are a tie: the fewest bytes win
RETRIES = 4  # rebuilds at a smaller budget when scales over short rows overshoot the estimate
RANKED_BY = "weights: each member's update error against its LoRA as its stored factors read back, summed"


@dataclasses.dataclass
class Storage:
    """One storage tried: the float fleet built at its budget, and the figures the choice compares."""

    quantize: str | None
    fleet: Fleet | None  # None where the budget was refused
    budget: float
    stored: Fleet | None = None  # the fleet as it is written: ``fleet`` quantized as ``quantize`` says
    quantization: dict | None = None  # ``quantize_fleet``'s report of ``stored`` (None for float32)
    error: float = math.inf  # sum over members of ||dW - dW'||^2, dW' as stored
    energy: float = 0.0
    bytes: int = 0  # the stored factors
    refused: str | None = None

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.error / self.energy) if self.energy > 0 else 0.0

    def to_dict(self, lora_bytes: int) -> dict:
        out = {"storage": self.quantize or "float32", "budget": self.budget}
        if self.refused is not None:
            return {**out, "refused": self.refused}
        return {
            **out,
            "parameters": self.fleet.report.parameters,
            "bytes": self.bytes,
            "share": self.bytes / lora_bytes,
            "relative_error": self.relative_error,
        }


HINT_ERROR = 0.2  # a float fleet whose worst member's relative error is above this is pointed to --bytes


def bytes_hint(fleet: Fleet) -> list[str]:
    """For a float fleet that loses much of some member: the ``--bytes`` command at its own share (never
    more bytes), since the same bytes may keep more as integers."""
    worst = max(m.relative_error for m in fleet.report.members)
    if worst <= HINT_ERROR:
        return []
    return [
        f"the worst member's relative error is {worst:.3f}; the same bytes hold 3.9x the parameters as int8 "
        f"and 7.5x as int4: `--bytes {fleet_share(fleet):g}` (instead of --budget/--rank) builds float32, int8 "
        "and int4 and writes the one with the least error"
    ]


def check_bytes(share: float) -> None:
    if not 0 < share <= 1:
        raise ShareportError(f"--bytes must be a share of the LoRAs' bytes in (0, 1], got {share:g}")


def bytes_per_parameter(quantize: str | None, group_size: int) -> float:
    """Stored bytes per factor parameter: 4 in float32, b/8 + 2/g as b-bit integers in groups of g."""
    return FLOAT32_BYTES if quantize is None else BITS[quantize] / 8 + 2 / group_size


def parameter_budget(share: float, quantize: str | None, group_size: int) -> float:
    """The share of the LoRAs' parameters that ``share`` of their float32 bytes holds in this storage
    (at most 1: all of them), rounded down to 4 digits so a report's budget reproduces the fleet."""
    spend = share * FLOAT32_BYTES / bytes_per_parameter(quantize, group_size)
    return min(1.0, floor_share(spend))


def fleet_at_bytes(
    adapters: list[Adapter],
    names: list[str],
    form: str | None,
    *,
    share: float,
    clusters,
    group_size: int | None = None,
) -> tuple[Fleet, dict | None, dict]:
    """The fleet of ``adapters`` whose stored factors fill at most ``share`` of the LoRAs' float32 bytes
    with the least error (module docstring). Returns (that fleet as it is written; its
    ``quantize_fleet`` report, None for float32; the report: the share, the storages tried, the one
    chosen)."""
    check_bytes(share)
    check_compatible(adapters, names)  # what is not about the size fails as itself, before any build
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    lora_bytes = FLOAT32_BYTES * sum(a.num_parameters() for a in adapters)
    tried, count, reused = [], clusters, None
    for quantize in STORAGES:
        storage = _build(adapters, names, form, quantize, share, lora_bytes, count, group_size)
        tried.append(storage)
        if count == AUTO_CLUSTERS and storage.fleet is not None:
            # the float32 search's count, reused: the integer storages' larger budgets make each count of
            # the search slower (50 LoRAs: ~50 min against 2.5 with the count given), and on the fleets
            # measured every storage's own search chose the float32 count (docs/fleets.md)
            clusters_report = storage.fleet.report.clusters
            count = clusters_report["count"] if clusters_report else 1
            reused = storage.quantize or "float32"
    built = [s for s in tried if s.refused is None]
    if not built:
        reasons = "; ".join(f"{s.quantize or 'float32'}: {s.refused}" for s in tried)
        raise ShareportError(f"--bytes {share:g}: no storage fits ({reasons})")
    least = min(s.relative_error for s in built)
    best = min((s for s in built if s.relative_error <= least * (1 + TIE) + 1e-12), key=lambda s: s.bytes)
    report = {
        "share": share,
        "group_size": group_size,
        "lora_bytes": lora_bytes,
        "chosen": best.quantize or "float32",
        "ranked_by": RANKED_BY,
        "candidates": [s.to_dict(lora_bytes) for s in tried],
    }
    if reused is not None:  # --clusters auto: searched once, by the first storage built
        report["clusters"] = {"searched_by": reused, "count": count}
    return best.stored, best.quantization, report


def _build(adapters, names, form, quantize, share, lora_bytes, clusters, group_size) -> Storage:
    """The fleet stored as ``quantize`` at the largest budget (from the estimate down) whose bytes fit."""
    budget = parameter_budget(share, quantize, group_size)
    limit = share * lora_bytes
    for _ in range(RETRIES):
        if budget <= 0:
            return Storage(quantize, None, budget, refused="the bytes hold no parameter")
        try:
            fleet = build_fleet(adapters, names, form, budget=budget, clusters=clusters)
        except ShareportError as exc:  # e.g. below the form's smallest size
            return Storage(quantize, None, budget, refused=f"at budget {budget:g}, {exc}")
        stored, quantization, size = fleet, None, FLOAT32_BYTES * fleet.report.parameters
        if quantize is not None:
            stored, quantization = quantize_fleet(fleet, adapters, quantize, group_size=group_size)
            size = quantization["bytes"]
        if size <= limit:
            error = energy = 0.0
            for lora, member in zip(adapters, stored.members):
                e, n = update_error(lora, member)
                error, energy = error + e, energy + n
            return Storage(quantize, fleet, budget, stored, quantization, error=error, energy=energy, bytes=size)
        budget = floor_share(budget * limit / size)  # scales over short rows cost more than 2/g
    return Storage(quantize, None, budget, refused=f"its bytes stayed above {share:g} of the LoRAs'")
