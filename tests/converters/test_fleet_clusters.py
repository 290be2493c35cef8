"""fleet --clusters: members in clusters with a basis each, against dense references. Two groups of PEFT
LoRAs whose updates live in disjoint spaces (each group's A's read, and B's write, one half of the
coordinates): auto finds the groups and beats one basis at the same budget; every member's reported
error is the dense error of its update; members load, expand and attach like any adapter; fleet-add
joins the right cluster."""

import hashlib
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from converters.fleet_clusters import MIN_MEMBERS, assign_clusters, balanced
from shareport.adapter import Adapter
from shareport.convert_options import Calibration
from shareport.errors import ShareportError
from shareport.files.adapters import load_adapter
from shareport.files.fleet import fleet_members
from shareport.fleet import build_fleet, fleet_bases
from tests.tiny import make_peft_adapter, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
GROUPS = {"a1": 0, "b1": 1, "a2": 0, "b2": 1}  # interleaved: the input order does not give the groups away
F64 = torch.float64


def _confine(folder, group):
    """The LoRA's A's read only its group's half of the inputs and B's write only its half of the outputs."""
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    for name, t in tensors.items():
        axis = 1 if "lora_A" in name else 0  # A (r, n_in), B (n_out, r)
        half = t.shape[axis] // 2
        keep = torch.zeros(t.shape[axis], dtype=t.dtype)
        keep[half * group : half * (group + 1)] = 1
        tensors[name] = t * (keep[None, :] if axis else keep[:, None])
    save_file(tensors, weights)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("grouped")
    for seed, (name, group) in enumerate({**GROUPS, "a3": 0, "b3": 1}.items()):
        make_peft_adapter(tiny_llama(), root / name, seed=seed + 1, r=3, lora_alpha=6, target_modules=TARGETS)
        _confine(root / name, group)
    return root


def adapters(loras, names=tuple(GROUPS)):
    return [load_adapter(loras / n) for n in names]


def dense_errors(originals, members):
    """Per member sum_l ||dW - dW'||^2 and sum_l ||dW||^2 from the dense updates."""
    out = []
    for original, member in zip(originals, members):
        dws = [(original.update(p, F64), member.update(p, F64)) for p in original.sites]
        out.append((sum(float((d - m).square().sum()) for d, m in dws), sum(float(d.square().sum()) for d, _ in dws)))
    return out


def stack_tail(adapters_, kind, k):
    """Dense Eckart-Young: the error of the best shared right basis of rank k over these members' sites."""
    dws = [a.update(s.path, F64) for a in adapters_ for s in a.kinds()[kind]]
    return float(torch.linalg.svdvals(torch.cat(dws))[k:].square().sum())


@pytest.mark.parametrize("form", ["sharea", "shareab"])
def test_auto_finds_the_groups_and_beats_one_basis_at_the_same_budget(loras, form):
    originals = adapters(loras)
    total = sum(a.num_parameters() for a in originals)
    one = build_fleet(originals, list(GROUPS), form, budget=0.25, clusters=1)
    auto = build_fleet(originals, list(GROUPS), form, budget=0.25, clusters="auto")
    assert auto.report.clusters["count"] == 2
    members = auto.report.clusters["members"]
    assert members["a1"] == members["a2"] != members["b1"] == members["b2"]
    for fleet in (one, auto):
        assert fleet.report.parameters <= 0.25 * total
    dense_one, dense_auto = dense_errors(originals, one.members), dense_errors(originals, auto.members)
    assert sum(e for e, _ in dense_auto) < sum(e for e, _ in dense_one)
    # each member's reported error is its dense error, in the fleet of one basis and in the clustered one
    for fleet, dense in ((one, dense_one), (auto, dense_auto)):
        for rep, (error, energy) in zip(fleet.report.members, dense):
            assert rep.relative_error == pytest.approx((error / energy) ** 0.5, rel=1e-4, abs=1e-6)
    candidates = {c["clusters"]: c for c in auto.report.clusters["candidates"]}
    assert set(candidates) == {1, 2} and candidates[2]["winner"]
    assert candidates[1]["relative_error"] == pytest.approx(
        (sum(e for e, _ in dense_one) / sum(w for _, w in dense_one)) ** 0.5, rel=1e-4
    )


