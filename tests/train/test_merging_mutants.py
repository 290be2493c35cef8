"""``shareport/train/merging.py`` beyond the happy path: the schedule's refusals and limits, size-weighted
mean merges (values, running averages and AdamW moments), several kinds, tie-breaking, the checkpoint
round trip. Written against the surviving mutants of tests/mutation/mutation.sh merging; every
expected value is computed here from the rule the module docstring states (plain means, weighted means,
Frobenius distances), on tiny models whose B's are constants."""

import dataclasses
import json

import pytest
import torch

from shareport.errors import ShareportError
from shareport.model.fresh import fresh_adapter
from shareport.model.surgery import attach
from shareport.train.merging import BMerger, MergeEvent, MergeSchedule
from tests.tiny import tiny_llama

Q, V = "self_attn.q_proj", "self_attn.v_proj"


def _attached(bs: list[float], tie: tuple[tuple[int, int], ...] = (), targets=("q_proj",)):
    """ShareA (or, with ``tie``, ASLoRA) on tiny Llama whose layer-l B is the constant bs[l] in every kind;
    ``tie`` pairs (lower, upper) make the lower layer use the upper layer's B."""
    model = tiny_llama(layers=len(bs))
    adapter = fresh_adapter(model, "sharea", list(targets), rank=2, alpha=2, seed=0)
    tensors, sites = dict(adapter.tensors), dict(adapter.sites)
    for kind_sites in adapter.kinds().values():
        by_layer = {s.layer: s for s in kind_sites}
        for s in kind_sites:
            tensors[s.b] = torch.full_like(tensors[s.b], bs[s.layer])
        for lower, upper in tie:
            sites[by_layer[lower].path] = dataclasses.replace(by_layer[lower], b=by_layer[upper].b)
            del tensors[by_layer[lower].b]
    handle = attach(model, adapter.with_sites(tensors, sites, "aslora" if tie else "sharea"), trainable=True)
    optimizer = torch.optim.AdamW([handle.parameters[n] for n in sorted(handle.parameters)], lr=0.1)
    return handle, optimizer


def _b(handle, layer: int, kind: str = Q) -> str:
    return next(s.b for s in handle.adapter.kinds()[kind] if s.layer == layer)


def _one_step(handle, optimizer) -> None:
    handle.model(input_ids=torch.tensor([[3, 4, 5, 6]])).logits.square().mean().backward()
    optimizer.step()


# ---------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(start=0, every=1), "give exactly one of --merges and --groups"),
        (dict(start=0, every=1, merges=1, groups=1), "give exactly one of --merges and --groups"),
        (dict(start=-1, every=1, merges=1), "--merge-start must be >= 0 and --merge-every >= 1, got -1 and 1"),
        (dict(start=0, every=0, merges=1), "--merge-start must be >= 0 and --merge-every >= 1, got 0 and 0"),
        (dict(start=0, every=1, merges=0), "--merges and --groups must be at least 1"),
        (dict(start=0, every=1, groups=0), "--merges and --groups must be at least 1"),
        (
            dict(start=0, every=1, merges=1, mode="median"),
            "merge mode must be one of ('tie', 'mean') and pairs one of ('adjacent', 'any')",
        ),
        (dict(start=0, every=1, merges=1, pairs="far"), "merge mode must be one of"),
    ],
)
def test_schedule_refusals(fields, message):
    with pytest.raises(ShareportError) as info:
        MergeSchedule(**fields)
    assert str(info.value).startswith(message)


def test_schedule_boundaries_are_accepted():
    MergeSchedule(start=0, every=1, merges=1)
    MergeSchedule(start=0, every=1, groups=1, mode="mean", pairs="any")
    schedule = MergeSchedule(start=3, every=2, merges=1)
    assert [t for t in range(12) if schedule.due(t)] == [5, 7, 9, 11]  # after T_s, every m


