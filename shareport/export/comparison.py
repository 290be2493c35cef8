"""How an exported graph's outputs are compared with PyTorch's, and the report of it.

fp32 graphs are compared with PyTorch run in **float64** (the same float32-stored weights and
adapter, computed in float64: exact to float32's eyes), and the limit is set by how far PyTorch's
own float32 run is from it. Per comparison (one case, one output group):

    max |ORT - PyTorch float64| <= max(atol, MULTIPLE x max |PyTorch float32 - PyTorch float64|)

with atol 1e-4 (the floor) and MULTIPLE 8 (``REFERENCE_MULTIPLE``; another ``--atol`` scales it alike,
8 x atol / 1e-4, so the option tightens or loosens the whole limit, and ``--atol 0`` asks for an exact
match). float32 PyTorch is what a fixed
tolerance used to trust as the truth, but its own error grows with the model (bench_onnx's 33M-parameter
Llama: 7e-4 on the logits), so a fixed atol refuses correct exports of every real LLM. A graph is
accepted when it is within a small multiple of the error of the reference everyone accepts; the floor
keeps the old absolute bound where that error is tiny (small models: the limit is exactly atol).
Both sides use the same statistic (max abs over the same elements), so a single wrong position counts.
Why 8: ORT is another float32 implementation (other summation orders, fused kernels; a folded graph
also rounds W + s*B*A to float32, which the attached reference never does). Measured ORT/PyTorch
ratios of those max errors, where above the floor: 0.3 to 2.4 on most model/adapter draws, 3.4 on the
worst (4-layer, hidden 256, random r=16 LoRA); 8 leaves twice that. A real error is far above it: an
adapter scale off by 1.001 gives 50 to 600 times float32's own error (tests/export/test_verify_tolerance.py).

The float64 run converts the model in place to float64 and back (exact: float64 holds every float32
value), on CPU, once per set of checks: it holds the weights at twice their float32 size for that
while, which is accepted for a check that runs once per export; the float32 copy is not kept beside it.

fp16 graphs follow the same idea, with float16 PyTorch as the reference whose error is measured:

    max |ORT - PyTorch float64| <= max(rtol x max(1, max |PyTorch|), FP16_MULTIPLE x max |PyTorch float16 - PyTorch float64|)

rtol 2e-2 (the floor: fp16's 11-bit mantissa, relative step ~1e-3, errors accumulating over layers)
and FP16_MULTIPLE 4 (another ``--rtol`` scales it alike, 4 x rtol / 2e-2). The fixed share alone
refused correct fp16 exports of real models: on bench_onnx's 33M Llama (random r=16 LoRA) float16
PyTorch itself is up to 0.77 from float64 on its logits, and ORT fp16 0.90; a graph about as close to
the exact result as PyTorch's own fp16 run is as good as fp16 gets on that model. Measured ORT/float16
PyTorch ratios of those max errors: 0.4 to 0.9 (4-layer, hidden 256), 0.5 to 1.9 (the 33M Llama);
4 is twice the worst, smaller than fp32's 8 because float16's own error is already a large share of
the output. What the check can still see is limited by fp16 itself: on those two models an adapter
scaled by 1.001 moves the logits less than float16 PyTorch's own error and passes (as it did under
the fixed share); one scaled by 1.05 fails, 5 to 16 times float16's own error. On small models
PyTorch's fp16 error is far below the floor, so the floor decides and the check is as strict as before. The float16 run is the
model cast in place the way the exporter casts it (``model.half()``; the float32 values are kept
and put back, since float16 cannot hold them), on CPU: torch runs every op of these models in
float16 there, slowly (matmuls without fused kernels), once per set of checks.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..errors import ShareportError
from .choices import REFERENCE_MULTIPLE

REFERENCE_NAMES = {"fp32": "float32", "fp16": "float16"}  # the PyTorch run whose own error sets the limit


@dataclasses.dataclass
class Comparison:
    check: str  # "folded", "adapter active", "no adapter", "embedded default"
    case: str  # "b2 s5 p0"
    output: str
    max_abs: float
    mean_abs: float
    top1: float | None  # share of positions with the same argmax (logits only)
    limit: float
    ok: bool
    # max |PyTorch in the graph's dtype - PyTorch float64| over the same elements (the reference's own
    # error, which sets the limit); None in reports from before fp16 rows had one
    reference_error: float | None = None

    def describe(self, floor: float | None, multiple: float | None, dtype: str = "fp32") -> str:
        """One line: where, measured against allowed, and where the allowed value comes from."""
        where = f"{self.check}, {self.case}, {self.output}"
        if self.reference_error is None:
            return (
                f"{where}: ORT differs from PyTorch by {self.max_abs:.3g}, allowed {self.limit:.3g} "
                "(fp16: rtol of max(1, max |PyTorch|))"
            )
        own = f"{multiple:g} x {REFERENCE_NAMES[dtype]} PyTorch's own error {self.reference_error:.3g}"
        bound = f"the floor {floor:g}" if dtype == "fp32" else f"{floor:g} x max(1, max |PyTorch|)"
        return (
            f"{where}: ORT differs from float64 PyTorch by {self.max_abs:.3g}, allowed {self.limit:.3g} "
            f"(the larger of {own} and {bound})"
        )


@dataclasses.dataclass
class Report:
    graph: str
    mode: str
    dtype: str
    device: str
    tolerance: str
    rows: list[Comparison]
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. adapter names mapped from Olive's
    # limit = max(floor, multiple x reference_error); fp16: floor is rtol, of max(1, max |PyTorch|)
    floor: float | None = None
    multiple: float | None = None

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def rule(self) -> str:
        """How the limits were set, in words."""
        if self.multiple is None:
            return "ORT against float32 PyTorch; limit: the tolerance above"
        errors = [r.reference_error for r in self.rows if r.reference_error is not None]
        name = REFERENCE_NAMES[self.dtype]
        own = f"; {name} PyTorch's own error here: up to {max(errors):.2g}" if errors else ""
        floor = f"the floor {self.floor:g}" if self.dtype == "fp32" else f"{self.floor:g} x max(1, max |PyTorch|)"
        return (
            f"ORT against float64 PyTorch; limit per comparison: the larger of {floor} and "
            f"{self.multiple:g} x {name} PyTorch's own error against float64{own}"
        )

    def failure(self) -> str:
        """The failed comparison furthest over its limit, with measured and allowed values ('' if none)."""
        failed = [r for r in self.rows if not r.ok]
        if not failed:
            return ""
        worst = max(failed, key=lambda r: r.max_abs / r.limit if math.isfinite(r.max_abs) and r.limit > 0 else math.inf)
        more = f" (and {len(failed) - 1} more comparisons)" if len(failed) > 1 else ""
        return worst.describe(self.floor, self.multiple, self.dtype) + more

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for row in data["rows"]:  # only rows with a float64 run carry their reference's error
            if row["reference_error"] is None:
                del row["reference_error"]
        data["ok"] = self.ok
        if self.multiple is not None:
            data["rule"] = self.rule
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        fields = {k: v for k, v in data.items() if k not in ("ok", "rows", "rule")}
        return cls(**fields, rows=[Comparison(**row) for row in data["rows"]])


class VerifyMismatch(ShareportError):
    """A graph that does not match PyTorch within tolerance; ``report`` says where."""

    def __init__(self, report: "Report", message: str):
        super().__init__(message)
        self.report = report


def limit_for(
    dtype: str,
    reference: np.ndarray,
    atol: float,
    rtol: float,
    *,
    own_error: float | None = None,
    multiple: float = REFERENCE_MULTIPLE,
) -> float:
    """The larger of a floor and ``multiple`` x the reference's own error (``own_error``: max |PyTorch
    in the graph's dtype - PyTorch float64|). The floor: fp32 atol; fp16 rtol x max(1, max |reference|).
    A non-finite own error (PyTorch overflowed) widens nothing: its failure is no excuse for ORT's."""
    floor = rtol * max(1.0, float(np.abs(reference).max()) if reference.size else 0.0) if dtype == "fp16" else atol
    if own_error is None or not math.isfinite(own_error):
        return floor
    return max(floor, multiple * own_error)


