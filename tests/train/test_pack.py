"""``--pack``: several examples per row for causal LMs, with the same outputs, loss and update as one
example per row (the independent reference: each example run alone, and the unpacked recipe)."""

import types

import pytest
import torch

from shareport.errors import ShareportError
from shareport.files import load_adapter
from shareport.train import recipe as recipe_module
from shareport.train.data import TokenData, collate_packed
from shareport.train.jobs import recovery_job
from shareport.train.recipe import Recipe, run
from shareport.train.recipe_checks import check_recipe
from tests.tiny import tiny_llama
from tests.training_helpers import recovery_setup


def test_rows_hold_every_example_once_contiguously_from_position_zero():
    lengths = [5, 3, 2, 6, 1, 4]
    data = TokenData([[10 * k + j + 3 for j in range(n)] for k, n in enumerate(lengths)], None, "mem")
    order = [4, 0, 3, 1, 5, 2]
    batch = collate_packed(data, order, pad_id=0, width=4)  # narrower than the longest: that wins
    assert batch["input_ids"].shape[1] == max(lengths)
    assert batch["input_ids"].shape[0] < len(order)  # packed: fewer rows than examples
    assert int(batch["loss_mask"].sum()) == sum(lengths)
    for k, index in enumerate(order):
        where = (batch["segments"] == k).nonzero().tolist()
        rows = {r for r, _ in where}
        cols = [c for _, c in where]
        assert len(rows) == 1 and cols == list(range(cols[0], cols[0] + lengths[index]))  # one contiguous run
        row = rows.pop()
        assert batch["input_ids"][row, cols].tolist() == data.sequences[index]
        assert batch["position_ids"][row, cols].tolist() == list(range(lengths[index]))
    assert (batch["loss_mask"] == (batch["segments"] >= 0)).all()


def test_packed_logits_equal_each_example_run_alone():
    model = tiny_llama(layers=2).eval()
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 50, (n,), generator=gen).tolist() for n in (7, 3, 4, 9, 2)]
    batch = collate_packed(TokenData(seqs, None, "mem"), list(range(len(seqs))), pad_id=0)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for k, seq in enumerate(seqs):
            alone = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0]
            row, cols = (batch["segments"] == k).nonzero(as_tuple=True)
            torch.testing.assert_close(packed[row, cols], alone, rtol=1e-5, atol=1e-5)


def test_packed_training_equals_unpacked(tmp_path, monkeypatch):
    """Distillation plus the next-token loss (which must not cross from one example into the next)."""
    paths = recovery_setup(tmp_path, layers=2, rank=4, shared_rank=1, lines=40)
    shapes = []

    def spy(data, indices, pad, width):
        batch = collate_packed(data, indices, pad, width)
        shapes.append((len(indices), batch["input_ids"].shape[0]))
        return batch

    monkeypatch.setattr(recipe_module, "collate_packed", spy)

    def trained(pack):
        job = recovery_job(paths["shared"], paths["base"], paths["lora"], data_path=paths["text"], max_length=64)
        return run(job, Recipe(steps=3, lr=3e-3, batch_size=8, task_weight=0.5, pack=pack))

    plain, plain_report = trained(False)
    packed, packed_report = trained(True)
    assert len(shapes) == 3 and all(rows < examples for examples, rows in shapes), shapes  # it did pack
    start = load_adapter(paths["shared"])
    assert any(not torch.allclose(plain.tensors[n], start.tensors[n]) for n in plain.used_tensor_names())  # it trained
    for name in plain.used_tensor_names():
        torch.testing.assert_close(packed.tensors[name], plain.tensors[name], rtol=1e-4, atol=1e-6)
    assert packed_report["final_train_loss"] == pytest.approx(plain_report["final_train_loss"], rel=1e-5)
    assert packed_report["timings"]["tokens"] == plain_report["timings"]["tokens"]  # the same positions count


def test_pack_is_refused_for_a_model_without_per_position_outputs():
    job = types.SimpleNamespace(model=torch.nn.Linear(2, 2), teacher=object(), train_data=None)
    with pytest.raises(ShareportError, match="--pack needs a causal LM"):
        check_recipe(Recipe(pack=True), job, causal=False)


def test_pack_with_a_classifier_base_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    """The base folder says which class it loads as: --pack on a classifier is refused from its config,
    before the (slow) model load, with nothing written."""
    import json

    from shareport import flows
    from shareport.train import jobs
    from shareport.train.jobs import TrainingOptions

    paths = recovery_setup(tmp_path, layers=1, rank=2, shared_rank=1, lines=8)
    config_path = paths["base"] / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    config_path.write_text(json.dumps(config))

    def no_load(*args, **kwargs):
        raise AssertionError("the base model was loaded before --pack was checked")

    monkeypatch.setattr(jobs, "load_base_model", no_load)
    with pytest.raises(
        ShareportError, match="--pack needs a causal LM: .* loads as AutoModelForSequenceClassification"
    ):
        flows.train(
            "lora",
            str(paths["base"]),
            ["q_proj"],
            2,
            str(paths["text"]),
            str(tmp_path / "out"),
            options=TrainingOptions(steps=1, pack=True),
        )
    assert not (tmp_path / "out").exists()
    # the same base without --pack, and a causal base with it, get past the check (to the model load)
    with pytest.raises(AssertionError, match="loaded before"):
        flows.train(
            "lora",
            str(paths["base"]),
            ["q_proj"],
            2,
            str(paths["text"]),
            str(tmp_path / "out"),
            options=TrainingOptions(steps=1),
        )
    config["architectures"] = ["LlamaForCausalLM"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(AssertionError, match="loaded before"):
        flows.train(
            "lora",
            str(paths["base"]),
            ["q_proj"],
            2,
            str(paths["text"]),
            str(tmp_path / "out"),
            options=TrainingOptions(steps=1, pack=True),
        )
