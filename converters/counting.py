"""Parameter counts of each form for one kind (unique tensors count once).

For L sites of shape (n_out, n_in), rank k, G groups:

    lora     sum_l r_l (n_in + n_out)
    sharea   k n_in + L k n_out
    shareb   k n_out + L k n_in
    shareab  k (n_in + n_out)
    aslora   k n_in + G k n_out
"""
from __future__ import annotations

METHODS = ("sharea", "shareb", "shareab", "aslora")


def lora_parameter_count(n_out: int, n_in: int, ranks: list[int]) -> int:
    """Parameters of a plain LoRA with one (A, B) pair of rank ranks[l] per site."""
    return sum(ranks) * (n_in + n_out)


def parameter_count(method: str, n_out: int, n_in: int, n_sites: int, rank: int,
                    groups: int | None = None) -> int:
    """Parameters of one kind converted to ``method`` (or "lora" with every site at ``rank``)."""
    if method == "lora":
        return lora_parameter_count(n_out, n_in, [rank] * n_sites)
    if method == "sharea":
        return rank * n_in + n_sites * rank * n_out
    if method == "shareb":
        return rank * n_out + n_sites * rank * n_in
    if method == "shareab":
        return rank * (n_in + n_out)
    if method == "aslora":
        if groups is None:
            raise ValueError("aslora needs the number of groups")
        return rank * n_in + groups * rank * n_out
    raise ValueError(f"method must be 'lora' or one of {METHODS}, got {method!r}")
