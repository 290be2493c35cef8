"""Serving-aware plans (--max-rank, --uniform-rank, --rank-buckets) against independent references:
brute-force enumerations of every allowed allocation with dense-SVD errors, a loop over single ranks,
the unconstrained plan never worse, the padded count by its hand formula, and bad input refused."""

import itertools
import json
import math

import pytest
import torch

import converters
from converters.serving import ServingRule, choose_per_item
from tests.converters_reference import F64, dense_updates, eckart_young_sharea, random_kind
from tests.tiny import make_peft_adapter, tiny_llama


def _sites(seed: int):
    """Four sites of three shapes (three costs per rank), ranks 3-4, spectra from dense SVDs."""
    gen = torch.Generator().manual_seed(seed)
    kinds = {}
    for name, (n_sites, n_out, n_in, r) in {"q": (2, 6, 5, 3), "v": (1, 4, 7, 4), "o": (1, 9, 3, 3)}.items():
        kinds[name] = random_kind(gen, n_sites, n_out, n_in, r, dtype=F64)
    return kinds


def _dense_tails(kinds):
    """Per site in plan order: (cost per rank, tails[k] = error at rank k for k = 0..rank), from dense SVDs."""
    out = []
    for As, Bts in kinds.values():
        for a, dw in zip(As, dense_updates(As, Bts)):
            s2 = torch.linalg.svdvals(dw).square()
            m = min(a.shape[0], *dw.shape)
            out.append((dw.shape[0] + dw.shape[1], [float(s2[k:].sum()) for k in range(m + 1)]))
    return out


def _brute_force(sites, budget: int, allowed) -> float:
    """Least error over every rank vector with ``allowed(site, k)`` and cost <= budget; rank >= 1 everywhere
    (rank >= the least allowed) whenever the budget pays for that, as the planner's rule says."""
    choices = [[k for k in range(len(t)) if allowed(i, k)] for i, (_, t) in enumerate(sites)]
    floor_cost = sum(min(k for k in c if k > 0) * w for c, (w, _) in zip(choices, sites))
    best = math.inf
    for ranks in itertools.product(*choices):
        if floor_cost <= budget and 0 in ranks:
            continue
        if sum(k * w for k, (w, _) in zip(ranks, sites)) <= budget:
            best = min(best, sum(t[k] for k, (_, t) in zip(ranks, sites)))
    return best


def _lora_params(sites) -> int:
    return sum((len(t) - 1) * w for w, t in sites)


