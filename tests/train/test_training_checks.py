"""Training does what it says, checked against independent computations: the held-out split,
the default ASLoRA schedule, merges on the running averages of B, ``--lm-loss``, and learning."""

import math

import pytest
import torch
import torch.nn.functional as F

from shareport import flows
from shareport.files.adapters import load_adapter
from shareport.model import attach, load_base_model
from shareport.model.fresh import fresh_adapter
from shareport.train import evaluation as evaluation_module
from shareport.train import recipe as recipe_module
from shareport.train.data import BatchOrder, TokenData, load_data, save_tokenized, split_heldout
from shareport.train.jobs import TrainingOptions
from shareport.train.merging import BMerger, MergeSchedule
from tests.tiny import tiny_llama
from tests.training_helpers import recovery_setup

SMALL = dict(batch_size=4, max_length=24)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    paths = recovery_setup(root, layers=2, rank=4, shared_rank=1, lines=40)
    # 30 distinct token sequences, so "the same example" is "the same sequence"
    paths["tokens"] = save_tokenized(root / "tokens", [[1, 4 + i, 5 + i % 7, 6, 7 + i % 3] for i in range(30)])
    return paths


# ---------------------------------------------------------------------------------------- held-out split
@pytest.mark.parametrize("n, fraction", [(2, 0.1), (30, 0.1), (31, 0.25), (100, 0.5)])
def test_split_is_a_partition_of_the_examples(n, fraction):
    data = TokenData([[1, 100 + i] for i in range(n)], list(range(n)), "mem")
    train, heldout = split_heldout(data, fraction)
    train_ids, held_ids = [s[1] - 100 for s in train.sequences], [s[1] - 100 for s in heldout.sequences]
    assert not set(train_ids) & set(held_ids)
    assert sorted(train_ids + held_ids) == list(range(n))
    assert len(held_ids) == min(n - 1, max(1, round(n * fraction)))
    assert train.labels == train_ids and heldout.labels == held_ids  # labels travel with their examples


def test_batch_order_reads_each_epoch_as_a_permutation_of_the_training_examples():
    order = BatchOrder(7, 3, seed=4)
    stream = [i for step in range(14) for i in order.batch(step)]  # 42 positions = 6 epochs
    for epoch in range(6):
        assert sorted(stream[epoch * 7 : (epoch + 1) * 7]) == list(range(7))


def _padded_positions(order: BatchOrder, lengths: list[int], steps: int) -> int:
    return sum(max(lengths[i] for i in order.batch(t)) * order.batch_size for t in range(steps))