def test_merges_needed_limits():
    assert MergeSchedule(start=0, every=1, groups=4).merges_needed(4) == 0
    assert MergeSchedule(start=0, every=1, groups=1).merges_needed(4) == 3
    assert MergeSchedule(start=0, every=1, merges=3).merges_needed(4) == 3
    with pytest.raises(ShareportError, match=r"^--groups 5 exceeds the 4 layers of a kind$"):
        MergeSchedule(start=0, every=1, groups=5).merges_needed(4)
    with pytest.raises(ShareportError, match=r"^--merges 4 exceeds what 4 layers allow \(3\)$"):
        MergeSchedule(start=0, every=1, merges=4).merges_needed(4)
    assert MergeSchedule(start=7, every=3, groups=4).last_merge_step(4) == 0  # no merge at all
    assert MergeSchedule(start=7, every=3, groups=2).last_merge_step(4) == 7 + 2 * 3


@pytest.mark.parametrize("steps, merges", [(12, 1), (12, 3), (40, 3), (100, 5), (7, 2), (9, 4)])
def test_default_spread_uses_the_whole_middle_half(steps, merges):
    """With neither T_s nor m given and room for the phases: T_s = steps // 4 and m the largest step
    that keeps every merge within the next steps // 2 steps."""
    schedule = MergeSchedule.spread(steps, 6, merges=merges)
    assert schedule.start == steps // 4
    assert schedule.every * merges <= steps // 2 < (schedule.every + 1) * merges or schedule.every == 1
    assert (schedule.merges, schedule.groups, schedule.mode, schedule.pairs) == (merges, None, "tie", "adjacent")
    assert type(schedule.start) is int and type(schedule.every) is int  # steps are counted in whole numbers


def test_spread_keeps_given_values_and_fields():
    schedule = MergeSchedule.spread(40, 6, groups=2, start=5, every=4, mode="mean", pairs="any")
    assert (schedule.start, schedule.every, schedule.groups, schedule.mode, schedule.pairs) == (5, 4, 2, "mean", "any")
    # T_s given: m spreads the merges over what is left after it
    assert MergeSchedule.spread(40, 6, merges=4, start=20).every == (40 - 20) // 4
    late = MergeSchedule.spread(40, 6, merges=3, start=30)  # only 10 steps left: m = 10 // 3, not 20 // 3
    assert (late.start, late.every) == (30, 3) and type(late.every) is int
    # m given: T_s is a quarter, moved earlier only when the merges would end past the last step
    assert MergeSchedule.spread(40, 6, merges=2, every=5).start == 10
    assert MergeSchedule.spread(12, 6, merges=2, every=5).start == 12 - 2 * 5
    # a kind that needs no merge (--groups = layers) still gets a valid schedule
    assert MergeSchedule.spread(8, 6, groups=6).every >= 1


def test_spread_refusal_names_the_numbers():
    with pytest.raises(
        ShareportError,
        match=r"^--steps 3 is too short for 4 merge\(s\) per kind \(one merge step "
        r"each, after step 0: at least 4 steps\); raise --steps, or merge less "
        r"\(--merges/--groups\)$",
    ):
        MergeSchedule.spread(3, 6, merges=4)


# ------------------------------------------------------------------------------------------------ merger


def test_fresh_merger_state():
    handle, opt = _attached([1.0, 2.0, 3.0], targets=("q_proj", "v_proj"))
    merger = BMerger(handle, MergeSchedule(start=0, every=1, groups=2), opt)
    assert merger.observed == 0 and merger.events == []
    assert merger.remaining == {Q: 1, V: 1}
    b_names = sorted({s.b for s in handle.adapter.sites.values()})
    assert sorted(merger.averages) == b_names
    assert all(a.dtype == torch.float32 and not a.any() for a in merger.averages.values())