FRACTIONS = (0.15, 0.3, 0.45, 0.6, 0.8)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cap", [1, 2, 3])
def test_max_rank_plan_is_the_brute_force_optimum_under_the_cap(seed, cap):
    kinds = _sites(seed)
    sites = _dense_tails(kinds)
    for fraction in FRACTIONS:
        plan = converters.plan_truncation(kinds, budget=fraction, serving=ServingRule(max_rank=cap))
        budget = math.floor(fraction * _lora_params(sites))
        expected = _brute_force(sites, budget, lambda i, k: k <= cap)
        assert plan.error == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert max(k for p in plan.kinds.values() for k in p.ranks) <= cap
        assert plan.params <= budget
        assert plan.unconstrained.error <= plan.error + 1e-12
        assert plan.unconstrained.error == pytest.approx(_brute_force(sites, budget, lambda i, k: True), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uniform_rank_is_the_best_single_rank_the_budget_affords(seed):
    kinds = _sites(seed)
    sites = _dense_tails(kinds)
    for fraction in FRACTIONS:
        budget = math.floor(fraction * _lora_params(sites))
        # a loop over single ranks k, each site at min(k, its rank), dense SVD errors
        loop = [
            (sum(t[min(k, len(t) - 1)] for _, t in sites), k)
            for k in range(1, 5)
            if sum(min(k, len(t) - 1) * w for w, t in sites) <= budget
        ]
        if not loop:
            with pytest.raises(ValueError, match="does not pay for rank 1 at every site"):
                converters.plan_truncation(kinds, budget=fraction, serving=ServingRule(uniform=True))
            continue
        plan = converters.plan_truncation(kinds, budget=fraction, serving=ServingRule(uniform=True))
        ranks = {k for p in plan.kinds.values() for k in p.ranks}
        assert plan.error == pytest.approx(min(loop)[0], rel=1e-9)
        assert len(ranks) == 1
        assert plan.unconstrained.error <= plan.error + 1e-12


def test_uniform_rank_refuses_a_budget_below_rank_one_everywhere():
    with pytest.raises(ValueError, match="does not pay for rank 1 at every site"):
        converters.plan_truncation(_sites(0), budget=0.05, serving=ServingRule(uniform=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("buckets", [(1, 3), (2,), (2, 4), (1, 2, 4)])
def test_bucket_plan_is_the_brute_force_optimum_over_the_buckets(seed, buckets):
    kinds = _sites(seed)
    sites = _dense_tails(kinds)
    for fraction in FRACTIONS:
        budget = math.floor(fraction * _lora_params(sites))
        # a site whose rank is below a bucket is written whole: its allowed ranks are min(b, its rank)
        allowed = [{min(b, len(t) - 1) for b in buckets} for _, t in sites]
        floors = sum(min(a) * w for a, (w, _) in zip(allowed, sites))
        plan = converters.plan_truncation(kinds, budget=fraction, serving=ServingRule(buckets=buckets))
        expected = _brute_force(sites, budget, lambda i, k: k in allowed[i] or (k == 0 and floors > budget))
        assert plan.error == pytest.approx(expected, rel=1e-9, abs=1e-12)
        site_ranks = [k for p in plan.kinds.values() for k in p.ranks]
        assert all(k in allowed[i] or k == 0 for i, k in enumerate(site_ranks))
        if floors <= budget:  # rank 1 is then affordable everywhere too: the unconstrained plan is never worse
            assert 0 not in site_ranks
            assert plan.unconstrained.error <= plan.error + 1e-12


def test_choose_per_item_matches_enumeration():
    gen = torch.Generator().manual_seed(5)
    for _ in range(30):
        items = [
            [
                (int(c), float(e))
                for c, e in zip(torch.randint(0, 9, (3,), generator=gen), torch.rand(3, generator=gen, dtype=F64))
            ]
            for _ in range(4)
        ]
        for budget in (0, 5, 12, 40):
            picked = choose_per_item(items, budget)
            feasible = [
                sum(o[1] for o in combo) for combo in itertools.product(*items) if sum(o[0] for o in combo) <= budget
            ]
            if not feasible:
                assert picked is None
                continue
            assert sum(c for c, _ in (it[j] for it, j in zip(items, picked))) <= budget
            assert sum(e for _, e in (it[j] for it, j in zip(items, picked))) == pytest.approx(min(feasible), rel=1e-12)


# ---------------------------------------------------------------- shared forms: the rank per kind


def _shared_kinds(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return {"q": random_kind(gen, 3, 6, 5, 2, dtype=F64), "v": random_kind(gen, 2, 4, 7, 3, dtype=F64)}


@pytest.mark.parametrize("rule", [ServingRule(max_rank=2), ServingRule(uniform=True), ServingRule(buckets=(1, 3))])
@pytest.mark.parametrize("seed", [0, 1])
def test_sharea_rank_per_kind_is_the_brute_force_optimum(rule, seed):
    kinds = _shared_kinds(seed)
    lora = sum(len(As) * As[0].shape[0] * (As[0].shape[1] + Bts[0].shape[0]) for As, Bts in kinds.values())
    names = list(kinds)

    def params(name, k):  # ShareA by hand: one A (k x n_in) per kind, one B (n_out x k) per layer
        As, Bts = kinds[name]
        return k * As[0].shape[1] + len(As) * k * Bts[0].shape[0]

    ranks = range(1, 6)
    for fraction in (0.3, 0.5, 0.8, 1.2):
        budget = math.floor(fraction * lora)
        feasible = [
            (sum(eckart_young_sharea(*kinds[n], k) for n, k in zip(names, combo)), combo)
            for combo in itertools.product(ranks, repeat=len(names))
            if sum(params(n, k) for n, k in zip(names, combo)) <= budget
            and all(rule.allows(k) for k in combo)
            and (not rule.uniform or len(set(combo)) == 1)
        ]
        free = min(
            sum(eckart_young_sharea(*kinds[n], k) for n, k in zip(names, combo))
            for combo in itertools.product(ranks, repeat=len(names))
            if sum(params(n, k) for n, k in zip(names, combo)) <= budget
        )
        if not feasible:
            with pytest.raises(ValueError):
                converters.budget.plan_serving("sharea", kinds, budget=fraction, serving=rule)
            continue
        plans, unconstrained = converters.budget.plan_serving("sharea", kinds, budget=fraction, serving=rule)
        got = sum(p.estimated_error for p in plans.values())
        assert got == pytest.approx(min(feasible)[0], rel=1e-9, abs=1e-12)
        assert sum(p.estimated_error for p in unconstrained.values()) == pytest.approx(free, rel=1e-9, abs=1e-12)
        assert sum(p.estimated_error for p in unconstrained.values()) <= got + 1e-12
        assert all(rule.allows(p.rank) for p in plans.values())


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serving") / "lora"
    make_peft_adapter(tiny_llama(layers=3), folder, r=4, target_modules=["q_proj", "v_proj"])
    return folder


def _widths(folder) -> int:
    """sum over sites of n_in + n_out, read from the adapter's tensors."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return sum(
        t.shape[1] + tensors[name.replace("lora_A", "lora_B")].shape[0]
        for name, t in tensors.items()
        if "lora_A" in name
    )


@pytest.mark.parametrize("form", ["lora", "sharea", "aslora"])
def test_max_rank_report_gives_the_padded_count_and_the_unconstrained_error(form, lora, tmp_path, cli):
    r = cli("convert", lora, "--to", form, "--budget", "0.5", "--max-rank", "2", "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    data = json.JSONDecoder().raw_decode(r.output)[0]  # warnings follow on stderr
    s = data["serving"]
    assert s["pads_to"] == 2 and s["max_rank"] <= 2
    assert s["padded_parameters"] == 2 * _widths(lora)  # every site padded to R, by hand
    assert s["unconstrained_padded_parameters"] == s["unconstrained_max_rank"] * _widths(lora)
    assert s["error_difference"] == pytest.approx(s["error"] - s["unconstrained_error"])
    assert s["error"] >= s["unconstrained_error"] - 1e-12
    assert s["relative_error"] == pytest.approx(math.sqrt(s["error"] / s["energy"]))
    assert all(k["rank"] <= 2 for k in data["kinds"])
    if form != "aslora":  # an exact projection: the planned error is the written one
        assert s["error"] == pytest.approx(sum(k["error"] for k in data["kinds"]), rel=1e-6)
    assert data["settings"]["max_rank"] == 2


def test_uniform_and_bucket_plans_write_those_ranks(lora, tmp_path, cli):
    r = cli("convert", lora, "--to", "lora", "--budget", "0.6", "--uniform-rank", "-o", tmp_path / "u", "--json")
    data = json.JSONDecoder().raw_decode(r.output)[0]  # warnings follow on stderr
    ranks = {k for kind in data["kinds"] for k in kind["site_ranks"].values()}
    assert len(ranks) == 1 and data["serving"]["pads_to"] == ranks.pop()
    config = json.loads((tmp_path / "u" / "adapter_config.json").read_text())
    assert not config.get("rank_pattern")  # one rank: no per-module pattern for a server to trip over
    r = cli("convert", lora, "--to", "lora", "--budget", "0.6", "--rank-buckets", "1,3", "-o", tmp_path / "b")
    assert r.exit_code == 0 and "rank buckets 1,3" in r.output and "unconstrained plan" in r.output, r.output


def test_same_input_gives_the_same_bytes(lora, tmp_path, cli):
    for out in ("a", "b"):
        assert (
            cli(
                "convert", lora, "--to", "lora", "--budget", "0.4", "--rank-buckets", "1,2", "-o", tmp_path / out
            ).exit_code
            == 0
        )
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--to", "lora", "--budget", "0.5", "--max-rank", "0"], "--max-rank must be at least 1, got 0"),
        (["--to", "lora", "--budget", "0.5", "--max-rank", "-3"], "--max-rank must be at least 1"),
        (["--to", "lora", "--budget", "0.5", "--rank-buckets", "4,x"], "--rank-buckets must be positive integers"),
        (["--to", "lora", "--budget", "0.5", "--rank-buckets", "0,8"], "--rank-buckets must be positive integers"),
        (["--to", "lora", "--budget", "0.5", "--rank-buckets", "2.5"], "--rank-buckets must be positive integers"),
        (["--to", "lora", "--budget", "0.5", "--rank-buckets", ""], "--rank-buckets must be positive integers"),
        (["--to", "lora", "--uniform-rank", "--rank", "2"], "--uniform-rank cannot be given with --rank"),
        (["--to", "sharea", "--max-rank", "2", "--rank", "2"], "--max-rank cannot be given with --rank"),
        (["--to", "lora", "--budget", "0.5", "--uniform-rank", "--rank-buckets", "2,4"], "conflict"),
        (["--to", "lora", "--budget", "0.5", "--uniform-rank", "--max-rank", "2"], "conflict"),
        (["--to", "lora", "--energy", "0.9", "--max-rank", "2"], "not an --energy one"),
        (["--to", "lora", "--uniform-rank"], "--uniform-rank needs --budget"),
        (["--to", "sharea", "--rank-buckets", "2"], "--rank-buckets needs --budget"),
        (["--to", "lora", "--budget", "0.01", "--uniform-rank"], "does not pay for rank 1 at every site"),
        (["--to", "sharea", "--budget", "0.5", "--rank-buckets", "50"], "allows none of the ranks"),
    ],
)
def test_bad_serving_options_write_nothing(args, words, lora, tmp_path, cli):
    r = cli("convert", lora, *args, "-o", tmp_path / "out")
    assert r.exit_code != 0 and words in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("form, ok", [("lora", True), ("shareb", True), ("sharea", False)])
def test_calibrated_serving_plans_compare_calibrated_objectives(form, ok, tmp_path, cli):
    """With --calibration the rule plans on the calibrated spectra (lora, shareb, shareab); sharea is refused."""
    from tests.training_helpers import recovery_setup

    paths = recovery_setup(tmp_path / "in", layers=2, rank=4, lines=24)
    r = cli(
        "convert",
        paths["lora"],
        "--to",
        form,
        "--budget",
        "0.5",
        "--max-rank",
        "1",
        "--calibration",
        paths["text"],
        "--base",
        paths["base"],
        "--calibration-samples",
        8,
        "-o",
        tmp_path / "out",
        "--json",
    )
    if not ok:
        assert r.exit_code != 0 and "applies to --to" in r.output and not (tmp_path / "out").exists()
        return
    assert r.exit_code == 0, r.output
    data = json.JSONDecoder().raw_decode(r.output[r.output.index("{") :])[0]
    s = data["serving"]
    assert s["max_rank"] <= 1 and s["unconstrained_error"] <= s["error"] + 1e-9
    # the planned error is the calibrated objective the conversion reaches (exact calibrated spectra)
    assert s["error"] == pytest.approx(sum(k["calibration"]["objective"] for k in data["kinds"]), rel=1e-4)