def test_each_clusters_basis_is_the_dense_optimum_of_its_members(loras):
    """sharea at a rank: cluster c's kind error is the singular value tail of its members' stacked updates."""
    originals = adapters(loras)
    fleet = build_fleet(originals, list(GROUPS), "sharea", rank=2, clusters=2)
    clusters = fleet.report.clusters["members"]
    dense = dense_errors(originals, fleet.members)
    for cluster in (1, 2):
        inside = [i for i, name in enumerate(GROUPS) if clusters[name] == cluster]
        for kind in originals[0].kinds():
            expected = stack_tail([originals[i] for i in inside], kind, 2)
            got = sum(
                fleet.report.members[i].kind_errors[kind] ** 2
                * sum(float(originals[i].update(s.path, F64).square().sum()) for s in originals[i].kinds()[kind])
                for i in inside
            )
            assert got == pytest.approx(expected, rel=1e-4)
            assert fleet.report.kinds[f"cluster{cluster}.{kind}"]["ranks"] == [0, 2]
        assert sum(dense[i][0] for i in inside) == pytest.approx(
            sum(stack_tail([originals[i] for i in inside], k, 2) for k in originals[0].kinds()), rel=1e-4
        )


def synthetic_calibration(originals, names, seed=0, tokens=30):
    """Per member and site a dense input moment C (inputs that differ per member), and for each member
    list the Calibration in that list's fleet bases (what the CLI collects): {name: {path: C}}, maker."""
    gen = torch.Generator().manual_seed(seed)
    moments = {}
    for i, (name, adapter) in enumerate(zip(names, originals)):
        moments[name] = {}
        for site in adapter.sites.values():
            n_in = adapter.tensors[site.a].shape[1]
            x = torch.randn(tokens, n_in, generator=gen, dtype=F64) * (1.0 + 0.5 * torch.rand(n_in, generator=gen))
            moments[name][site.path] = x.T @ x / tokens

    def calibrations(members):
        chosen = [originals[names.index(n)] for n in members]
        bases = fleet_bases(chosen)
        return [
            Calibration({s.path: bases[s.kind].T @ moments[n][s.path] @ bases[s.kind] for s in a.sites.values()})
            for n, a in zip(members, chosen)
        ]

    return calibrations


@pytest.mark.parametrize("form", ["sharea", "shareab"])
def test_calibrated_clusters_fit_each_cluster_as_its_own_calibrated_fleet(loras, form):
    """Statistics taken once in the whole fleet's bases and re-expressed per cluster give each cluster
    the calibrated fleet of its members alone, with statistics taken in that cluster's own bases; and
    auto still finds the groups, by the output error."""
    names = list(GROUPS)
    originals = adapters(loras)
    calibrations = synthetic_calibration(originals, names)
    clustered = build_fleet(originals, names, form, rank=2, calibration=calibrations(names), clusters=2)
    members = clustered.report.clusters["members"]
    assert members["a1"] == members["a2"] != members["b1"] == members["b2"]
    for cluster in (1, 2):
        inside = [n for n in names if members[n] == cluster]
        alone = build_fleet(
            [originals[names.index(n)] for n in inside], inside, form, rank=2, calibration=calibrations(inside)
        )
        for j, name in enumerate(inside):
            i = names.index(name)
            assert clustered.report.members[i].relative_error == pytest.approx(
                alone.report.members[j].relative_error, rel=1e-6
            )
            for path in originals[i].sites:
                torch.testing.assert_close(
                    clustered.members[i].update(path, F64), alone.members[j].update(path, F64), rtol=1e-6, atol=1e-9
                )
    auto = build_fleet(originals, names, form, budget=0.25, calibration=calibrations(names), clusters="auto")
    candidates = {c["clusters"]: c for c in auto.report.clusters["candidates"]}
    assert auto.report.clusters["count"] == 2 and candidates[2]["winner"]
    assert candidates[2]["relative_error"] < candidates[1]["relative_error"]
    # the errors auto compares are the output errors: the members report the same measure
    assert all(m.frobenius_relative_error is not None for m in auto.report.members)


def test_the_assignment_keeps_every_cluster_at_least_two_members():
    cost = [[0.0, 5.0], [0.0, 4.0], [0.0, 9.0], [0.0, 1.0]]  # everyone prefers cluster 0
    labels = balanced(cost, [0, 0, 0, 0])
    assert labels.count(1) == MIN_MEMBERS and labels[3] == 1 and labels[1] == 1  # the cheapest moves
    with pytest.raises(ValueError, match="at least 6 members"):
        assign_clusters("sharea", {"k": ([[torch.ones(1, 2)]] * 5, [[torch.ones(2, 1)]] * 5)}, 3, rank=1)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("form", ["sharea", "shareab"])
