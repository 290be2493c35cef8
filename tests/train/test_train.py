"""`shareport train`: ShareLoRA init, and ASLoRA merges at exactly the scheduled steps."""

import json

import pytest
import torch

from shareport.errors import ShareportError
from shareport.files.adapters import load_adapter
from shareport.model.fresh import fresh_adapter
from shareport.model.surgery import attach
from shareport.train.merging import BMerger, MergeSchedule
from tests.tiny import tiny_llama
from tests.training_helpers import save_base, write_text


@pytest.fixture(scope="module")
def base_and_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return save_base(tiny_llama(layers=4), root / "base"), write_text(root / "train.txt", 60)


def test_sharelora_init_one_parameter_per_kind(base_and_text):
    model = tiny_llama(layers=4)
    adapter = fresh_adapter(model, "shareab", ["q_proj", "v_proj"], rank=4, alpha=8, seed=0)
    assert len(adapter.used_tensor_names()) == 4  # one A and one B per kind
    assert all(s.scale == 2.0 for s in adapter.sites.values())
    assert all(adapter.tensors[s.b].abs().max() == 0 for s in adapter.sites.values())
    a = adapter.tensors["self_attn.q_proj.lora_A"]
    assert a.abs().max() <= (1 / a.shape[1]) ** 0.5 and a.std() > 0  # kaiming-uniform bound 1/sqrt(fan_in)
    handle = attach(model, adapter, trainable=True)
    assert len({id(w.lora_A) for w in handle.wrappers.values()}) == 2


@pytest.mark.parametrize("limit", [("--groups", 1), ("--merges", 2)])
def test_aslora_merges_on_schedule_and_ends_with_the_groups(base_and_text, tmp_path, cli, limit):
    """T_s=2, m=3, 4 layers -> merges at steps 5, 8, 11 (with --groups 1) or 5, 8 (--merges 2)."""
    base, text = base_and_text
    out = tmp_path / "aslora"
    result = cli(
        "train",
        "--form",
        "aslora",
        "--base",
        base,
        "--data",
        text,
        "--target",
        "q_proj,v_proj",
        "--rank",
        4,
        "--steps",
        12,
        "--lr",
        1e-2,
        "--batch-size",
        4,
        "--max-length",
        24,
        "--merge-start",
        2,
        "--merge-every",
        3,
        *limit,
        "--json",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "training_report.json").read_text())
    groups = 4 - limit[1] if limit[0] == "--merges" else limit[1]
    expected_steps = [5, 8, 11][: 4 - groups]
    assert sorted({e["step"] for e in report["merges"]}) == expected_steps
    assert report["recipe"]["lr_scaling"] == "none"  # train's B's start at zero: no scale of their own
    for kind in ("self_attn.q_proj", "self_attn.v_proj"):
        assert [e["step"] for e in report["merges"] if e["kind"] == kind] == expected_steps
    adapter = load_adapter(out)
    assert adapter.form == "aslora"
    assert report["groups"] == {"self_attn.q_proj": groups, "self_attn.v_proj": groups}
    # q: A 4x32 + groups x (32x4); v: A 4x32 + groups x (16x4) (2 kv heads of 8)
    assert adapter.num_parameters() == report["parameters"]["end"] == 2 * 128 + groups * (128 + 64)
    assert "lm_loss" in report["after"]


def _attached_with_bs(bs: list[float]):
    """A ShareA on tiny Llama's q_proj whose layer-l B is the constant bs[l]."""
    model = tiny_llama(layers=len(bs))
    adapter = fresh_adapter(model, "sharea", ["q_proj"], rank=2, alpha=2, seed=0)
    tensors = dict(adapter.tensors)
    for site in adapter.sites.values():
        tensors[site.b] = torch.full_like(tensors[site.b], bs[site.layer])
    handle = attach(model, adapter.with_sites(tensors, dict(adapter.sites), "sharea"), trainable=True)
    optimizer = torch.optim.AdamW([handle.parameters[n] for n in sorted(handle.parameters)], lr=0.1)
    return handle, optimizer


@pytest.mark.parametrize("pairs, merged", [("adjacent", [1]), ("any", [0])])
def test_merge_picks_the_closest_running_averages(pairs, merged):
    # layers 0 and 2 are closest overall; among neighbours, 1 and 2 are
    handle, opt = _attached_with_bs([0.0, 1.0, 0.1, 5.0])
    merger = BMerger(handle, MergeSchedule(start=0, every=1, merges=1, pairs=pairs), opt)
    (event,) = merger.observe(1)
    assert event.merged == merged and event.kept == [2]
    sites = handle.adapter.kinds()["self_attn.q_proj"]
    assert handle.wrappers[sites[merged[0]].path].lora_B is handle.wrappers[sites[2].path].lora_B
    assert len(opt.param_groups[0]["params"]) == 1 + 3  # one A, three B's left
    assert handle.to_adapter().num_parameters() == handle.adapter.num_parameters()


def _set_bs(handle, bs: list[float]) -> None:
    """Set layer l's B (of q_proj) to the constant bs[l], in place (as an optimizer step would)."""
    with torch.no_grad():
        for site in handle.adapter.kinds()["self_attn.q_proj"]:
            handle.parameters[site.b].fill_(bs[site.layer])


