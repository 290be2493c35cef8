"""`shareport train --target` picks the modules PEFT's ``target_modules`` would pick."""

import pytest
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from shareport.errors import ShareportError
from shareport.model.fresh import target_paths
from tests.tiny import tiny_bert, tiny_llama


def peft_paths(build, targets) -> list[str]:
    model = get_peft_model(build(), LoraConfig(r=2, target_modules=targets))
    prefix = "base_model.model."
    return sorted(name[len(prefix) :] for name, module in model.named_modules() if isinstance(module, LoraLayer))


@pytest.mark.parametrize(
    "build, targets",
    [
        (tiny_bert, ["query", "key", "value", "output.dense", "intermediate.dense"]),  # not the pooler's dense
        (tiny_bert, ["dense"]),  # every dense, the pooler's included
        (tiny_llama, ["q_proj", "v_proj"]),
        (tiny_llama, ["self_attn.o_proj", "mlp.down_proj"]),
    ],
)
def test_targets_match_peft(build, targets):
    assert target_paths(build(), targets) == peft_paths(build, targets)


def test_a_target_naming_no_module_is_refused():
    with pytest.raises(ShareportError, match="no module named 'attention.dense'"):
        target_paths(tiny_bert(), ["query", "attention.dense"])