@pytest.mark.parametrize("n, batch", [(200, 8), (1214, 16), (37, 4), (9, 4)])
def test_length_grouped_order_holds_the_shuffled_stream_s_examples_with_less_padding(n, batch):
    """Each run of ``group`` steps holds exactly the examples the shuffled stream puts in those steps
    (so epochs are kept), each batch is as long as the order says, and the padding is less."""
    lengths = torch.randint(3, 65, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    shuffled, grouped = BatchOrder(n, batch, seed=2), BatchOrder(n, batch, seed=2, lengths=lengths)
    group = grouped.group
    assert group == min(16, max(1, n // batch))
    for run in range(6):
        steps = range(run * group, (run + 1) * group)
        assert all(len(grouped.batch(t)) == batch for t in steps)
        # a run crossing into the next epoch holds some examples twice: never two copies in one batch
        assert all(len(set(grouped.batch(t))) == batch for t in steps)
        assert sorted(i for t in steps for i in grouped.batch(t)) == sorted(i for t in steps for i in shuffled.batch(t))
    if group > 1:
        assert _padded_positions(grouped, lengths, 6 * group) < _padded_positions(shuffled, lengths, 6 * group)
    # deterministic, and the seed matters
    again = BatchOrder(n, batch, seed=2, lengths=lengths)
    assert [again.batch(t) for t in range(40)] == [grouped.batch(t) for t in range(40)]
    other = BatchOrder(n, batch, seed=3, lengths=lengths)
    assert [other.batch(t) for t in range(40)] != [grouped.batch(t) for t in range(40)]
    # read out of order (a resumed run starts mid-run): the same batches
    assert [grouped.batch(t) for t in reversed(range(40))] == [again.batch(t) for t in reversed(range(40))]


@pytest.mark.parametrize("flag", [None, "--group-by-length"])
def test_training_reads_batches_in_the_order_the_options_name(setup, tmp_path, monkeypatch, cli, flag):
    """finetune shuffles, and groups by length when told to: its batches are BatchOrder.of's."""
    seen, jobs = [], []
    real_collate, real_run = recipe_module.collate, recipe_module.run

    def spy_run(job, recipe, after_step=None):
        jobs.append(job)
        return real_run(job, recipe, after_step)

    def spy_collate(data, indices, pad):
        if data is jobs[-1].train_data:
            seen.append(list(indices))
        return real_collate(data, indices, pad)

    monkeypatch.setattr(recipe_module, "collate", spy_collate)
    monkeypatch.setattr(flows.training, "run", spy_run)
    args = ["finetune", str(setup["shared"]), "--base", str(setup["base"]), "--teacher", str(setup["lora"])]
    args += ["--data", str(setup["text"]), "-o", str(tmp_path / "out"), "--steps", "12", "--batch-size", "4"]
    result = cli(*args, "--max-length", "24", *([flag] if flag else []))
    assert result.exit_code == 0, result.output
    expected = BatchOrder.of(jobs[-1].train_data, 4, seed=0, by_length=flag is not None)
    assert seen == [expected.batch(t) for t in range(12)]
    assert seen != [BatchOrder.of(jobs[-1].train_data, 4, seed=0, by_length=flag is None).batch(t) for t in range(12)]


def test_no_training_batch_contains_a_heldout_example(setup, tmp_path, monkeypatch):
    """Record every batch the training loop builds; none may hold a held-out sequence."""
    seen = {"train": [], "eval": []}
    jobs = []
    real_collate, real_run = recipe_module.collate, recipe_module.run

    def spy_run(job, recipe, after_step=None):
        jobs.append(job)
        return real_run(job, recipe, after_step)

    def spy_collate(data, indices, pad):
        seen["eval" if data is jobs[-1].heldout else "train"] += [tuple(data.sequences[i]) for i in indices]
        return real_collate(data, indices, pad)

    monkeypatch.setattr(recipe_module, "collate", spy_collate)
    monkeypatch.setattr(evaluation_module, "collate", spy_collate)
    monkeypatch.setattr(flows.training, "run", spy_run)
    flows.recover(
        str(setup["shared"]),
        str(setup["base"]),
        str(setup["lora"]),
        str(setup["tokens"]),
        str(tmp_path / "out"),
        options=TrainingOptions(steps=20, eval_fraction=0.2, **SMALL),
    )
    everything = [tuple(s) for s in load_data(setup["tokens"], setup["base"], 24).sequences]
    heldout = set(seen["eval"])
    assert len(heldout) == 6 and heldout < set(everything)
    assert set(seen["train"]) == set(everything) - heldout  # 20 steps x 4 = 80 positions: every training example
    assert not set(seen["train"]) & heldout


# ---------------------------------------------------------------------------------------- ASLoRA schedule
def _documented_default(steps: int, layers: int, merges=None, groups=None) -> tuple[int, int]:
    """README/docstring: train unmerged for a quarter (T_s = steps/4), then spread the merges evenly
    over the middle half: the widest spacing m with needed * m <= steps/2."""
    needed = merges if merges is not None else layers - groups
    start = math.floor(steps / 4)
    every = max([m for m in range(1, steps + 1) if needed * m <= steps / 2], default=1)
    return start, every


@pytest.mark.parametrize(
    "steps, merges, groups",
    [(12, 1, None), (100, 3, None), (80, None, 1), (200, None, 2), (37, 2, None), (1000, None, 3), (6, None, 1)],
)
def test_default_merge_schedule_is_the_documented_one(steps, merges, groups):
    layers = 4
    adapter = fresh_adapter(tiny_llama(layers=layers), "sharea", ["q_proj"], rank=2, alpha=2, seed=0)
    schedule = TrainingOptions(steps=steps, merges=merges, groups=groups).recipe(adapter, 0.0, 1.0).merge
    start, every = _documented_default(steps, layers, merges, groups)
    assert (schedule.start, schedule.every) == (start, every)
    needed = merges if merges is not None else layers - groups
    due = [t for t in range(1, steps + 1) if schedule.due(t)][:needed]
    assert due == [start + k * every for k in range(1, needed + 1)]
    assert due[-1] <= start + steps / 2  # all within the middle half


# ---------------------------------------------------------------------------------------- running average
def test_merges_follow_the_running_average_not_the_current_b():
    """B's change every step; the pair closest on average (0, 1) differs from the pair closest now (1, 2)."""
    history = [[0.0, 2.0, 20.0]] * 3 + [[0.0, 19.0, 20.0]]  # per step, each layer's B (a constant fill)
    model = tiny_llama(layers=3)
    handle = attach(model, fresh_adapter(model, "sharea", ["q_proj"], rank=2, alpha=2, seed=0), trainable=True)
    optimizer = torch.optim.AdamW(list(handle.parameters.values()), lr=0.1)
    merger = BMerger(handle, MergeSchedule(start=len(history) - 1, every=1, merges=1, pairs="any"), optimizer)
    sites = handle.adapter.kinds()["self_attn.q_proj"]
    for step, values in enumerate(history, 1):
        with torch.no_grad():
            for site in sites:
                handle.parameters[site.b].fill_(values[site.layer])
        events = merger.observe(step)
        if step < len(history):
            assert events == []
            mean = [sum(v[l] for v in history[:step]) / step for l in range(3)]
            for site in sites:
                torch.testing.assert_close(
                    merger.averages[site.b], torch.full_like(merger.averages[site.b], mean[site.layer])
                )
    mean = [sum(v[l] for v in history) / len(history) for l in range(3)]  # [0, 6.25, 20]
    (event,) = events
    assert (event.merged, event.kept) == ([0], [1])  # the current B's would merge 1 and 2
    numel = handle.parameters[sites[1].b].numel()
    assert event.distance == pytest.approx((mean[1] - mean[0]) * numel**0.5, rel=1e-5)


def _merger(values, **schedule):
    """A ShareA on q_proj whose layer-l B is the constant values[l], and its merger."""
    model = tiny_llama(layers=len(values))
    handle = attach(model, fresh_adapter(model, "sharea", ["q_proj"], rank=2, alpha=2, seed=0), trainable=True)
    with torch.no_grad():
        for site in handle.adapter.sites.values():
            handle.parameters[site.b].fill_(values[site.layer])
    optimizer = torch.optim.AdamW(list(handle.parameters.values()), lr=0.1)
    return handle, BMerger(handle, MergeSchedule(start=0, every=1, **schedule), optimizer)


@pytest.mark.parametrize("pairs, merged, kept", [("adjacent", [0], [1]), ("any", [0], [3])])
def test_adjacent_pairs_never_merge_distant_layers(pairs, merged, kept):
    """Layers 0 and 3 are closest overall, 0 and 1 among neighbours."""
    _, merger = _merger([0.0, 3.0, 10.0, 0.05], merges=1, pairs=pairs)
    (event,) = merger.observe(1)
    assert (event.merged, event.kept) == (merged, kept)


def test_mean_merge_weights_each_side_by_its_group_size():
    """[0, 4, 5]: step 1 means layers 1 and 2 (4.5); step 2 means {0} (0) with {1, 2} (4.5), 1:2."""
    handle, merger = _merger([0.0, 4.0, 5.0], merges=2, mode="mean", pairs="any")
    merger.observe(1)
    (event,) = merger.observe(2)
    assert (event.merged, event.kept) == ([0], [1, 2])
    (name,) = {s.b for s in handle.adapter.sites.values()}
    want = (0.0 * 1 + 4.5 * 2) / 3
    torch.testing.assert_close(handle.parameters[name].detach(), torch.full_like(handle.parameters[name], want))
    torch.testing.assert_close(merger.averages[name], torch.full_like(merger.averages[name], want))


# ---------------------------------------------------------------------------------------- --lm-loss
def _heldout_lm_loss(base, adapter_dir, data_path, max_length, fraction) -> float:
    """Next-token cross-entropy of base + adapter on the held-out examples, one unpadded sequence at a time."""
    model = load_base_model(base)
    attach(model, load_adapter(adapter_dir))
    _, heldout = split_heldout(load_data(data_path, base, max_length), fraction)
    total, count = 0.0, 0
    with torch.no_grad():
        for seq in heldout.sequences:
            ids = torch.tensor([seq])
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += len(seq) - 1
    return total / count


def test_lm_loss_changes_training_and_is_reported_exactly(setup, tmp_path):
    options = TrainingOptions(steps=8, lr=1e-2, **SMALL)
    reports = {
        w: flows.recover(
            str(setup["shared"]),
            str(setup["base"]),
            str(setup["lora"]),
            str(setup["text"]),
            str(tmp_path / f"w{w}"),
            lm_loss=w,
            options=options,
        )
        for w in (0.0, 1.0)
    }
    trained = {w: load_adapter(tmp_path / f"w{w}") for w in reports}
    assert any(not torch.equal(trained[0.0].tensors[n], trained[1.0].tensors[n]) for n in trained[0.0].tensors)
    # the task loss (cross-entropy of a near-uniform 64-way model, ~4) is in the training loss
    assert reports[1.0]["final_train_loss"] - reports[0.0]["final_train_loss"] > 1.0
    for w, report in reports.items():
        want = _heldout_lm_loss(setup["base"], tmp_path / f"w{w}", setup["text"], 24, 0.1)
        assert report["after"]["lm_loss"]["student"] == pytest.approx(want, rel=1e-4)
    assert reports[1.0]["after"]["lm_loss"]["student"] < reports[0.0]["after"]["lm_loss"]["student"]


# ---------------------------------------------------------------------------------------- learning
def test_train_moves_the_adapter_and_lowers_the_task_loss(setup, tmp_path):
    out = tmp_path / "lora"
    report = flows.train(
        "lora",
        str(setup["base"]),
        ["q_proj", "v_proj"],
        4,
        str(setup["text"]),
        str(out),
        options=TrainingOptions(steps=12, lr=2e-2, seed=3, **SMALL),
    )
    init = fresh_adapter(load_base_model(setup["base"]), "lora", ["q_proj", "v_proj"], rank=4, alpha=8.0, seed=3)
    trained = load_adapter(out)
    assert set(trained.tensors) == set(init.tensors)
    moved = {n: float((trained.tensors[n] - init.tensors[n]).abs().max()) for n in init.tensors}
    assert all(v > 1e-3 for v in moved.values()), moved
    assert report["after"]["lm_loss"]["student"] < report["before"]["lm_loss"]["student"] - 0.05, report
