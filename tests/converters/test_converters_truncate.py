"""Plain LoRA truncation: dense SVD truncation per site, PEFT's convert_to_lora, exhaustive budgets."""

import copy
import itertools
import math
import random
import warnings

import pytest
import torch

import converters
from converters import truncate
from tests.converters_reference import F64, dense_updates, random_kind
from tests.tiny import input_ids, randomize_lora, tiny_llama


def dense_truncation(dw: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def dense_tails(As, Bts) -> list[list[float]]:
    """tails[l][k] = ||dW_l - (best rank k)||^2 = sum_{i>k} sigma_i^2, from dense SVDs."""
    out = []
    for a, dw in zip(As, dense_updates(As, Bts)):
        m = min(a.shape[0], *dw.shape)  # ranks 0..m: truncation never expands
        s2 = torch.linalg.svdvals(dw).square()
        out.append([float(s2[k:].sum()) for k in range(m + 1)])
    return out


def test_every_rank_is_the_dense_svd_truncation_and_its_error():
    gen = torch.Generator().manual_seed(40)
    # (n_out, n_in, r): wide, tall, and r above n_out (only n_out singular values exist)
    for n_out, n_in, r in [(9, 7, 5), (12, 20, 6), (4, 12, 6)]:
        (a,), (bt,) = random_kind(gen, 1, n_out, n_in, r, dtype=F64)
        dw = bt @ a
        norm = float(dw.norm())
        for k in range(r + 2):
            site = truncate.truncate_site(a, bt, k)
            assert site.rank == min(k, r, n_out, n_in)
            assert site.a.shape == (site.rank, n_in) and site.b.shape == (n_out, site.rank)
            assert float((site.b @ site.a - dense_truncation(dw, k)).norm()) <= 1e-8 * norm
            dense_error = float((dw - site.b @ site.a).square().sum())
            assert site.error == pytest.approx(dense_error, rel=1e-8, abs=1e-12 * norm**2)
            assert site.error == pytest.approx(
                float(torch.linalg.svdvals(dw)[k:].square().sum()), rel=1e-8, abs=1e-12 * norm**2
            )
            # PEFT's split: A has orthonormal rows, B = U_k S_k
            assert torch.allclose(site.a @ site.a.T, torch.eye(site.rank, dtype=F64), atol=1e-12)
        assert torch.allclose(
            site.singular_values, torch.linalg.svdvals(dw)[: len(site.singular_values)], rtol=1e-10, atol=1e-12 * norm
        )
        assert all(
            site.error_at(k)
            == pytest.approx(float(torch.linalg.svdvals(dw)[k:].square().sum()), rel=1e-8, abs=1e-12 * norm**2)
            for k in range(r + 1)
        )


def test_truncate_kind_reports_sites_layout_and_errors():
    gen = torch.Generator().manual_seed(41)
    As, Bts = random_kind(gen, 5, 10, 14, ranks=[4, 3, 4, 2, 4])
    ranks = [2, 3, 1, 5, 0]
    result = converters.truncate_kind(As, Bts, ranks)
    assert isinstance(result, converters.KindResult) and result.method == "lora"
    assert result.ranks == [2, 3, 1, 2, 0] and result.rank == 3  # capped, never expanded
    assert result.a_index == result.b_index == list(range(5))
    assert result.a_tensors[0].dtype == torch.float32
    tails = dense_tails(As, Bts)
    expected = sum(t[k] for t, k in zip(tails, result.ranks))
    assert result.error == pytest.approx(expected, rel=1e-9)
    assert converters.reconstruction_error(As, Bts, result) == pytest.approx(expected, rel=1e-4)
    assert result.parameter_count() == converters.lora_parameter_count(10, 14, result.ranks)
    # the merged spectrum: least error with t ranks spread over the kind's sites
    assert result.energy - float(result.spectrum[:8].sum()) == pytest.approx(
        min(
            sum(t[k] for t, k in zip(tails, ks))
            for ks in itertools.product(*[range(len(t)) for t in tails])
            if sum(ks) == 8
        ),
        rel=1e-9,
    )
    with pytest.raises(ValueError):
        converters.truncate_kind(As, Bts, [1, 2])
    with pytest.raises(ValueError):
        converters.truncate_kind(As, Bts, 0)


def test_full_rank_is_lossless_and_rank_zero_sites_are_handled():
    gen = torch.Generator().manual_seed(42)
    As, Bts = random_kind(gen, 3, 8, 6, ranks=3, dtype=F64)
    As.append(torch.zeros(0, 6, dtype=F64))
    Bts.append(torch.zeros(8, 0, dtype=F64))
    result = converters.truncate_kind(As, Bts, 3)
    assert result.ranks == [3, 3, 3, 0]
    assert result.error <= 1e-24 * result.energy
    for (b, a), dw in zip((result.site_factors(p) for p in range(4)), dense_updates(As, Bts)):
        assert torch.allclose(b @ a, dw, atol=1e-12)
    assert result.a_tensors[3].shape == (0, 6) and result.b_tensors[3].shape == (8, 0)
    kinds = {"k": (As, Bts)}
    for mode in ({"rank": 2}, {"energy": 0.5}, {"budget": 0.5}, {}):
        plan = converters.plan_truncation(kinds, **mode)
        assert plan.kinds["k"].ranks[3] == 0 and all(k >= 1 for k in plan.kinds["k"].ranks[:3])
    assert converters.plan_truncation(kinds).kinds["k"].ranks == [3, 3, 3, 0]  # default: kept whole


def test_same_input_gives_identical_tensors_with_fixed_signs():
    gen = torch.Generator().manual_seed(43)
    As, Bts = random_kind(gen, 4, 11, 9, ranks=5)
    first = converters.truncate_kind(As, Bts, 3)
    again = converters.truncate_kind([a.clone() for a in As], [b.clone() for b in Bts], 3)
    for x, y in zip(first.a_tensors + first.b_tensors, again.a_tensors + again.b_tensors):
        assert torch.equal(x, y)
    for a in first.a_tensors:
        peak = a.gather(1, a.abs().argmax(dim=1, keepdim=True))
        assert bool((peak > 0).all())


@pytest.mark.parametrize("target", [0.3, 0.8, 0.95, 0.999, 1.0])
def test_energy_picks_the_smallest_rank_reaching_it(target):
    gen = torch.Generator().manual_seed(44)
    As, Bts = random_kind(gen, 6, 12, 10, ranks=[6, 5, 4, 6, 1, 3], dtype=F64)
    Bts[2] = torch.zeros_like(Bts[2])  # a zero update: rank 1, like PEFT
    plan = converters.plan_truncation({"k": (As, Bts)}, energy=target)
    for tail, k in zip(dense_tails(As, Bts), plan.kinds["k"].ranks):
        total = tail[0]
        brute = next((j for j in range(1, len(tail)) if tail[j] <= (1 - target) * total + 1e-12 * total), len(tail) - 1)
        assert k == brute
    assert plan.allocation == "energy"


# ---------------------------------------------------------------- budgets


def exhaustive(tails, costs, budget):
    """Least total error over every rank combination within the budget (rank >= 1 if affordable)."""
    floor = 1 if sum(costs) <= budget else 0
    best = None
    for ks in itertools.product(*[range(floor, len(t)) for t in tails]):
        if sum(k * c for k, c in zip(ks, costs)) <= budget:
            error = sum(t[k] for t, k in zip(tails, ks))
            best = error if best is None else min(best, error)
    return best


def knapsack_dp(tails, costs, budget):
    """The same optimum by a plain multiple-choice knapsack DP over every parameter count."""
    floor = 1 if sum(costs) <= budget else 0
    inf = float("inf")
    dp = [0.0] * (budget + 1)
    for tail, cost in zip(tails, costs):
        dp = [
            min((dp[b - k * cost] + tail[k] for k in range(floor, len(tail)) if k * cost <= b), default=inf)
            for b in range(budget + 1)
        ]
    return dp[budget]


def random_budget_case(gen, n_sites, shapes, max_rank):
    """Sites of the given shapes and random ranks, each with its dense tails and cost per rank."""
    As, Bts, costs = [], [], []
    for _ in range(n_sites):
        n_out, n_in = shapes[int(torch.randint(len(shapes), (1,), generator=gen))]
        r = int(torch.randint(1, min(max_rank, n_out, n_in) + 1, (1,), generator=gen))
        (a,), (bt,) = random_kind(gen, 1, n_out, n_in, r, dtype=F64)
        As.append(a)
        Bts.append(bt * float(torch.rand(1, generator=gen) * 3))  # sites of unequal weight
        costs.append(n_out + n_in)
    return As, Bts, costs


def test_exact_budget_is_the_exhaustive_optimum_and_greedy_stays_within_its_bound():
    gen = torch.Generator().manual_seed(45)
    shapes = [(6, 5), (4, 9), (7, 3), (5, 5), (8, 6)]
    worst_gap = 0.0  # largest (greedy - exact) / energy: 0.053 here (1 case of 150, 10% above its optimum)
    for case in range(150):
        As, Bts, costs = random_budget_case(gen, 3 + case % 3, shapes, max_rank=5)
        tails = dense_tails(As, Bts)
        spectra = [truncate.site_singular_values(a, bt).square() for a, bt in zip(As, Bts)]
        lora = sum(a.shape[0] * c for a, c in zip(As, costs))
        budget = math.floor(float(torch.rand(1, generator=gen)) * lora)
        optimum = exhaustive(tails, costs, budget)
        assert knapsack_dp(tails, costs, budget) == pytest.approx(optimum, rel=1e-12)  # the other reference
        energy = sum(t[0] for t in tails)
        exact = truncate.allocate_budget(spectra, costs, budget)
        greedy = truncate.allocate_budget(spectra, costs, budget, exact=False)
        for chosen in (exact, greedy):
            assert chosen.params == sum(k * c for k, c in zip(chosen.ranks, costs)) <= budget
            assert chosen.error == pytest.approx(
                sum(t[k] for t, k in zip(tails, chosen.ranks)), rel=1e-9, abs=1e-12 * energy
            )
        assert exact.method == "exact"
        assert exact.error == pytest.approx(optimum, rel=1e-9, abs=1e-12 * energy), case
        assert greedy.error >= optimum - 1e-12 * energy
        assert greedy.error_lower_bound <= optimum + 1e-12 * energy
        worst_gap = max(worst_gap, (greedy.error - optimum) / energy)
    assert 0.0 < worst_gap < 0.1  # greedy does miss on some cases, by a few % of the energy


def test_exact_search_is_exact_where_its_proximity_ball_cuts_the_ranges():
    """Costs sharing a factor (gcd 2 or 3): the search keeps each count within 2 max/gcd - 1
    (5 or 9) of the greedy's while a class holds up to 36 optional ranks, so this checks the
    proximity argument itself (a radius of 1 fails here). Spectra are drawn directly, with
    heavy tails and sites of unequal weight, where greedy choices go wrong most often."""
    rng = random.Random(46)
    cut = 0
    for case in range(300):
        cost_set = rng.choice([[6, 9], [4, 6, 10], [6, 10, 15], [8, 12]])
        costs = [rng.choice(cost_set) for _ in range(rng.randint(4, 12))]
        spectra = [
            torch.tensor(
                sorted(
                    (rng.random() ** rng.choice([1, 3]) * rng.choice([1, 5]) for _ in range(rng.randint(1, 4))),
                    reverse=True,
                ),
                dtype=F64,
            )
            for _ in costs
        ]
        tails = [[float(s[k:].sum()) for k in range(len(s) + 1)] for s in spectra]
        budget = rng.randint(0, sum(len(s) * c for s, c in zip(spectra, costs)))
        chosen = truncate.allocate_budget(spectra, costs, budget, exact=True)
        assert chosen.error == pytest.approx(knapsack_dp(tails, costs, budget), rel=1e-9, abs=1e-12), case
        radius = 2 * max(costs) // math.gcd(*costs) - 1
        cut += any(sum(len(s) - 1 for s, c in zip(spectra, costs) if c == w) > 2 * radius + 1 for w in costs)
    assert cut >= 30  # cases where the ball is narrower than a class's whole range (36 here)


def test_greedy_misses_where_a_dear_site_is_worth_more_and_reports_its_bound():
    # site X: one rank costs 10 and removes 9.5; site Y: ranks cost 6, remove 6 then 1
    spectra = [torch.tensor([9.5], dtype=F64), torch.tensor([6.0, 1.0], dtype=F64)]
    greedy = truncate.allocate_budget(spectra, [10, 6], 10, exact=False)
    exact = truncate.allocate_budget(spectra, [10, 6], 10)
    assert (greedy.ranks, greedy.error) == ([0, 1], 10.5)  # rank 1 everywhere costs 16 > 10
    assert (exact.ranks, exact.error) == ([1, 0], 7.0)
    assert greedy.error_lower_bound == pytest.approx(16.5 - (6.0 + 9.5 * 4 / 10))
    # equal costs: greedy is optimal (the LP's partial item cannot be taken by anyone)
    same = truncate.allocate_budget([torch.tensor([5.0, 4.0, 1.0]), torch.tensor([4.5, 0.5])], [7, 7], 28, exact=False)
    assert same.ranks == [3, 1] and same.error == pytest.approx(0.5)  # rank 1 each, then 4.0 and 1.0


def test_exact_search_falls_back_to_greedy_above_its_limit(monkeypatch):
    gen = torch.Generator().manual_seed(47)
    As, Bts, costs = random_budget_case(gen, 6, [(6, 5), (4, 9), (7, 3)], max_rank=4)
    spectra = [truncate.site_singular_values(a, bt).square() for a, bt in zip(As, Bts)]
    monkeypatch.setattr(truncate, "EXACT_CANDIDATE_LIMIT", 1)
    assert truncate.allocate_budget(spectra, costs, 60).method == "greedy"
    with pytest.raises(ValueError):
        truncate.allocate_budget(spectra, costs, 60, exact=True)


def test_plan_budget_spans_kinds_and_never_exceeds_it():
    gen = torch.Generator().manual_seed(48)
    kinds = {"q": random_kind(gen, 4, 12, 12, ranks=4), "v": random_kind(gen, 4, 6, 12, ranks=4, common=2.0)}
    lora = 4 * 4 * 24 + 4 * 4 * 18
    tails = {n: dense_tails(*k) for n, k in kinds.items()}
    for fraction in (0.1, 0.3, 0.6, 1.0):
        plan = converters.plan_truncation(kinds, budget=fraction)
        assert plan.budget == math.floor(fraction * lora) and plan.lora_params == lora
        assert plan.params <= plan.budget and plan.allocation == "exact"
        flat_tails = tails["q"] + tails["v"]
        costs = [24] * 4 + [18] * 4
        assert plan.error == pytest.approx(knapsack_dp(flat_tails, costs, plan.budget), rel=1e-9)
        for name, p in plan.kinds.items():
            result = converters.truncate_kind(*kinds[name], p.ranks)
            assert result.error == pytest.approx(p.estimated_error, rel=1e-9)
            assert result.parameter_count() == p.params
    explicit = converters.plan_truncation(kinds, rank={"q": 2, "v": 9})
    assert (explicit.allocation, explicit.kinds["q"].ranks, explicit.kinds["v"].ranks) == ("rank", [2] * 4, [4] * 4)
    # below rank 1 everywhere (8 sites * 18..24 params) some sites drop to 0
    small = converters.plan_truncation(kinds, budget=60 / lora)
    assert 0 in small.kinds["q"].ranks + small.kinds["v"].ranks and small.params <= 60
    with pytest.raises(ValueError):
        converters.plan_truncation(kinds, budget=0.5, rank=2)
    with pytest.raises(ValueError):
        converters.plan_truncation(kinds, energy=1.5)


# ---------------------------------------------------------------- PEFT's own truncation


@pytest.fixture(scope="module")
def peft_lora():
    """A tiny Llama with a random (non-zero B) PEFT LoRA r=8 on q_proj, v_proj; and its base copy."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(layers=2, seed=3)
    pristine = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model, seed=5)
    return model.eval(), pristine


def lora_sites(model):
    """{module name: (A, B scaled)} of a PEFT LoRA model's adapted modules."""
    from peft.tuners.lora import LoraLayer

    return {
        name: (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach() * m.scaling["default"])
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }


def quiet_convert(model, rank):
    from peft import convert_to_lora

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "already a LoRA adapter": truncating one is the point here
        return convert_to_lora(model, rank=rank)


def test_updates_and_logits_equal_peft_convert_to_lora(peft_lora, tmp_path):
    from peft import PeftModel, save_as_lora

    model, pristine = peft_lora
    sites = lora_sites(model)
    config, state = quiet_convert(model, 4)
    assert config.r == config.lora_alpha == 4  # PEFT bakes the scale in: ours is 1 as well
    ours = {name: truncate.truncate_site(a, bt, 4) for name, (a, bt) in sites.items()}
    for name, site in ours.items():
        peft_a, peft_b = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
        torch.testing.assert_close(site.b @ site.a, peft_b @ peft_a, atol=1e-5, rtol=0)
        # same split, up to each component's sign: |A| rows and |B| columns agree
        torch.testing.assert_close(site.a.abs(), peft_a.abs(), atol=1e-4, rtol=0)
        torch.testing.assert_close(site.b.abs(), peft_b.abs(), atol=1e-4, rtol=0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_as_lora(tmp_path, model, rank=4)
    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path).eval()
    merged = copy.deepcopy(pristine)
    with torch.no_grad():
        for name, site in ours.items():
            layer = merged.get_submodule(name.removeprefix("base_model.model."))
            layer.weight += site.b @ site.a
        ids = input_ids(batch=2, seq=7)
        peft_logits, our_logits, base_logits = loaded(ids).logits, merged(ids).logits, pristine(ids).logits
    torch.testing.assert_close(our_logits, peft_logits, atol=1e-5, rtol=1e-5)
    assert float((our_logits - base_logits).abs().max()) > 1e-2  # the adapter matters


def test_energy_ranks_equal_peft_float_rank(peft_lora):
    model, _ = peft_lora
    sites = lora_sites(model)
    kinds = {name: ([a], [bt]) for name, (a, bt) in sites.items()}
    for target in (0.5, 0.8, 0.95):
        config, _ = quiet_convert(model, target)
        plan = converters.plan_truncation(kinds, energy=target)
        for name in sites:
            assert plan.kinds[name].ranks == [config.rank_pattern[name.removeprefix("base_model.model.")]]
