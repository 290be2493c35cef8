"""Recovery never publishes worse than it was given, on a schedule that converges (issue 26).

- the learning rate follows torch's own warmup + cosine/linear schedulers, step by step;
- an adapter equal to its teacher stays equal, and a good start is not made worse;
- a resumed run keeps its best-so-far in the checkpoint and still ends bit-identical;
- a student with sites the conversion cut to rank 0 recovers (the teacher still adapts them);
- with a separate test file, the best step is picked on the data's held-out split, not the test;
- ``train`` keeps its best step by the held-out task loss;
- bad schedule settings are refused in one line, nothing written.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from shareport import flows
from shareport.convert import convert_adapter
from shareport.files.adapters import load_adapter, save_adapter
from shareport.train.data import load_data
from shareport.train.jobs import TrainingOptions, recovery_job
from shareport.train.recipe import Recipe, Trainer, evaluate_adapter, run
from shareport.train.schedule import STEP_UNITS, default_eval_every, diverged, eval_steps, lr_factor
from tests.training_helpers import finetune_args, recovery_setup, write_text


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return recovery_setup(tmp_path_factory.mktemp("best"))


def _job(setup, student=None, checkpoint_dir=None, resume=False):
    return recovery_job(
        student or setup["shared"],
        setup["base"],
        setup["lora"],
        data_path=setup["text"],
        max_length=32,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
    )


def _torch_lrs(steps: int, warmup_steps: int, schedule: str) -> list[float]:
    """torch.optim.lr_scheduler's factors for each of ``steps`` updates: a linear warmup to 1, then
    cosine annealing (or a linear fall) to 0 over the remaining steps."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    rest = steps - warmup_steps
    after = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=rest)
        if schedule == "cosine"
        else torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=rest)
    )
    if warmup_steps:
        warm = torch.optim.lr_scheduler.LinearLR(
            opt, start_factor=1 / warmup_steps, end_factor=1.0, total_iters=warmup_steps - 1
        )
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, after], milestones=[warmup_steps])
    else:
        sched = after
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("steps,warmup", [(40, 0.1), (17, 0.25), (9, 0.0)])
def test_schedule_is_torchs_warmup_then_decay(schedule, steps, warmup):
    ours = [lr_factor(s, steps=steps, schedule=schedule, warmup=warmup) for s in range(steps)]
    assert ours == pytest.approx(_torch_lrs(steps, round(warmup * steps), schedule), abs=1e-12)
    span = steps - round(warmup * steps)
    assert 0 < ours[-1] <= 1 / span + 1e-12  # decays to (nearly) zero, never a wasted zero step


def test_trainer_applies_the_schedule_to_the_optimizer(setup):
    job = _job(setup)
    recipe = Recipe(steps=10, lr=4e-3, batch_size=4, warmup=0.2, schedule="linear")
    trainer = Trainer(job, recipe)
    seen = []
    for step in range(recipe.steps):
        trainer.train_step(step)
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.after_step(step + 1)
    trainer.finish()
    assert seen == pytest.approx([4e-3 * f for f in _torch_lrs(10, 2, "linear")], abs=1e-15)


@pytest.mark.parametrize("backoff", [True, False])
def test_a_diverged_evaluation_puts_the_best_back_and_lowers_the_lr(setup, backoff):
    """The LoRA toward itself (KL 0 at the start, the best) at a large constant lr: every later
    evaluation is above 1.5 x 0, so each puts the start's factors back and halves the lr from the
    next step; without backoff the lr stays and the factors move on."""
    job = _job(setup, student=setup["lora"])
    recipe = Recipe(steps=6, lr=3e-2, batch_size=4, eval_every=2, schedule="constant", warmup=0.0, backoff=backoff)
    trainer = Trainer(job, recipe)
    start = {n: p.detach().clone() for n, p in trainer.student.parameters.items()}
    seen = []
    for step in range(recipe.steps):
        trainer.train_step(step)
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.after_step(step + 1)
        if (step + 1) % 2 == 0:
            back = all(torch.equal(p, start[n]) for n, p in trainer.student.parameters.items())
            assert back == backoff
    _, report = trainer.finish()
    assert report["backoffs"] == ([2, 4, 6] if backoff else [])
    assert all(p["kl"] > 0 for p in report["curve"][1:]) and report["best_step"] == 0
    expected = [3e-2, 3e-2, 1.5e-2, 1.5e-2, 7.5e-3, 7.5e-3] if backoff else [3e-2] * 6
    assert seen == pytest.approx(expected, rel=1e-12)


