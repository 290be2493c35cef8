"""A quantized adapter recovers into a quantized adapter, never into one worse than it was given.

Recovery trains float values: the start's integers, dequantized. Publishing those as float32 would
make the adapter 4x (int8) to 8x (int4) the bytes it came in, silently, and past the size the user
chose (``convert --quantize``, ``fleet --quantize`` or ``--bytes``). So a start that holds integers
is published the same way (``quantization.quantized_like``). Rounding moves the adapter away from the
best step the run kept, so the guarantee is checked on what is published: the stored adapter is
scored on the split that picks the best step and published only if it beats the start there;
otherwise the start itself is, unchanged.
"""

from __future__ import annotations

from typing import Callable

from ..adapter import Adapter
from ..quantization import quantized_like


def stored_as_start(
    trained: Adapter,
    start: Adapter,
    *,
    kept_start: bool,
    score: Callable[[Adapter], float],
    start_score: float,
) -> tuple[Adapter, bool]:
    """(what to publish, whether it is the trained adapter requantized) for a quantized ``start``.
    ``score``: the selection score of an adapter (lower is better); ``start_score``: the start's."""
    if kept_start:  # nothing beat the start: publish it as it came, integers and all
        return start, False
    stored = quantized_like(trained, start)
    if score(stored) < start_score:
        return stored, True
    return start, False
