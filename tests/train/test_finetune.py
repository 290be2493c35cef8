"""Recovery fine-tune: shared factors update once from one summed gradient, a lossy ShareA is
recovered toward its LoRA, a resumed run ends where an uninterrupted one does."""

import json

import pytest
import torch
import torch.nn.functional as F

from shareport.files.adapters import load_adapter
from shareport.model import attach, load_base_model
from shareport.train.data import BatchOrder, collate
from shareport.train.jobs import merge_schedule, recovery_job
from shareport.train.recipe import Recipe, run
from shareport.train.schedule import LR_SCALE_REFERENCE
from shareport.train.teacher import Teacher
from tests.training_helpers import cpu_accelerator, finetune_args, recovery_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return recovery_setup(tmp_path_factory.mktemp("recovery"))


@pytest.fixture
def fp32_cpu(monkeypatch):
    """For tests of exact arithmetic against a float32 CPU reference: on a CUDA machine, training is
    pinned to the CPU in float32 too (bf16 autocast would differ by its rounding); elsewhere a no-op."""
    if not torch.cuda.is_available():
        yield
        return
    with cpu_accelerator(monkeypatch, "no"):
        yield


def _job(setup, tmp_path, resume=False, merging=False):
    return recovery_job(
        setup["shared"],
        setup["base"],
        setup["lora"],
        data_path=setup["text"],
        max_length=32,
        eval_fraction=0.1,
        checkpoint_dir=tmp_path / "ckpt",
        resume=resume,
        merging=merging,
    )


def _first_step_reference(setup, job, lm_weight: float = 0.0, batch_size: int = 4):
    """The first step's loss parts and the summed ShareA gradient, computed on untied copies of every factor.

    Independent of the training loop: KL(teacher || student) over the non-padded positions and the
    next-token cross-entropy over the non-padded targets, written out here with torch.nn.functional.
    Returns (kl, ce, grad of kl + lm_weight * ce summed over the q_proj sites (rank x in_features)).
    """
    model = load_base_model(setup["base"]).requires_grad_(False)
    teacher = Teacher(model, load_adapter(setup["lora"]))
    untied = attach(model, job.student.expand(), trainable=True)
    batch = collate(job.train_data, BatchOrder(len(job.train_data), batch_size, seed=0).batch(0), 0)
    mask = batch["attention_mask"].bool()
    student_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad(), teacher.active(model):
        teacher_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_s, log_t = (F.log_softmax(x[mask].double(), dim=-1) for x in (student_logits, teacher_logits))
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="sum") / int(mask.sum())
    targets_ok = mask[:, 1:]
    ce = F.cross_entropy(student_logits[:, :-1][targets_ok].double(), batch["input_ids"][:, 1:][targets_ok])
    (kl + lm_weight * ce).backward()
    grad = sum(untied.parameters[f"{s.path}.lora_A"].grad for s in job.student.kinds()["self_attn.q_proj"])
    return kl.item(), ce.item(), grad


def _adamw_first_step(value: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """AdamW's first step: m/sqrt(v) = g/|g| (bias-corrected), no weight decay; with recovery's default
    --lr-scaling tensor, the step is times the tensor's own rms over the reference."""
    scale = float(value.double().square().mean().sqrt()) / LR_SCALE_REFERENCE
    return value - lr * scale * grad / (grad.abs() + 1e-8)


def test_shared_factor_gets_one_summed_gradient_and_one_update(setup, tmp_path, fp32_cpu):
    """One AdamW step on ShareA equals one step on the *sum* of the per-layer gradients of untied copies."""
    lr = 1e-2
    job = _job(setup, tmp_path)
    shared = job.student
    a_name = shared.kinds()["self_attn.q_proj"][0].a
    trained, _ = run(job, Recipe(steps=1, lr=lr, batch_size=4))
    _, _, grad = _first_step_reference(setup, job)
    torch.testing.assert_close(
        trained.tensors[a_name], _adamw_first_step(shared.tensors[a_name], grad, lr), atol=1e-6, rtol=1e-5
    )
    assert trained.sites == shared.sites  # still one A for every q_proj site


def test_lm_loss_weight_enters_the_loss_and_the_update(setup, tmp_path, cli, fp32_cpu):
    """``finetune --lm-loss W``: the first step's loss is KL + W * next-token CE, and the update is that of
    its gradient, which is not the update of the KL alone."""
    lr, weight = 1e-2, 3.0
    out = tmp_path / "lm"
    result = cli(
        *finetune_args(setup, out),
        "--steps",
        1,
        "--lr",
        lr,
        "--batch-size",
        4,
        "--max-length",
        32,
        "--lm-loss",
        weight,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "training_report.json").read_text())
    job = _job(setup, tmp_path)  # the same data split and first batch as the command's
    a_name = job.student.kinds()["self_attn.q_proj"][0].a
    kl, ce, grad = _first_step_reference(setup, job, weight)
    assert report["final_train_loss"] == pytest.approx(kl + weight * ce, rel=1e-5)
    assert report["recipe"]["lr_scaling"] == "tensor"  # recovery's default
    start = job.student.tensors[a_name]
    trained = load_adapter(out).tensors[a_name]
    torch.testing.assert_close(trained, _adamw_first_step(start, grad, lr), atol=1e-6, rtol=1e-5)
    _, _, kl_grad = _first_step_reference(setup, job, 0.0)
    assert not torch.allclose(trained, _adamw_first_step(start, kl_grad, lr), atol=1e-4)