def test_a_backoff_is_said_on_stderr_and_json_stays_clean(setup, tmp_path, cli):
    """The LoRA toward itself at a large lr backs off at every evaluation: each is announced on stderr
    (stdout is the report), the JSON report lists them, and the closing lines say so."""

    def args(out):
        run_args = [*finetune_args({**setup, "shared": setup["lora"]}, out), "--steps", 4, "--lr", 3e-2]
        return [*run_args, "--eval-every", 2, "--batch-size", 4, "--max-length", 32]

    result = cli(*args(tmp_path / "json"), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["backoffs"] == [2, 4]
    assert "step 2: held-out score" in result.stderr and "back to step 0" in result.stderr
    plain = cli(*args(tmp_path / "text"))
    assert plain.exit_code == 0, plain.output
    assert "backed off at step(s) 2, 4" in plain.stdout


def test_noise_is_not_divergence():
    """A held-out score up to 1.5 x the best is noise and keeps the run going; past it, a backoff."""
    assert not diverged(0.30, 0.20) and not diverged(0.0, 0.0)
    assert diverged(0.3001, 0.20) and diverged(1e-9, 0.0)
    assert not diverged(-1e-10, -1e-10)  # a KL of 0 a hair below it in float sums is not a divergence


def test_default_eval_every_keeps_evaluation_near_a_tenth_of_the_run():
    # 135 held-out examples (the docstrings task's 10%), batch 8: one evaluation (135 forwards with the
    # teacher's outputs kept) per N steps of 8 x STEP_UNITS forwards, the fewest N keeping it <= 10%
    every = default_eval_every(steps=300, batch_size=8, heldout_examples=135, teacher_cached=True)
    assert 135 / (every * 8 * STEP_UNITS) <= 0.1 < 135 / ((every - 1) * 8 * STEP_UNITS)
    uncached = default_eval_every(steps=300, batch_size=8, heldout_examples=135, teacher_cached=False)
    assert 270 / (uncached * 8 * STEP_UNITS) <= 0.1 < 270 / ((uncached - 1) * 8 * STEP_UNITS)
    assert default_eval_every(steps=5, batch_size=8, heldout_examples=135, teacher_cached=True) == 5
    assert eval_steps(10, 4) == [0, 4, 8, 10]


def test_adapter_equal_to_its_teacher_stays_equal(setup, tmp_path):
    """The LoRA recovered toward itself at a large lr: KL 0 at step 0, and nothing after it beats 0."""
    job = _job(setup, student=setup["lora"])
    start = job.student
    trained, report = run(job, Recipe(steps=6, lr=3e-2, batch_size=4, eval_every=2))
    assert report["best_step"] == 0
    assert report["after"]["kl"] <= 1e-6
    for name in start.used_tensor_names():
        assert torch.equal(trained.tensors[name], start.tensors[name].float()), name


def test_a_good_start_is_not_made_worse(setup, tmp_path, cli):
    """A constant lr far too large: the last step is worse than an earlier evaluated one (on one CPU the
    start, on another step 3: this tiny model's curve depends on the hardware's float sums), and what
    is published is the best evaluated step, whose KL an independent evaluation of the written
    adapter reproduces."""
    out = tmp_path / "ruined"
    result = cli(
        *finetune_args(setup, out),
        "--steps",
        6,
        "--lr",
        5.0,
        "--schedule",
        "constant",
        "--warmup",
        0,
        "--eval-every",
        3,
        "--batch-size",
        4,
        "--max-length",
        32,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "training_report.json").read_text())
    kls = {p["step"]: p["kl"] for p in report["curve"]}
    assert sorted(kls) == [0, 3, 6]
    assert kls[6] > min(kls.values())  # the old recipe would have published the last, a worse adapter
    assert report["best_step"] == min(kls, key=lambda s: (kls[s], s)) != 6
    assert report["after"]["kl"] == kls[report["best_step"]] <= report["before"]["kl"]
    again = evaluate_adapter(_job(setup), load_adapter(out), 4)
    assert again["kl"] == pytest.approx(report["after"]["kl"], rel=1e-5)
    assert (
        f"kept step {report['best_step']}" if report["best_step"] else "no evaluated step beat the start"
    ) in result.output
    # the start itself kept: said plainly, with the lr to blame
    assert (report["best_step"] == 0) == ("no evaluated step beat the start" in result.output)


