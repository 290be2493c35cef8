"""The forms an adapter can be converted to and the conversion defaults: names and numbers only.

No torch here: the command line names these in its options' choices and defaults, and ``--help``
or a usage error should not wait seconds for torch to load. The library modules import them from
here. Three mirror a value of ``converters`` (whose package imports torch);
tests/test_cli_flags.py checks that they agree.
"""

# shareport convert --to
TARGET_FORMS = ("sharea", "shareb", "shareab", "aslora", "lora", "auto")
# how ASLoRA may group the layers that share a B (converters.grouping.GROUPINGS)
GROUPINGS = ("any", "adjacent")
# with no --rank, --energy or --budget, ASLoRA is planned at this budget (the paper's "25% of the LoRA";
# converters.DEFAULT_ASLORA_BUDGET)
DEFAULT_ASLORA_BUDGET = 0.25
# calibrated conversion: sequences, tokens per sequence, and the ridge (converters.DEFAULT_RIDGE)
CALIBRATION_SAMPLES = 128
CALIBRATION_MAX_LENGTH = 128
CALIBRATION_RIDGE = 1e-2

# shareport fleet --form (converters.FLEET_FORMS)
FLEET_FORMS = ("sharea", "shareab")
# fleet with neither --rank nor --budget: the target size, 1/8 of the N separate LoRAs
DEFAULT_FLEET_BUDGET = 0.125
# shareport fleet --clusters: "auto" tries 1 to N/2 clusters at the budget (docs/fleets.md, measured)
AUTO_CLUSTERS = "auto"
DEFAULT_FLEET_CLUSTERS = AUTO_CLUSTERS

# which factors each form shares across the layers of a kind (shareport train --form)
# ("lora" shares nothing: a plain LoRA with PEFT's default init, e.g. the demo's teacher)
SHARED = {"lora": (), "sharea": ("A",), "shareb": ("B",), "shareab": ("A", "B"), "aslora": ("A",)}