def test_each_kind_merges_until_its_limit_then_stops():
    """Two kinds, two merges each: steps 1 and 2 merge both kinds (in kind order), step 3 nothing more."""
    handle, opt = _attached([0.0, 1.0, 3.0, 7.0], targets=("q_proj", "v_proj"))
    merger = BMerger(handle, MergeSchedule(start=0, every=1, merges=2), opt)
    first = merger.observe(1)
    assert [(e.kind, e.merged, e.kept, e.step) for e in first] == [(Q, [0], [1], 1), (V, [0], [1], 1)]
    assert first[0].distance == pytest.approx(1.0 * handle.parameters[_b(handle, 1)].numel() ** 0.5)
    second = merger.observe(2)
    # averages after step 2: B(1) (now groups {0,1}) mean(1, 1) = 1, then 3 and 7: {0,1} and {2} are closest
    assert [(e.kind, e.merged, e.kept) for e in second] == [(Q, [0, 1], [2]), (V, [0, 1], [2])]
    assert merger.observe(3) == [] and merger.remaining == {Q: 0, V: 0}
    assert [e.to_json() for e in merger.events] == [dataclasses.asdict(e) for e in first + second]
    assert {len({s.b for s in sites}) for sites in handle.adapter.kinds().values()} == {2}
    assert handle.adapter.form == "aslora"


def test_equal_distances_merge_the_lowest_pair_first():
    handle, opt = _attached([0.0, 1.0, 2.0, 3.0])
    (event,) = BMerger(handle, MergeSchedule(start=0, every=1, merges=1), opt).observe(1)
    assert (event.merged, event.kept) == ([0], [1])
    handle, opt = _attached([0.0, 1.0, 2.0, 3.0])
    (event,) = BMerger(handle, MergeSchedule(start=0, every=1, merges=1, pairs="any"), opt).observe(1)
    assert (event.merged, event.kept) == ([0], [1])


def test_any_pairs_may_merge_distant_groups_and_the_upper_one_keeps_its_b():
    """Layers 3 and 0 are closest; the group with the higher top layer (3) keeps its B."""
    handle, opt = _attached([0.0, 5.0, -5.0, 0.5])
    kept_b = _b(handle, 3)
    (event,) = BMerger(handle, MergeSchedule(start=0, every=1, merges=1, pairs="any"), opt).observe(1)
    assert (event.merged, event.kept) == ([0], [3])
    assert event.distance == pytest.approx(0.5 * handle.parameters[kept_b].numel() ** 0.5)
    assert handle.wrappers[handle.adapter.kinds()[Q][0].path].lora_B is handle.parameters[kept_b]
    assert _b(handle, 0) == kept_b and float(handle.parameters[kept_b].flatten()[0]) == 0.5


def test_mean_merge_weights_by_group_size():
    """Group {0,1} (B = 3) and group {2} (B = 9): the survivor is (2 * 3 + 1 * 9) / 3, and so are its
    running average and AdamW moments (each the size-weighted mean of the two); the step count stays."""
    handle, opt = _attached([0.0, 3.0, 9.0], tie=((0, 1),))
    _one_step(handle, opt)
    low, up = _b(handle, 1), _b(handle, 2)
    values = {n: handle.parameters[n].detach().clone() for n in (low, up)}
    moments = {n: {k: v.clone() for k, v in opt.state[handle.parameters[n]].items()} for n in (low, up)}
    merger = BMerger(handle, MergeSchedule(start=0, every=1, merges=1, mode="mean"), opt)
    (event,) = merger.observe(1)
    assert (event.merged, event.kept) == ([0, 1], [2])
    weighted = lambda a, b: (2 * a + 1 * b) / 3  # noqa: E731
    torch.testing.assert_close(handle.parameters[up].detach(), weighted(values[low], values[up]))
    torch.testing.assert_close(merger.averages[up], weighted(values[low], values[up]))
    state = opt.state[handle.parameters[up]]
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(state[key], weighted(moments[low][key], moments[up][key]))
    assert torch.equal(torch.as_tensor(state["step"]), torch.as_tensor(moments[up]["step"]))
    assert low not in merger.averages and low not in handle.parameters
    assert len(opt.param_groups[0]["params"]) == 2 and len(opt.state) == 2  # A and the one B left


