"""The distillation temperature's default follows the model's output (issue 26, item 4): a classifier's
class distribution is softened (schedule.CLASSIFIER_TEMPERATURE), a causal LM's tokens are not.

Each default run is compared with runs at explicit temperatures on the same inputs: it must equal
the one at the documented value bit for bit and differ from the other, so a default that is not
applied, or applied to the wrong output, fails. The report's recipe records the value used. The
softened KL itself is checked against torch's own ``kl_div`` on softened distributions.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from shareport.files.adapters import load_adapter, save_adapter
from shareport.train.distill import Outputs, distill_sum
from shareport.train.jobs import TrainingOptions, recovery_job
from shareport.train.recipe import run
from shareport.train.schedule import CLASSIFIER_TEMPERATURE, TOKEN_TEMPERATURE
from tests.training_helpers import classifier_lora, recovery_setup, sharea_by_svd


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    base, _ = classifier_lora(root, num_labels=3)
    save_adapter(sharea_by_svd(load_adapter(root / "lora"), 1), root / "shared")
    words = ["cat", "dog", "bird", "sun", "tree", "boat", "rain", "song"]
    rows = [{"text": f"the {w} sat by the {v}."} for w in words for v in words]
    (root / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return {"base": base, "lora": root / "lora", "shared": root / "shared", "text": root / "d.jsonl"}


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    return recovery_setup(tmp_path_factory.mktemp("causal"))


def _recover(paths: dict, temperature: float | None):
    job = recovery_job(paths["shared"], paths["base"], paths["lora"], data_path=paths["text"], max_length=16)
    options = TrainingOptions(steps=4, lr=1e-2, batch_size=4, max_length=16, temperature=temperature)
    return run(job, options.recipe(job.student, distill_weight=1.0, task_weight=0.0))


@pytest.mark.parametrize(
    "which, expected, other", [("classifier", CLASSIFIER_TEMPERATURE, 1.0), ("causal", TOKEN_TEMPERATURE, 4.0)]
)
def test_default_temperature_is_the_outputs_own(request, which, expected, other):
    paths = request.getfixturevalue(which)
    default, report = _recover(paths, None)
    assert report["recipe"]["temperature"] == expected
    same, _ = _recover(paths, expected)
    different, _ = _recover(paths, other)
    for name, tensor in default.tensors.items():
        assert torch.equal(tensor, same.tensors[name]), name
    assert any(not torch.equal(t, different.tensors[n]) for n, t in default.tensors.items())


def test_softened_kl_is_t_squared_times_the_kl_of_softened_distributions():
    generator = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(6, 12, generator=generator), torch.randn(6, 12, generator=generator)
    for temperature in (1.0, 2.0, 4.0):
        total, rows = distill_sum(Outputs(student, True), Outputs(teacher, True), temperature)
        reference = F.kl_div(
            F.log_softmax(student / temperature, dim=-1),
            F.log_softmax(teacher / temperature, dim=-1),
            log_target=True,
            reduction="sum",
        )
        assert rows == 6
        assert torch.allclose(total, reference * temperature**2, rtol=1e-5, atol=1e-7)