def test_resumed_run_keeps_the_best_so_far_and_ends_bit_identical(setup, tmp_path):
    """The LoRA recovered toward itself: KL 0 at step 0, which no later step beats (ties keep the
    earlier). Evaluated every 2 steps, checkpointed at 5, interrupted after 7, resumed to 12: the
    checkpoint holds step 0 as the best so far, and the resumed run reports it, as the whole run
    does (a resumed run that lost it would keep step 6, the first tie it evaluates after the resume)."""
    from shareport.train.checkpoint import load_checkpoint

    recipe = Recipe(steps=12, lr=3e-2, batch_size=4, seed=3, checkpoint_every=5, eval_every=2)
    whole, whole_report = run(_job(setup, student=setup["lora"], checkpoint_dir=tmp_path / "whole"), recipe)
    assert whole_report["best_step"] == 0

    def interrupt(step):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(_job(setup, student=setup["lora"], checkpoint_dir=tmp_path / "cut"), recipe, after_step=interrupt)
    _, state, tensors = load_checkpoint(tmp_path / "cut")
    assert state["best"]["step"] == 0 and state["step"] == 5 and any(k.startswith("best/") for k in tensors)
    resumed, resumed_report = run(
        _job(setup, student=setup["lora"], checkpoint_dir=tmp_path / "cut", resume=True), recipe
    )
    assert resumed_report["best_step"] == whole_report["best_step"]
    # every evaluation after the start diverged from KL 0: the checkpoint carried the lowered lr on
    assert whole_report["backoffs"] == [2, 4, 6, 8, 10, 12] == resumed_report["backoffs"]
    assert resumed_report["curve"] == whole_report["curve"]
    for name in whole.used_tensor_names():
        assert torch.equal(resumed.tensors[name], whole.tensors[name]), name


def test_sites_cut_to_rank_zero_recover_without_them(setup, tmp_path):
    """A truncation whose budget drops some sites: recovery runs, the dropped sites stay unadapted,
    the report names them, and held-out KL falls."""
    lora = load_adapter(setup["lora"])
    # scale one kind's updates down so a small budget spends nothing on them
    tensors = dict(lora.tensors)
    for site in lora.kinds()["self_attn.v_proj"]:
        tensors[site.b] = tensors[site.b] * 1e-3
    weak = lora.with_sites(tensors, dict(lora.sites), lora.form)
    save_adapter(weak, tmp_path / "teacher", as_peft=True)
    cut, report = convert_adapter(weak, "lora", budget=0.1)
    dropped = sorted(p for k in report.kinds for p, r in k.site_ranks.items() if r == 0)
    assert dropped and set(cut.sites) == set(lora.sites) - set(dropped)
    save_adapter(cut, tmp_path / "cut", as_peft=True)
    result = flows.recover(
        str(tmp_path / "cut"),
        str(setup["base"]),
        str(tmp_path / "teacher"),
        str(setup["text"]),
        str(tmp_path / "out"),
        options=TrainingOptions(steps=30, lr=3e-3, batch_size=4, max_length=32),
    )
    assert result["inputs"]["teacher_only_sites"] == dropped
    assert set(load_adapter(tmp_path / "out").sites) == set(cut.sites)
    assert result["after"]["kl"] < result["before"]["kl"]