def test_clustered_members_are_ordinary_adapters(loras, form, tmp_path, cli):
    out = tmp_path / "fleet"
    r = cli("fleet", *(loras / n for n in GROUPS), "-o", out, "--form", form, "--budget", 0.25, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["clusters"]["count"] == 2
    in_memory = build_fleet(adapters(loras), list(GROUPS), form, budget=0.25)
    for name, expected in zip(GROUPS, in_memory.members):
        member = load_adapter(out / name)
        cluster = data["clusters"]["members"][name]
        assert member.config["fleet"]["cluster"] == cluster
        assert member.max_update_diff(expected) == 0.0
        assert all(n.startswith(f"cluster{cluster}.") for n in member.config["fleet"]["names"])
        # its fleet, as export swaps it, is its cluster
        assert sorted(fleet_members(member)) == sorted(
            n for n, c in data["clusters"]["members"].items() if c == cluster
        )
        r = cli("convert", out / name, "--to", "lora", "-o", tmp_path / f"{name}-lora")
        assert r.exit_code == 0, r.output
        merged = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / f"{name}-lora")).merge_and_unload()
        base = tiny_llama().state_dict()
        for path in member.sites:
            delta = merged.state_dict()[f"{path}.weight"] - base[f"{path}.weight"]
            torch.testing.assert_close(delta, member.update(path), atol=1e-5, rtol=1e-4)
        assert cli("inspect", out / name).exit_code == 0
    r = cli("fleet", *(loras / n for n in GROUPS), "-o", tmp_path / "text", "--form", form, "--budget", 0.25)
    rows = {line.split()[0]: line.split() for line in r.output.splitlines() if line.strip()}
    assert "clusters: 2" in r.output and rows["member"][:2] == ["member", "cluster"]
    assert all(rows[name][1] == str(data["clusters"]["members"][name]) for name in GROUPS)


def test_same_input_same_bytes_and_one_cluster_is_the_fleet_it_was(loras, tmp_path, cli):
    for out in ("one", "two"):
        assert cli("fleet", *(loras / n for n in GROUPS), "-o", tmp_path / out).exit_code == 0
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert all(sha(tmp_path / "one" / f) == sha(tmp_path / "two" / f) for f in files)
    # three members make one cluster at most: the default fleet is --clusters 1's, byte for byte
    three = [loras / n for n in ("a1", "b1", "a2")]
    assert cli("fleet", *three, "-o", tmp_path / "default").exit_code == 0
    assert cli("fleet", *three, "-o", tmp_path / "single", "--clusters", 1).exit_code == 0
    files = sorted(p.relative_to(tmp_path / "single") for p in (tmp_path / "single").rglob("*") if p.is_file())
    assert all(sha(tmp_path / "default" / f) == sha(tmp_path / "single" / f) for f in files)
    report = json.loads((tmp_path / "single" / "fleet_report.json").read_text())
    assert "clusters" not in report
    assert (
        "cluster"
        not in json.loads((tmp_path / "single" / "a1" / "adapter_config.json").read_text())["shareport"]["fleet"]
    )


def test_bad_cluster_requests_are_refused_in_one_line(loras, tmp_path, cli):
    four = [loras / n for n in GROUPS]
    out = tmp_path / "out"
    for args, words in [
        (("--clusters", 0), "--clusters must be a positive"),
        (("--clusters", 3), "at most 2 clusters of at least 2 members"),
    ]:
        r = cli("fleet", *four, "-o", out, *args)
        assert r.exit_code == 1, r.output
        assert "\n" not in r.output.strip() and words in r.output, r.output
        assert not out.exists()
    r = cli("fleet", *four, "-o", out, "--clusters", "two")
    assert r.exit_code == 2 and "whole number or 'auto'" in r.output and not out.exists()
    with pytest.raises(ShareportError, match="--clusters 3"):
        build_fleet(adapters(loras), list(GROUPS), "sharea", budget=0.25, clusters=3)


