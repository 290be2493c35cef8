"""Choices of ASLoRA's merges during training and of ``shareport frontier``: names and numbers only.

No torch here, so the command line can offer them without loading it (``--help``, usage errors);
``merging`` and ``frontier`` import them from here.
"""

# merging: how two groups merge (the lower takes the upper's B, or both take the mean) and which may
MERGE_MODES = ("tie", "mean")
MERGE_PAIRS = ("adjacent", "any")

# frontier: the forms and sizes (fractions of the LoRA's parameters) tried, and the largest size allowed
FRONTIER_FORMS = ("lora", "sharea", "shareb", "shareab", "aslora")
DEFAULT_FRONTIER_BUDGETS = (0.05, 0.1, 0.25, 0.5)
MAX_FRONTIER_BUDGET = 1.5
