"""The forms an adapter can take, what shareport needs to know of each, and the conversion defaults.

One row per form (``ROWS``): which factors it shares across a kind's layers, whether its B's
are shared per group of layers (ASLoRA: ``--groups``, ``--grouping``, train's merging), whether
every site keeps its own rank (plain LoRA: truncated per site, written as PEFT), the budget it
is planned at when no size is given, and how its tensors are named in the pool. The math of
each form is its row in ``converters/forms.py``; tests/cli/test_cli_flags.py checks the two agree.
A form's name is compared as a string only in these two registries (tests/end_to_end/test_architecture.py).

Pool names, so that a shared tensor has one name used by many sites:

    ShareA   "<kind>.lora_A" (shared)           "<site>.lora_B"
    ShareB   "<site>.lora_A"                    "<kind>.lora_B" (shared)
    ShareAB  "<kind>.lora_A"                    "<kind>.lora_B"
    ASLoRA   "<kind>.lora_A"                    "<kind>.group<g>.lora_B" (one per group of layers)
    LoRA     "<site>.lora_A"                    "<site>.lora_B" (each site truncated on its own)

Kind names hold no layer index and site paths always do, so the two never collide.

No torch here: the command line names these in its options' choices and defaults, and ``--help``
or a usage error should not wait seconds for torch to load. The library modules import them from
here. Three mirror a value of ``converters`` (whose package imports torch);
tests/cli/test_cli_flags.py checks that they agree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FormInfo:
    name: str
    shares: tuple[str, ...]  # the factors ("A", "B") that are one tensor per kind
    grouped: bool = False  # B's shared per group of layers: takes --groups and --grouping
    per_site: bool = False  # every site keeps its own factors at its own rank: a plain PEFT LoRA
    default_budget: float | None = None  # with no --rank, --energy or --budget: planned at this budget

    def tensor_names(
        self, kind: str, site_paths: list[str], *, a_count: int, b_count: int
    ) -> tuple[list[str], list[str]]:
        """Pool names of a converted kind's ``a_count`` unique A's and ``b_count`` unique B's
        (``site_paths`` in the kind's layer order); a lone tensor of a shared form is the kind's."""

        def per_site(count: int, which: str) -> list[str]:
            return [f"{site_paths[i]}.lora_{which}" for i in range(count)]

        if self.per_site:
            return per_site(a_count, "A"), per_site(b_count, "B")
        a_names = [f"{kind}.lora_A"] if a_count == 1 else per_site(a_count, "A")
        if b_count == 1:
            b_names = [f"{kind}.lora_B"]
        elif self.grouped:
            b_names = [f"{kind}.group{g}.lora_B" for g in range(b_count)]
        else:
            b_names = per_site(b_count, "B")
        return a_names, b_names


# with no --rank, --energy or --budget, ASLoRA is planned at this budget (the paper's "25% of the LoRA";
# converters.DEFAULT_ASLORA_BUDGET)
DEFAULT_ASLORA_BUDGET = 0.25

# in the order --to auto tries them (on equal error the first wins) and frontier lists them
ROWS = (
    FormInfo("lora", shares=(), per_site=True),  # shares nothing: also a fresh LoRA with PEFT's default init
    FormInfo("sharea", shares=("A",)),
    FormInfo("shareb", shares=("B",)),
    FormInfo("shareab", shares=("A", "B")),
    FormInfo("aslora", shares=("A",), grouped=True, default_budget=DEFAULT_ASLORA_BUDGET),
)
FORMS = {row.name: row for row in ROWS}
FORM_NAMES = tuple(FORMS)
PER_SITE_FORMS = tuple(row.name for row in ROWS if row.per_site)
GROUPED_FORMS = tuple(row.name for row in ROWS if row.grouped)

# shareport convert --to: every form, the shared ones first, or "auto" (each form at --budget; the best wins)
AUTO = "auto"
TARGET_FORMS = tuple(row.name for row in ROWS if not row.per_site) + PER_SITE_FORMS + (AUTO,)
# how ASLoRA may group the layers that share a B (converters.grouping.GROUPINGS)
GROUPINGS = ("any", "adjacent")
# calibrated conversion: sequences, tokens per sequence, and the ridge (converters.DEFAULT_RIDGE)
CALIBRATION_SAMPLES = 128
CALIBRATION_MAX_LENGTH = 128
CALIBRATION_RIDGE = 1e-2

# shareport fleet --form (converters.FLEET_FORMS)
FLEET_FORMS = ("sharea", "shareab")
# fleet with neither --rank nor --budget: the target size, 1/8 of the N separate LoRAs
DEFAULT_FLEET_BUDGET = 0.125
# shareport fleet --clusters: "auto" searches 1 to N/2 clusters at the budget, about 2 log2(N/2) + 2 of
# them (converters.fleet_clusters.search_counts; docs/fleets.md, measured)
AUTO_CLUSTERS = "auto"
DEFAULT_FLEET_CLUSTERS = AUTO_CLUSTERS

# which factors each form shares across the layers of a kind (shareport train --form)
SHARED = {row.name: row.shares for row in ROWS}

# shareport convert --quantize: integer storage of the factors, and its default group size (along each
# factor's model dimension; measured on the docstrings MiniLM LoRA, docs/conversion.md "Quantized storage")
QUANTIZE_CHOICES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 64