def test_with_a_test_file_the_best_step_is_picked_on_the_data_not_the_test(setup, tmp_path):
    """``frontier --eval FILE``: before/after are scored on the file; the curve and the best step come
    from the data's own held-out split, which no training batch contains."""

    def labelled(path, lines):
        path.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(lines)))
        return path

    data = labelled(tmp_path / "data.jsonl", setup["text"].read_text().splitlines())
    test = labelled(tmp_path / "test.jsonl", write_text(tmp_path / "t.txt", 30, seed=7).read_text().splitlines())
    job = recovery_job(setup["shared"], setup["base"], setup["lora"], data_path=data, max_length=32, eval_path=test)
    assert job.heldout.sequences == load_data(test, setup["base"], 32).sequences
    assert not set(map(tuple, job.selection.sequences)) & set(map(tuple, job.train_data.sequences))
    _, report = run(job, Recipe(steps=4, lr=3e-3, batch_size=4, eval_every=2))
    on_selection = evaluate_adapter(dataclasses.replace(job, heldout=job.selection), job.student, 4)
    assert report["curve"][0]["kl"] == pytest.approx(on_selection["kl"], rel=1e-6)
    assert report["before"]["kl"] != pytest.approx(on_selection["kl"], rel=1e-3)
    assert report["selection_examples"] == len(job.selection)


def test_train_keeps_its_best_step_by_the_heldout_task_loss(setup, tmp_path):
    report = flows.train(
        "lora",
        str(setup["base"]),
        ["q_proj"],
        2,
        str(setup["text"]),
        str(tmp_path / "t"),
        options=TrainingOptions(
            steps=8, lr=0.3, batch_size=4, max_length=32, eval_every=2, schedule="constant", warmup=0.0
        ),
    )
    losses = {p["step"]: p["lm_loss"] for p in report["curve"]}
    assert report["selected_by"] == "held-out lm loss"
    assert report["best_step"] == min(losses, key=lambda s: (losses[s], s))
    assert report["after"]["lm_loss"]["student"] == losses[report["best_step"]]


@pytest.mark.parametrize(
    "args,words",
    [
        (["--eval-every", 0], "--eval-every must be between 1 and --steps (4), got 0"),
        (["--eval-every", 5], "--eval-every must be between 1 and --steps (4), got 5"),
        (["--schedule", "exponential"], "--schedule: unknown schedule 'exponential'"),
        (["--warmup", 1.0], "--warmup must be a share of the steps in [0, 1)"),
        (["--max-length", 3, "--eval-fraction", 0.01], "needs at least 4"),
        (["--trainable", "singular"], "'singular' is not one of"),
        (["--trainable", "cores", "--checkpoint-every", 2], "--trainable cores does not checkpoint"),
        (["--trainable", "cores", "--merges", 1], "--trainable cores cannot run with ASLoRA merges"),
        (["--pack", "--group-by-length"], "--group-by-length and --pack"),
    ],
)
def test_bad_schedule_settings_are_refused_in_one_line(setup, tmp_path, cli, args, words):
    out = tmp_path / "out"
    result = cli(
        *finetune_args(setup, out),
        "--steps",
        4,
        "--batch-size",
        4,
        *args,
    )
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and words in errors[0], result.output
    assert not out.exists()


