"""``finetune --trainable cores``: only small cores between frozen orthonormal bases train (issue 26, item 5).

- the split is exact: an orthonormal basis times a core gives the factor back (checked by a dense
  reconstruction and the basis' Gram matrix);
- after training, every factor still lies in its start's column (B) or row (A) space, shared
  tensors are still shared, and held-out KL went down; the trained count is r^2 per tensor;
- the same run twice gives the same bytes; an adapter equal to its teacher stays exactly equal;
- what cannot run with cores is refused in one line, nothing written (``test_recovery_best``).
"""

import json

import pytest
import torch

from shareport.files.adapters import load_adapter
from shareport.train.cores import split
from shareport.train.jobs import TrainingOptions, recovery_job
from shareport.train.recipe import Recipe, run
from tests.training_helpers import finetune_args, recovery_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return recovery_setup(tmp_path_factory.mktemp("cores"))


def _job(setup, student=None):
    return recovery_job(
        student or setup["shared"], setup["base"], setup["lora"], data_path=setup["text"], max_length=32
    )


@pytest.mark.parametrize("left", [True, False])
def test_split_is_an_orthonormal_basis_times_a_core(left):
    factor = torch.randn(40, 5) if left else torch.randn(5, 40)
    basis, core = split(factor, left)
    rebuilt = basis.double() @ core.double() if left else core.double() @ basis.double()
    assert torch.allclose(rebuilt, factor.double(), atol=1e-5)
    gram = basis.double().T @ basis.double() if left else basis.double() @ basis.double().T
    assert torch.allclose(gram, torch.eye(5, dtype=torch.float64), atol=1e-5)
    assert core.shape == (5, 5)


def _residual_outside(tensor: torch.Tensor, start: torch.Tensor, left: bool) -> float:
    """How much of ``tensor`` lies outside the column (left) or row space of ``start`` (dense SVD)."""
    space = start.double() if left else start.double().T
    u = torch.linalg.svd(space, full_matrices=False).U
    t = tensor.double() if left else tensor.double().T
    return float((t - u @ (u.T @ t)).norm() / t.norm())


def test_cores_train_inside_the_start_spaces_and_lower_the_kl(setup):
    job = _job(setup)
    start = job.student
    trained, report = run(job, Recipe(steps=12, lr=1e-2, batch_size=4, eval_every=4, trainable="cores"))
    assert report["after"]["kl"] < report["before"]["kl"]
    assert report["best_step"] != 0
    roles = {}
    for site in start.sites.values():
        roles[site.a], roles[site.b] = False, True
    moved = 0
    for name, left in roles.items():
        assert trained.tensors[name].shape == start.tensors[name].shape
        assert _residual_outside(trained.tensors[name], start.tensors[name], left) < 1e-4, name
        moved += not torch.equal(trained.tensors[name], start.tensors[name])
    assert moved == len(roles)
    assert {p: (s.a, s.b) for p, s in trained.sites.items()} == {p: (s.a, s.b) for p, s in start.sites.items()}
    # one r x r core per pool tensor (ShareA: one shared A per kind, one B per site), r = 2
    assert report["parameters"]["trained"] == sum(min(start.tensors[n].shape) ** 2 for n in roles)
    assert report["parameters"]["end"] == report["parameters"]["start"]


def test_a_truncated_lora_with_a_rank_per_site_trains_its_cores(setup, tmp_path):
    """Truncation by budget gives each site its own rank: every core is r_site x r_site."""
    from shareport.convert import convert_adapter
    from shareport.files.adapters import save_adapter

    truncated, _ = convert_adapter(load_adapter(setup["lora"]), "lora", budget=0.3)
    ranks = {p: truncated.tensors[s.a].shape[0] for p, s in truncated.sites.items()}
    assert len(set(ranks.values())) > 1, ranks  # the case this test is about
    save_adapter(truncated, tmp_path / "truncated")
    job = _job(setup, student=tmp_path / "truncated")
    trained, report = run(job, Recipe(steps=8, lr=1e-2, batch_size=4, eval_every=4, trainable="cores"))
    assert report["after"]["kl"] < report["before"]["kl"]
    for path, site in truncated.sites.items():
        assert trained.tensors[site.a].shape == truncated.tensors[site.a].shape
        assert _residual_outside(trained.tensors[site.b], truncated.tensors[site.b], True) < 1e-4
    assert report["parameters"]["trained"] == 2 * sum(r * r for r in ranks.values())


def test_cores_same_input_same_bytes_and_equal_stays_equal(setup):
    recipe = Recipe(steps=4, lr=1e-2, batch_size=4, eval_every=2, trainable="cores")
    first, _ = run(_job(setup), recipe)
    second, _ = run(_job(setup), recipe)
    for name in first.used_tensor_names():
        assert torch.equal(first.tensors[name], second.tensors[name]), name
    job = _job(setup, student=setup["lora"])
    same, report = run(job, Recipe(steps=6, lr=3e-2, batch_size=4, eval_every=2, trainable="cores"))
    assert report["best_step"] == 0
    for name in job.student.used_tensor_names():
        assert torch.equal(same.tensors[name], job.student.tensors[name].float()), name


def test_finetune_cli_reports_the_cores(setup, tmp_path, cli):
    out = tmp_path / "cores"
    result = cli(
        *finetune_args(setup, out),
        "--steps",
        4,
        "--batch-size",
        4,
        "--max-length",
        32,
        "--trainable",
        "cores",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "training_report.json").read_text())
    assert report["recipe"]["trainable"] == "cores"
    assert f"{report['parameters']['trained']:,} trained: cores between frozen bases" in result.output
    assert load_adapter(out).form == load_adapter(setup["shared"]).form


def test_training_options_carry_the_choice_to_the_recipe(setup):
    options = TrainingOptions(trainable="cores")
    assert options.recipe(_job(setup).student, distill_weight=1.0, task_weight=0.0).trainable == "cores"