def test_fleet_add_joins_the_cluster_where_its_error_is_least(loras, tmp_path, cli):
    fleet = tmp_path / "fleet"
    assert cli("fleet", *(loras / n for n in GROUPS), "-o", fleet, "--form", "shareab", "--budget", 0.25).exit_code == 0
    before = {n: load_adapter(fleet / n) for n in GROUPS}
    clusters = json.loads((fleet / "fleet_report.json").read_text())["clusters"]["members"]
    r = cli("fleet-add", fleet, loras / "b3", "--max-error", 0.2, "-o", tmp_path / "grown", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["added"]["cluster"] == clusters["b1"]
    assert data["clusters"]["members"]["b3"] == clusters["b1"]
    assert all(k.startswith(f"cluster{clusters['b1']}.") for k in data["added"]["grown"])
    assert data["added"]["relative_error"] <= 0.2
    grown = {n: load_adapter(tmp_path / "grown" / n) for n in [*GROUPS, "b3"]}
    for name, member in before.items():  # every other member's update, bit for bit
        for path in member.sites:
            assert torch.equal(member.update(path), grown[name].update(path))
    new = grown["b3"]
    ((error, energy),) = dense_errors([load_adapter(loras / "b3")], [new])
    assert data["added"]["relative_error"] == pytest.approx((error / energy) ** 0.5, rel=1e-4)
    assert sorted(fleet_members(new)) == sorted(["b1", "b2", "b3"])


def test_auto_searches_few_counts_and_finds_the_true_clusters_at_large_n():
    """48 members drawn from 3 disjoint subspaces (each group's A's read one rank-2 space of its own block of
    inputs, its B's write one of its own block of outputs), at a budget of every member's core at rank 2
    plus 3 bases, with less than a fourth basis to spare: 3 clusters, one per group, hold every update
    exactly, and no other count can (fewer: a basis must hold two groups' spaces; more: a basis more than
    the budget allows, so a rank less somewhere). auto finds the groups while building far fewer than the
    24 counts, and every count it built is worse than 3."""
    groups, per, rank, layers, block = 3, 16, 2, 2, 6
    width = groups * block
    gen = torch.Generator().manual_seed(0)

    def space(g):  # (rank, width): a random rank-2 space inside group g's block
        out = torch.zeros(rank, width, dtype=F64)
        out[:, g * block : (g + 1) * block] = torch.linalg.qr(torch.randn(block, rank, generator=gen, dtype=F64))[0].T
        return out

    spaces = [(space(g), space(g)) for g in range(groups)]
    truth = [i % groups for i in range(groups * per)]  # interleaved
    originals = [
        Adapter.from_factors(
            {
                f"model.layers.{layer}.proj": (
                    (torch.randn(rank, rank, generator=gen, dtype=F64) @ spaces[g][0]).float(),
                    (spaces[g][1].T @ torch.randn(rank, rank, generator=gen, dtype=F64)).float(),
                    1.0,
                )
                for layer in range(layers)
            }
        )
        for g in truth
    ]
    names = [f"m{i}" for i in range(len(originals))]
    lora_total = sum(a.num_parameters() for a in originals)
    cores = len(originals) * layers * width * rank  # sharea: every member's B (width, rank) per layer
    budget = (cores + groups * rank * width + rank * width // 2) / lora_total
    fleet = build_fleet(originals, names, "sharea", budget=budget, clusters="auto")
    record = fleet.report.clusters
    tried = {c["clusters"]: c for c in record["candidates"]}
    assert len(tried) <= 8 < len(originals) // MIN_MEMBERS / 2
    assert record["count"] == groups
    # the groups, whatever their numbers
    assert len({(record["members"][n], g) for n, g in zip(names, truth)}) == groups
    energy = sum(float(a.update(p, F64).square().sum()) for a in originals for p in a.sites)
    dense = dense_errors(originals, fleet.members)
    assert sum(e for e, _ in dense) <= 1e-9 * energy
    assert fleet.report.parameters <= budget * lora_total
    assert all(c["error"] > 1e-6 * energy for count, c in tried.items() if count != groups)


def test_bench_fleet_counts_every_clusters_shared_parameters(loras, tmp_path, cli):
    """bench_fleet's "params": the members' own factors plus every cluster's bases once, which is what the
    files hold (the reference: every tensor of shared.safetensors, read as stored)."""
    from tests.benchmarks.bench_fleet import _shared_parameters, _stored_parameters

    fleet = tmp_path / "fleet"
    r = cli("fleet", *(loras / n for n in GROUPS), "-o", fleet, "--form", "shareab", "--budget", 0.25, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["clusters"]["count"] == 2
    stored = load_file(fleet / "shared.safetensors")
    assert _shared_parameters({n: fleet / n for n in GROUPS}) == sum(t.numel() for t in stored.values())
    members = sum(_stored_parameters(fleet / n) for n in GROUPS)
    assert members + _shared_parameters({n: fleet / n for n in GROUPS}) == data["parameters"]