def test_generate_recovers_a_causal_lm_with_no_data_file(setup, tmp_path, cli):
    """``--generate N``: N texts sampled from the teacher are the data; the same seed, the same bytes."""
    outs = [tmp_path / "g1", tmp_path / "g2"]
    for out in outs:
        result = cli(
            "finetune",
            setup["shared"],
            "--base",
            setup["base"],
            "--teacher",
            setup["lora"],
            "--generate",
            40,
            "-o",
            out,
            "--steps",
            20,
            "--lr",
            3e-3,
            "--batch-size",
            4,
            "--max-length",
            24,
            "--json",
        )
        assert result.exit_code == 0, result.output
    report = json.loads((outs[0] / "training_report.json").read_text())
    assert report["inputs"]["generated"] == 40 and report["inputs"]["data"] is None
    assert report["train_examples"] + report["heldout_examples"] == 40
    assert report["after"]["kl"] < report["before"]["kl"]
    for name in ("adapter_model.safetensors", "training_report.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_generate_notes_a_tokenizer_that_never_starts_texts_at_bos(setup, tmp_path):
    """The samples start at bos. A base whose tokenizer does not begin texts with it never trained on a
    text starting there: the report says so (the demo's model sampled mid-word fragments there)."""
    import shutil

    from shareport.train.generated import start_note
    from tests.training_helpers import save_char_tokenizer

    bos = json.loads((Path(setup["base"]) / "config.json").read_text())["bos_token_id"]
    assert start_note(setup["base"], bos) is None  # the helpers' tokenizer begins with <s>
    plain = tmp_path / "base-no-bos"
    shutil.copytree(setup["base"], plain)
    save_char_tokenizer(plain, bos=False)
    note = start_note(plain, bos)
    assert note is not None and str(plain) in note and "'<s>'" in note  # the token by its text, not its id
    assert start_note(plain, [bos, 7]) == note  # a list: generation starts at its first
    assert start_note(tmp_path / "no-tokenizer", bos) is None


def test_generate_says_the_start_note_once_before_the_run_even_with_json(setup, tmp_path, cli):
    import shutil

    from tests.training_helpers import save_char_tokenizer

    plain = tmp_path / "base-no-bos"
    shutil.copytree(setup["base"], plain)
    save_char_tokenizer(plain, bos=False)
    out = tmp_path / "out"
    result = cli(
        "finetune", setup["shared"], "--base", plain, "--teacher", setup["lora"], "-o", out,
        "--generate", 8, "--steps", 2, "--batch-size", 2, "--max-length", 12, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stdout holds the report alone; the note is on stderr
    assert result.stderr.count("note: the samples start at '<s>'") == 1, result.stderr
    assert report["inputs"]["generate_note"] in result.stderr


def test_generated_texts_are_the_teachers_samples(setup):
    """Start at bos, stop at eos or max_length; seeded (the same seed, the same texts; another, others),
    and the global RNG is left as it was."""
    from shareport.model import load_base_model
    from shareport.train.generated import generate_data
    from shareport.train.teacher import Teacher

    model = load_base_model(setup["base"]).requires_grad_(False)
    teacher = Teacher(model, load_adapter(setup["lora"]))
    before = torch.get_rng_state()
    one = generate_data(model, teacher, count=10, max_length=12, seed=1, where="base")
    assert torch.equal(torch.get_rng_state(), before)
    again = generate_data(model, teacher, count=10, max_length=12, seed=1, where="base")
    other = generate_data(model, teacher, count=10, max_length=12, seed=2, where="base")
    assert one.sequences == again.sequences != other.sequences
    bos, eos = model.config.bos_token_id, model.config.eos_token_id
    for seq in one.sequences:
        assert seq[0] == bos and 2 <= len(seq) <= 12
        assert eos not in seq[1:-1] and (len(seq) == 12 or seq[-1] == eos)
    # every sampled token lies in the teacher's nucleus at its position: the tokens more probable than it
    # hold less than top-p of the probability (pure sampling would also draw from the tail)
    from shareport.train.generated import SAMPLING_TOP_P

    assert SAMPLING_TOP_P < 1
    with torch.no_grad(), teacher.active(model):
        for seq in one.sequences:
            probs = model(input_ids=torch.tensor([seq])).logits[0].float().softmax(-1)
            for position, token in enumerate(seq[1:]):
                p = probs[position]
                assert p[p > p[token]].sum().item() < SAMPLING_TOP_P + 1e-5


@pytest.mark.parametrize(
    "args,words",
    [
        (["--generate", 0], "--generate must be at least 2 texts (one to train on, one held out), got 0"),
        (["--generate", 1], "--generate must be at least 2 texts (one to train on, one held out), got 1"),
        (["--generate", 10, "--max-length", 1], "--max-length must be at least 2 to generate texts, got 1"),
        (["--generate", 5, "--data", "DATA"], "not both"),
        ([], "finetune needs --data DATA or --generate N"),
    ],
)
def test_bad_generate_is_refused_in_one_line(setup, tmp_path, cli, args, words, monkeypatch):
    """Refused before the base is loaded or a text sampled."""
    from shareport.flows import training

    def loaded(*args, **kwargs):
        raise AssertionError("the job was built before the refusal")

    monkeypatch.setattr(training, "recovery_job", loaded)
    out = tmp_path / "out"
    args = [setup["text"] if a == "DATA" else a for a in args]
    result = cli(
        "finetune", setup["shared"], "--base", setup["base"], "--teacher", setup["lora"], "-o", out, "--steps", 4, *args
    )
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and words in errors[0], result.output
    assert not out.exists()


def test_generated_held_out_split_too_small_names_the_samples_and_the_fix(setup, tmp_path, cli):
    out = tmp_path / "out"
    result = cli(
        "finetune", setup["shared"], "--base", setup["base"], "--teacher", setup["lora"], "-o", out,
        "--steps", 4, "--generate", 4, "--max-length", 2,
    )  # fmt: skip
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert "texts sampled from the teacher" in errors[0] and "raise --generate or --max-length" in errors[0]
    assert "None" not in errors[0] and not out.exists()


def test_generate_on_a_classifier_is_refused(tmp_path, cli):
    from tests.training_helpers import classifier_lora

    base, _ = classifier_lora(tmp_path)
    out = tmp_path / "out"
    result = cli(
        "finetune",
        tmp_path / "lora",
        "--base",
        base,
        "--teacher",
        tmp_path / "lora",
        "--generate",
        8,
        "-o",
        out,
        "--steps",
        2,
    )
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--generate samples texts from a causal LM" in errors[0], result.output
    assert not out.exists()


def test_ctrl_c_says_how_to_resume_and_a_finished_run_removes_its_checkpoint(setup, tmp_path, cli, monkeypatch):
    """Interrupted after step 3 (checkpoint at 2): the message names the checkpoint and --resume; a fresh
    rerun says the checkpoint is there; the finished run removes OUT.checkpoint (a --checkpoint-dir stays)."""
    from shareport.train import recipe as recipe_module

    out = tmp_path / "out"
    args = [
        *finetune_args(setup, out),
        "--steps",
        4,
        "--batch-size",
        4,
        "--max-length",
        16,
        "--checkpoint-every",
        2,
    ]
    real = recipe_module.Trainer.after_step

    def interrupt(self, t):
        real(self, t)
        if t == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(recipe_module.Trainer, "after_step", interrupt)
    result = cli(*args)
    assert result.exit_code == 130
    assert f"the last checkpoint is in {out}.checkpoint" in result.output and "--resume" in result.output
    assert not out.exists() and (tmp_path / "out.checkpoint").is_dir()
    monkeypatch.setattr(recipe_module.Trainer, "after_step", real)
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "holds the checkpoint of an interrupted run (step 2)" in result.output
    assert out.is_dir() and not (tmp_path / "out.checkpoint").exists()
    kept = tmp_path / "named"
    assert cli(*args, "--overwrite", "--checkpoint-dir", kept).exit_code == 0
    assert kept.is_dir()


def test_a_start_no_step_beats_is_written_as_given_and_said_so(setup, tmp_path, cli):
    """The LoRA as its own student (KL 0 at the start): no evaluated step can beat it, the start is
    written bit for bit, and the closing lines say so rather than only 'kept step 0'."""
    out = tmp_path / "kept"
    args = ["finetune", setup["lora"], "--base", setup["base"], "--teacher", setup["lora"], "--data", setup["text"]]
    result = cli(*args, "-o", out, "--steps", 4, "--eval-every", 2, "--batch-size", 4, "--max-length", 32)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "training_report.json").read_text())
    assert report["best_step"] == 0 and len(report["curve"]) == 3
    assert "no evaluated step beat the start" in result.output
    start, written = load_adapter(setup["lora"]), load_adapter(out)
    assert all(torch.equal(written.tensors[n], start.tensors[n].float()) for n in start.tensors)