def compare_outputs(
    check: str,
    case: str,
    names: list[str],
    got: list[np.ndarray],
    want: list[np.ndarray],
    dtype: str,
    atol: float,
    rtol: float,
    *,
    own: list[np.ndarray] | None = None,
    multiple: float = REFERENCE_MULTIPLE,
) -> list[Comparison]:
    """One row for the main output, one for all ``present.*`` together.

    ``want`` is the reference ORT is measured against; with ``own``, ``want`` is PyTorch in float64
    and ``own`` PyTorch's outputs in the graph's dtype, whose distance from ``want`` sets the limit
    (:func:`limit_for`).
    """
    groups: dict[str, list[tuple[np.ndarray, ...]]] = {}
    for i, (name, g, w) in enumerate(zip(names, got, want)):
        mine = () if own is None else (own[i].astype(np.float64),)
        groups.setdefault("present.*" if name.startswith("present.") else name, []).append(
            (g.astype(np.float64), w.astype(np.float64), *mine)
        )
    rows = []
    for output, pairs in groups.items():
        diff = np.concatenate([np.abs(p[0] - p[1]).ravel() for p in pairs])
        reference = np.concatenate([p[1].ravel() for p in pairs])
        own_error = None
        if own is not None:
            errors = np.concatenate([np.abs(p[2] - p[1]).ravel() for p in pairs])
            own_error = float(errors.max()) if errors.size else 0.0
        top1 = None
        if output == "logits":
            g, w = pairs[0][:2]
            top1 = float((g.argmax(-1) == w.argmax(-1)).mean())
        max_abs = float(diff.max()) if diff.size else 0.0
        limit = limit_for(dtype, reference, atol, rtol, own_error=own_error, multiple=multiple)
        rows.append(
            Comparison(
                check,
                case,
                output,
                max_abs,
                float(diff.mean()) if diff.size else 0.0,
                top1,
                limit,
                bool(np.isfinite(diff).all()) and max_abs <= limit,
                own_error,
            )
        )
    return rows
