"""Dataclasses shared by the converters: one kind's input, a conversion result, a plan entry."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

# Two A's count as "the same matrix" (a ShareLoRA checkpoint saved through PEFT clones one
# tensor into every layer) when they differ by no more than this, relative to their size.
SHARED_A_RTOL = 1e-6
# slack for "reaches the energy target", so that a target of exactly 1.0 survives roundoff
# (budget.choose_by_energy, truncate.rank_for_energy)
ENERGY_SLACK = 1e-12


@dataclass(frozen=True)
class KindFactors:
    """The sites of one kind, in float64, scale folded into B: ``dW_l = bts[l] @ as_[l]``.

    ``as_[l]`` is (r_l, n_in), ``bts[l]`` is (n_out, r_l); the ranks r_l may differ per site.
    ``out_dtype`` is the dtype the converters hand back (float32 for half inputs, else the input's).
    """

    as_: list[Tensor]
    bts: list[Tensor]
    out_dtype: torch.dtype

    @classmethod
    def from_lists(cls, As: list[Tensor], Bts: list[Tensor]) -> "KindFactors":
        if len(As) == 0 or len(As) != len(Bts):
            raise ValueError(f"need the same positive number of A's and B's, got {len(As)} and {len(Bts)}")
        n_in, n_out = As[0].shape[1], Bts[0].shape[0]
        for pos, (a, bt) in enumerate(zip(As, Bts)):
            if a.dim() != 2 or bt.dim() != 2:
                raise ValueError(f"site {pos}: A and B must be matrices")
            if a.shape[1] != n_in or bt.shape[0] != n_out:
                raise ValueError(
                    f"site {pos}: shape A {tuple(a.shape)} / B {tuple(bt.shape)} differs "
                    f"from the kind's (n_out={n_out}, n_in={n_in})"
                )
            if bt.shape[1] != a.shape[0]:
                raise ValueError(f"site {pos}: B has {bt.shape[1]} columns but A has {a.shape[0]} rows")
        out_dtype = torch.promote_types(As[0].dtype, torch.float32)
        f64 = torch.float64
        return cls([a.detach().to(f64) for a in As], [b.detach().to(f64) for b in Bts], out_dtype)

    @property
    def n_sites(self) -> int:
        return len(self.as_)

    @property
    def n_in(self) -> int:
        return self.as_[0].shape[1]

    @property
    def n_out(self) -> int:
        return self.bts[0].shape[0]

    @property
    def max_rank(self) -> int:
        return max(a.shape[0] for a in self.as_)

    def transposed(self) -> "KindFactors":
        """The kind of the transposed updates ``dW_l^T = A_l^T Bt_l^T`` (ShareB is ShareA on these)."""
        return KindFactors([bt.T for bt in self.bts], [a.T for a in self.as_], self.out_dtype)

    def a_is_shared(self) -> bool:
        """True when every A_l equals A_0 up to float tolerance (a ShareLoRA / ShareA checkpoint)."""
        first = self.as_[0]
        if first.numel() == 0:
            return all(a.shape == first.shape for a in self.as_)
        tol = SHARED_A_RTOL * float(first.abs().max())
        return all(a.shape == first.shape and float((a - first).abs().max()) <= tol for a in self.as_[1:])


@dataclass(frozen=True)
class KindResult:
    """One kind converted to a shared form.

    Site l's update is ``b_tensors[b_index[l]] @ a_tensors[a_index[l]]`` (scale 1.0: folded into B).
    ``groups[g]`` lists the site positions that use B number g.
    ``error`` is the exact ``sum_l ||dW_l - B A||_F^2``; ``energy`` is ``sum_l ||dW_l||_F^2``.
    ``spectrum`` holds the per-rank error decrease of the method's projection, descending:
    ``error(k) = energy - spectrum[:k].sum()``. For ASLoRA it is the spectrum of the stack of
    ``sqrt|g| mean_g dW`` at the final grouping: that formula then gives the error with A refit
    for that grouping (the reported error equals it when the alternation ended on a refit).
    ``already_shared`` says the input's A's were identical (ShareLoRA checkpoint).
    ``error_history`` is the ASLoRA error after each accepted step (one entry for other methods).
    """

    method: str
    a_tensors: list[Tensor]
    b_tensors: list[Tensor]
    a_index: list[int]
    b_index: list[int]
    rank: int
    groups: list[list[int]]
    error: float
    energy: float
    spectrum: Tensor
    already_shared: bool
    error_history: list[float] = field(default_factory=list)

    @classmethod
    def from_float64(
        cls,
        kind: KindFactors,
        method: str,
        a_tensors: list[Tensor],
        b_tensors: list[Tensor],
        a_index: list[int],
        b_index: list[int],
        groups: list[list[int]],
        error: float,
        energy: float,
        spectrum: Tensor,
        error_history: list[float] | None = None,
    ) -> "KindResult":
        """Assemble a result from float64 factors: casts them to the kind's output dtype, reads
        the rank off the shared factor and records whether the input's A's were shared."""
        return cls(
            method=method,
            a_tensors=[a.to(kind.out_dtype) for a in a_tensors],
            b_tensors=[b.to(kind.out_dtype) for b in b_tensors],
            a_index=a_index,
            b_index=b_index,
            rank=a_tensors[0].shape[0],
            groups=groups,
            error=error,
            energy=energy,
            spectrum=spectrum,
            already_shared=kind.a_is_shared(),
            error_history=error_history if error_history is not None else [error],
        )

    @property
    def relative_error(self) -> float:
        """sqrt(error / energy): the Frobenius error relative to the updates' norm."""
        return (self.error / self.energy) ** 0.5 if self.energy > 0 else 0.0

    @property
    def retained_energy(self) -> float:
        return 1.0 - self.error / self.energy if self.energy > 0 else 1.0

    @property
    def n_sites(self) -> int:
        return len(self.a_index)

    def site_factors(self, pos: int) -> tuple[Tensor, Tensor]:
        """(B, A) of site ``pos``: its update is B @ A."""
        return self.b_tensors[self.b_index[pos]], self.a_tensors[self.a_index[pos]]

    def parameter_count(self) -> int:
        """Parameters stored: every unique tensor counts once."""
        return sum(t.numel() for t in self.a_tensors) + sum(t.numel() for t in self.b_tensors)


@dataclass(frozen=True)
class Option:
    """One candidate setting of a kind for rank/budget planning.

    ``error`` is exact for sharea/shareb/shareab; for aslora it is the ShareA error at ``rank``
    plus the grouping cost at that A, an upper bound of what the alternating refit reaches.
    """

    rank: int
    groups: int | None
    params: int
    error: float


@dataclass(frozen=True)
class KindPlan:
    """The setting chosen for one kind, with what it costs and the error it is expected to leave."""

    rank: int
    groups: int | None
    params: int
    estimated_error: float
    energy: float
    lora_params: int