def test_one_parameter_object_per_shared_tensor_in_the_optimizer(setup, tmp_path):
    job = _job(setup, tmp_path)
    seen = {}

    def check(step):
        wrappers = [w for p, w in sorted(student_wrappers(job.model).items()) if "q_proj" in p]
        assert all(w.lora_A is wrappers[0].lora_A for w in wrappers)
        seen["trainable"] = [p for p in job.model.parameters() if p.requires_grad]

    run(job, Recipe(steps=1, batch_size=4), after_step=check)
    assert sum(p.numel() for p in seen["trainable"]) == job.student.num_parameters()


def student_wrappers(model):
    from shareport.model.surgery import LoRALinear

    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def test_lossy_sharea_is_recovered_halving_heldout_kl(setup, tmp_path, cli):
    out = tmp_path / "recovered"
    result = cli(
        *finetune_args(setup, out),
        "--steps",
        100,
        "--lr",
        3e-3,
        "--batch-size",
        8,
        "--max-length",
        32,
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "training_report.json").read_text())
    before, after = report["before"], report["after"]
    assert after["kl"] <= 0.5 * before["kl"], (before, after)
    assert after["top1_agreement"] > before["top1_agreement"]
    assert "lm_loss" in after
    recovered = load_adapter(out)
    original = load_adapter(setup["shared"])
    assert recovered.form == "sharea" and recovered.sites == original.sites
    assert recovered.num_parameters() == original.num_parameters()
    assert recovered.provenance["history"][-1]["step"] == "finetune"


def test_identical_runs_write_identical_reports_and_adapters(setup, tmp_path, cli):
    """Timings go to training_timings.json; everything else is the same bytes run after run."""
    outs = [tmp_path / "one", tmp_path / "two"]
    for out in outs:
        result = cli(
            *finetune_args(setup, out),
            "--steps",
            3,
            "--batch-size",
            4,
            "--max-length",
            16,
        )
        assert result.exit_code == 0, result.output
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted(p.name for p in outs[1].iterdir())
    assert {"training_report.json", "training_timings.json", "adapter_model.safetensors"} <= set(names)
    for name in names:
        if name != "training_timings.json":
            assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    report = json.loads((outs[0] / "training_report.json").read_text())
    assert "timings" not in report and "tokens_per_second" not in json.dumps(report)
    timings = json.loads((outs[0] / "training_timings.json").read_text())
    assert timings["tokens_per_second"] > 0 and timings["seconds"] > 0


def test_resumed_run_ends_where_the_uninterrupted_one_does(setup, tmp_path):
    """Interrupted after step 7 (checkpoint at 5), resumed to 12; ASLoRA merges at 4 (before the
    checkpoint) and at 8 (after the resume)."""

    def recipe(job):
        schedule = merge_schedule(
            job.student, 12, merges=2, groups=None, start=0, every=4, mode="tie", pairs="adjacent"
        )
        return Recipe(steps=12, lr=3e-3, batch_size=4, seed=5, checkpoint_every=5, merge=schedule)

    whole_job = _job(setup, tmp_path / "whole", merging=True)
    (tmp_path / "whole").mkdir()
    whole, whole_report = run(whole_job, recipe(whole_job))

    (tmp_path / "cut").mkdir()
    first = _job(setup, tmp_path / "cut", merging=True)

    def interrupt(step):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(first, recipe(first), after_step=interrupt)
    resumed_job = _job(setup, tmp_path / "cut", resume=True, merging=True)
    assert resumed_job.student.form == "aslora"  # the checkpoint holds the grouping after the first merge
    resumed, resumed_report = run(resumed_job, recipe(resumed_job))

    assert resumed.sites == whole.sites
    for name in whole.used_tensor_names():  # bitwise: same batches, same state, same arithmetic
        assert torch.equal(resumed.tensors[name], whole.tensors[name]), name
    assert _flat(resumed_report["after"]) == pytest.approx(_flat(whole_report["after"]), abs=1e-6)
    assert resumed_report["merges"] == whole_report["merges"]
    assert [e["step"] for e in whole_report["merges"]] == [4, 4, 8, 8]


def _flat(report: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out
