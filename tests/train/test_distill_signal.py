"""More signal per example (issue 26, item 4): the distillation temperature, whose default follows the
model's output (schedule.py: a classifier's class distribution is softened, a causal LM's tokens are
not), and the site-update term (``--site-weight``, a share of the KL, its default also by the output).

A default run's training loss must equal the run's at the documented values and differ from runs at
others, so a default that is not applied, or applied to the wrong output, fails; the report's recipe
records the values used. The softened KL is checked against torch's own ``kl_div``; the site term
against each site's update formed by hand from the factors and the input a forward hook saw; a
compiled run against an eager one.
"""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from shareport.files.adapters import load_adapter, save_adapter
from shareport.model.surgery import attach
from shareport.train.distill import Outputs, distill_sum
from shareport.train.jobs import TrainingOptions, recovery_job
from shareport.train.recipe import run
from shareport.train.schedule import (
    CLASSIFIER_SITE_WEIGHT,
    CLASSIFIER_TEMPERATURE,
    TOKEN_SITE_WEIGHT,
    TOKEN_TEMPERATURE,
)
from shareport.train.sites import recording, site_sum
from tests.tiny import tiny_bert
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


def _recover(
    paths: dict,
    temperature: float | None = None,
    site_weight: float | None = None,
    compile=None,
    steps: int = 4,
):
    job = recovery_job(paths["shared"], paths["base"], paths["lora"], data_path=paths["text"], max_length=16)
    options = TrainingOptions(
        steps=steps, lr=1e-2, batch_size=4, max_length=16, temperature=temperature, site_weight=site_weight
    )
    recipe = options.recipe(job.student, distill_weight=1.0, task_weight=0.0)
    if compile:
        recipe = dataclasses.replace(recipe, compile=compile)
    return run(job, recipe)


@pytest.mark.parametrize(
    "which, temperature, site_weight",
    [("classifier", CLASSIFIER_TEMPERATURE, CLASSIFIER_SITE_WEIGHT), ("causal", TOKEN_TEMPERATURE, TOKEN_SITE_WEIGHT)],
)
def test_default_signal_is_the_outputs_own(request, which, temperature, site_weight):
    """The training loss (what the settings change; the published adapter may be the start again,
    kept as the best) of a default run equals the one at the documented values and no other."""
    paths = request.getfixturevalue(which)
    _, report = _recover(paths)
    assert (report["recipe"]["temperature"], report["recipe"]["site_weight"]) == (temperature, site_weight)
    loss = report["final_train_loss"]
    assert loss == _recover(paths, temperature, site_weight)[1]["final_train_loss"]
    assert loss != _recover(paths, 2.0 * temperature + 1.0, site_weight)[1]["final_train_loss"]
    assert loss != _recover(paths, temperature, site_weight + 0.5)[1]["final_train_loss"]


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


def test_site_term_is_each_sites_update_error_relative_to_the_teachers(classifier):
    """Student and teacher attached to two copies of the base; each site's update is rebuilt by hand
    as scale * x A^T B^T from the input a hook saw, and the term from those."""
    student, teacher = load_adapter(classifier["shared"]), load_adapter(classifier["lora"])
    models = [tiny_bert(layers=2, num_labels=3).eval() for _ in range(2)]
    handles = [attach(models[0], student, trainable=True), attach(models[1], teacher)]
    inputs = {0: {}, 1: {}}
    for i, handle in enumerate(handles):
        for path, wrapper in handle.wrappers.items():
            wrapper.register_forward_hook(lambda m, args, out, i=i, path=path: inputs[i].__setitem__(path, args[0]))
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 40, (3, 7), generator=generator)
    counted = torch.ones(3, 7, dtype=torch.long)
    counted[0, 5:] = 0
    counted[2, 3:] = 0
    with recording(handles[0].wrappers):
        models[0](input_ids=ids, attention_mask=counted)
    with torch.no_grad(), recording(handles[1].wrappers):
        models[1](input_ids=ids, attention_mask=counted)
    mask, expected = counted.bool(), []
    with torch.no_grad():
        for path in sorted(handles[0].wrappers):
            s_site, t_site = student.sites[path], teacher.sites[path]
            # (batch, seq, n_in) @ (n_in, r) @ (r, n_out)
            mine = inputs[0][path] @ student.tensors[s_site.a].T @ student.tensors[s_site.b].T * s_site.scale
            theirs = inputs[1][path] @ teacher.tensors[t_site.a].T @ teacher.tensors[t_site.b].T * t_site.scale
            expected.append(((mine - theirs)[mask].square().sum() / theirs[mask].square().sum()).item())
    total, rows = site_sum(handles[0].wrappers, handles[1].wrappers, counted)
    assert rows == 3 and len(expected) == len(student.sites) > 1
    assert total.item() / rows == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    total.backward()  # the student's factors get a gradient through the recorded updates
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in handles[0].parameters.values())


@pytest.mark.parametrize("which", ["classifier", "causal"])
def test_site_term_is_a_share_of_the_kl(request, which):
    """On one step (the start's parameters, the same batch) the loss with site weight w is (1 + w)
    times the KL alone: the site term is rescaled to the KL's size, so a weight means the same share
    whether the KL is large or the student is already near its teacher."""
    paths = request.getfixturevalue(which)
    kl_alone = _recover(paths, site_weight=0.0, steps=1)[1]["final_train_loss"]
    for weight in (0.5, 2.0):
        loss = _recover(paths, site_weight=weight, steps=1)[1]["final_train_loss"]
        assert loss == pytest.approx((1.0 + weight) * kl_alone, rel=1e-5)


def test_share_keeps_the_terms_gradient_direction():
    """The rescaled term's gradient is the term's own times reference / term (both held constant)."""
    from shareport.train.accel import make_accelerator
    from shareport.train.recipe import _as_share_of

    x = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    term, reference = (x**2).sum(), torch.tensor(0.07)
    (share_grad,) = torch.autograd.grad(_as_share_of(term, reference, make_accelerator(merging=False)), x)
    assert torch.allclose(share_grad, 2 * x.detach() * (0.07 / term.item()), rtol=1e-6)


def test_site_weight_trains_the_same_compiled_as_eager(classifier):
    eager, eager_report = _recover(classifier, site_weight=1.0)
    compiled, compiled_report = _recover(classifier, site_weight=1.0, compile="aot_eager")
    assert compiled_report["final_train_loss"] == pytest.approx(eager_report["final_train_loss"], rel=1e-5)
    for name, tensor in eager.tensors.items():
        torch.testing.assert_close(compiled.tensors[name], tensor, rtol=1e-5, atol=1e-6)