def test_mean_merge_keeps_the_survivors_step_count():
    """AdamW skips a parameter without a gradient, so two B's can have taken different numbers of steps;
    the merged B keeps the survivor's count (a count is not averaged)."""
    handle, opt = _attached([0.0, 3.0])
    _one_step(handle, opt)
    low, up = _b(handle, 0), _b(handle, 1)
    handle.model(input_ids=torch.tensor([[3, 4, 5, 6]])).logits.square().mean().backward()
    handle.parameters[low].grad = None  # the lower B sits this step out
    opt.step()
    steps = {n: float(torch.as_tensor(opt.state[handle.parameters[n]]["step"])) for n in (low, up)}
    assert steps == {low: 1.0, up: 2.0}
    BMerger(handle, MergeSchedule(start=0, every=1, merges=1, mode="mean"), opt).observe(1)
    assert float(torch.as_tensor(opt.state[handle.parameters[up]]["step"])) == 2.0


def test_mean_merge_before_any_optimizer_step():
    handle, opt = _attached([1.0, 4.0])
    up = _b(handle, 1)
    (event,) = BMerger(handle, MergeSchedule(start=0, every=1, merges=1, mode="mean"), opt).observe(1)
    assert (event.merged, event.kept) == ([0], [1])
    assert float(handle.parameters[up].flatten()[0]) == pytest.approx(2.5) and len(opt.state) == 0


def test_tie_merge_keeps_the_upper_value_and_drops_the_lower_state():
    handle, opt = _attached([1.0, 4.0])
    _one_step(handle, opt)
    low, up = _b(handle, 0), _b(handle, 1)
    value, retired = handle.parameters[up].detach().clone(), handle.parameters[low]
    exp_avg = opt.state[handle.parameters[up]]["exp_avg"].clone()
    merger = BMerger(handle, MergeSchedule(start=0, every=1, merges=1), opt)
    merger.observe(1)
    assert torch.equal(handle.parameters[up].detach(), value)
    assert torch.equal(opt.state[handle.parameters[up]]["exp_avg"], exp_avg)
    assert retired not in opt.state and all(p is not retired for p in opt.param_groups[0]["params"])
    assert sorted(handle.to_adapter().used_tensor_names()) == sorted(["self_attn.q_proj.lora_A", up])


def test_checkpoint_state_round_trip():
    handle, opt = _attached([0.0, 1.0, 5.0, 6.0])
    merger = BMerger(handle, MergeSchedule(start=1, every=1, merges=2), opt)
    merger.observe(1)
    merger.observe(2)
    meta, tensors = merger.state()
    assert json.loads(json.dumps(meta)) == meta
    assert meta["observed"] == 2 and meta["remaining"] == {Q: 1} and len(meta["events"]) == 1
    assert sorted(tensors) == sorted(f"average/{n}" for n in merger.averages)

    again, opt2 = _attached([0.0, 1.0, 5.0, 6.0])
    restored = BMerger(again, MergeSchedule(start=1, every=1, merges=2), opt2)
    restored._rewire(  # the first merge's grouping, as the checkpoint's adapter holds it
        restored.groups(Q)[0], restored.groups(Q)[1]
    )
    restored.load_state(meta, {k: v.double() for k, v in tensors.items()})
    assert (restored.observed, restored.remaining) == (2, {Q: 1})
    assert restored.events == merger.events and isinstance(restored.events[0], MergeEvent)
    for name, avg in merger.averages.items():
        assert restored.averages[name].dtype == torch.float32 and torch.equal(restored.averages[name], avg)

    fresh, opt3 = _attached([0.0, 1.0, 5.0, 6.0])  # not rewired: four B's, the checkpoint has three
    with pytest.raises(
        ShareportError,
        match=r"^checkpoint's ASLoRA running averages do not match the adapter's B "
        r"tensors$",
    ):
        BMerger(fresh, MergeSchedule(start=1, every=1, merges=2), opt3).load_state(meta, tensors)