def test_merge_uses_the_mean_of_every_observed_b_not_the_last():
    """Three observed steps with different B's: the running averages are the plain means of the three,
    and the merge at step 3 ties the neighbours closest *on average* (layers 1 and 2), not the ones
    closest now (layers 2 and 3)."""
    seen = [[0.0, 10.0, 0.0, 10.0], [0.0, 10.0, 0.0, 10.0], [0.0, 0.1, 5.0, 5.05]]
    handle, opt = _attached_with_bs(seen[0])
    sites = handle.adapter.kinds()["self_attn.q_proj"]
    merger = BMerger(handle, MergeSchedule(start=2, every=1, merges=1), opt)
    means = torch.tensor(seen, dtype=torch.float64).cumsum(0) / torch.arange(1, 4, dtype=torch.float64)[:, None]
    for step, bs in enumerate(seen[:2], start=1):
        _set_bs(handle, bs)
        assert merger.observe(step) == []
        for site in sites:
            torch.testing.assert_close(
                merger.averages[site.b].double(),
                torch.full(merger.averages[site.b].shape, float(means[step - 1, site.layer]), dtype=torch.float64),
            )
    _set_bs(handle, seen[2])
    (event,) = merger.observe(3)
    gaps = (means[2, 1:] - means[2, :-1]).abs()  # adjacent pairs (l, l+1)
    assert int(gaps.argmin()) == 1 and event.merged == [1] and event.kept == [2]
    numel = handle.parameters[sites[2].b].numel()
    assert event.distance == pytest.approx(float(gaps.min()) * numel**0.5, rel=1e-5)  # Frobenius of a constant
    for site in (sites[0], sites[2], sites[3]):
        assert float(merger.averages[site.b].flatten()[0]) == pytest.approx(float(means[2, site.layer]), rel=1e-6)


def test_mean_merge_averages_values_and_optimizer_moments():
    handle, opt = _attached_with_bs([0.0, 1.0, 9.0])
    handle.model(input_ids=torch.tensor([[3, 4, 5]])).logits.sum().backward()
    opt.step()
    state_before = {n: opt.state[p]["exp_avg"].clone() for n, p in handle.parameters.items()}
    values_before = {n: p.detach().clone() for n, p in handle.parameters.items()}
    merger = BMerger(handle, MergeSchedule(start=0, every=1, merges=1, mode="mean"), opt)
    (event,) = merger.observe(1)
    sites = handle.adapter.kinds()["self_attn.q_proj"]
    keep = sites[event.kept[0]].b
    lower, upper = (f"model.layers.{i}.self_attn.q_proj.lora_B" for i in (event.merged[0], event.kept[0]))
    torch.testing.assert_close(handle.parameters[keep].detach(), (values_before[lower] + values_before[upper]) / 2)
    torch.testing.assert_close(
        opt.state[handle.parameters[keep]]["exp_avg"], (state_before[lower] + state_before[upper]) / 2
    )
    assert lower not in handle.parameters


def test_schedule_due_steps_and_limits():
    schedule = MergeSchedule(start=320, every=240, merges=7)
    assert [t for t in range(0, 2300) if schedule.due(t)][:3] == [560, 800, 1040]
    assert schedule.last_merge_step(12) == 320 + 7 * 240
    with pytest.raises(ShareportError, match="exceeds"):
        MergeSchedule(start=0, every=1, merges=12).merges_needed(12)
    with pytest.raises(ShareportError, match="exactly one"):
        MergeSchedule(start=0, every=1)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 8, 13, 100])
@pytest.mark.parametrize("merges", [1, 2, 5])
def test_default_schedule_fits_short_runs(steps, merges):
    """With T_s and m left to shareport, the merges end by the last step whenever one a step fits."""
    if merges > steps:
        with pytest.raises(ShareportError, match=f"--steps {steps} is too short for {merges} merge"):
            MergeSchedule.spread(steps, 6, merges=merges)
        return
    schedule = MergeSchedule.spread(steps, 6, merges=merges)
    due = [t for t in range(1, steps + 1) if schedule.due(t)]
    assert schedule.every >= 1 and schedule.start >= 0
    assert len(due) >= merges and due[merges - 1] == schedule.last_merge_step(6) <= steps
    if steps >= 4 * merges:  # room for the paper's phases: a quarter unmerged, merges within the middle half
        assert schedule.start == steps // 4 and schedule.last_merge_step(6) <= steps // 4 + steps // 2


def test_short_run_schedule_with_one_value_given():
    assert MergeSchedule.spread(10, 6, merges=3, start=6).every == 1  # 7, 8, 9
    assert MergeSchedule.spread(10, 6, merges=3, every=3).start == 1  # 4, 7, 10
    with pytest.raises(ShareportError, match="at --merge-every 4"):
        MergeSchedule.spread(10, 6, merges=3, every=4)


def test_merging_needs_a_shared_a():
    model = tiny_llama(layers=2)
    handle = attach(model, fresh_adapter(model, "shareb", ["q_proj"], rank=2, alpha=2, seed=0), trainable=True)
    with pytest.raises(ShareportError, match="one shared A per kind"):
        BMerger(handle, MergeSchedule(start=0, every=1, merges=1), torch.optim.AdamW(handle.parameters.values()))
