"""What a fleet reports: per member its error, energy kept and stored parameters; the shared basis
per kind; the candidates and clusters tried; a warning per member keeping under half its energy.
``FleetReport.to_dict``/``from_dict`` are ``fleet_report.json``'s two directions."""

from __future__ import annotations

import dataclasses
import math

from .conversion_report import LOW_ENERGY


@dataclasses.dataclass
class MemberReport:
    name: str
    lora_parameters: int  # its own LoRA's (the source LoRA's, if it was converted before)
    parameters: int  # what the member stores on its own (cores)
    relative_error: float  # sqrt(sum ||dW - dW'||^2 / sum ||dW||^2) over all its sites (calibrated: the objective)
    kind_errors: dict[str, float]  # the same, per kind
    retained_energy: float = 1.0  # 1 - relative_error^2: the share of its energy (update or outputs) kept
    frobenius_relative_error: float | None = None  # calibrated fleets only: the plain weight error


@dataclasses.dataclass
class FleetReport:
    form: str
    members: list[MemberReport]
    shared_parameters: int
    kinds: dict[str, dict]  # per kind: ranks [k1 (U, 0 for sharea), k2 (V)], shared parameters, relative error
    settings: dict  # rank or budget as asked
    candidates: list[dict] = dataclasses.field(default_factory=list)  # form chosen by fleet: every form tried
    ranked_by: str | None = None  # what the candidates were ranked by (form chosen by fleet only)
    warnings: list[str] = dataclasses.field(default_factory=list)  # members keeping under LOW_ENERGY
    calibration: dict | None = None  # calibrated fleets: data, base, ridge, per member samples and tokens
    additions: list[dict] = dataclasses.field(default_factory=list)  # fleet add: one entry per member added
    # clustered fleets, or several cluster counts tried: count, members (name -> cluster), candidates
    clusters: dict | None = None
    # plain fleets: each member truncated alone at the fleet's share of the parameters (``fleet.against_alone``)
    alone: dict | None = None

    @property
    def lora_parameters(self) -> int:
        return sum(m.lora_parameters for m in self.members)

    @property
    def parameters(self) -> int:
        return self.shared_parameters + sum(m.parameters for m in self.members)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for optional in ("additions", "clusters", "alone"):  # without them, a fleet writes the report it always did
            if not data[optional]:
                del data[optional]
        data.update(
            lora_parameters=self.lora_parameters,
            parameters=self.parameters,
            ratio=self.parameters / self.lora_parameters,
        )
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "FleetReport":
        """The report ``to_dict`` wrote (its derived totals dropped); KeyError/TypeError if it is not one."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in data.items() if k in fields}
        kept["members"] = [MemberReport(**m) for m in data["members"]]
        return cls(**kept)


def member_warnings(members: list[MemberReport], hint: str, calibrated: bool = False) -> list[str]:
    """One line per member keeping under ``LOW_ENERGY`` of its energy: its squared error is more than
    half its squared norm (relative error above sqrt(1/2) ~ 0.707); ``hint``: ``conversion_report.size_hint``."""
    what = "output energy on its calibration data" if calibrated else "update's energy"
    return [
        f"member {m.name} keeps only {m.retained_energy:.1%} of its {what} (relative error "
        f"{m.relative_error:.3f}, above {math.sqrt(1 - LOW_ENERGY):.3f}); try {hint}"
        for m in members
        if m.retained_energy < LOW_ENERGY
    ]
