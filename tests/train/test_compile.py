"""``--compile``: the transformer blocks run through torch.compile for the training steps only, and
training gives the eager result. "aot_eager" captures the same graphs (forward and backward, the
student's and the teacher's) as inductor, without generating code, so the test stays fast."""

import pytest
import torch

from shareport.train.compiled import compiled_blocks, transformer_blocks
from shareport.train.jobs import recovery_job
from shareport.train.recipe import Recipe, run
from tests.training_helpers import recovery_setup


def test_blocks_are_the_decoder_layers_and_return_to_eager(tmp_path):
    from tests.tiny import tiny_llama

    model = tiny_llama(layers=3)
    blocks = transformer_blocks(model)
    assert blocks == list(model.model.layers)  # an independent reference: the model's own layer list
    with compiled_blocks(model, "aot_eager") as n:
        assert n == 3 and all(b._compiled_call_impl is not None for b in blocks)
    assert all(b._compiled_call_impl is None for b in blocks)
    with compiled_blocks(model, None) as n:
        assert n == 0 and all(b._compiled_call_impl is None for b in blocks)


def test_compiled_training_matches_eager(tmp_path):
    from torch._dynamo.utils import counters

    paths = recovery_setup(tmp_path, layers=3, rank=4, shared_rank=1, lines=40)

    def trained(backend):
        job = recovery_job(paths["shared"], paths["base"], paths["lora"], data_path=paths["text"], max_length=24)
        calls = []
        adapter, report = run(
            job,
            # lr_scaling none: the premise needs the adapter to move in 4 steps at this lr (the rule: test_finetune)
            Recipe(steps=4, lr=3e-3, batch_size=4, compile=backend, lr_scaling="none"),
            after_step=lambda t: calls.append(
                [b._compiled_call_impl is not None for b in transformer_blocks(job.model)]
            ),
        )
        return adapter, report, calls

    eager, eager_report, _ = trained(None)
    torch._dynamo.reset()
    counters.clear()
    compiled, compiled_report, flags = trained("aot_eager")
    assert flags == [[True] * 3] * 4  # compiled during every step
    # graphs per role, shared by the layers: the student's first block (its input needs no gradient),
    # its later blocks, the teacher's (no grad), each with and without a padding mask; not one per
    # layer (as the key/value cache caused, which ran into dynamo's recompile limit of 8 on 22 layers)
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])
    assert compiled_report["recipe"]["compile"] == "aot_eager"
    assert eager_report["after"]["kl"] < eager_report["before"]["kl"]  # training moved the adapter
    for name in eager.used_tensor_names():
        torch.testing.assert_close(compiled.tensors[name], eager.tensors[name], rtol=1e-5, atol=1e-6)
    assert compiled_report["after"]["kl"] == pytest.approx(eager_report["after"]["kl"], rel=1e-5)


def test_a_backend_that_fails_leaves_the_blocks_eager(tmp_path):
    """A compiler failure (here a backend that raises) costs speed, not the run: the blocks run eagerly."""
    from tests.tiny import tiny_llama

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    model = tiny_llama(layers=2)
    ids = torch.randint(3, 50, (2, 6))
    want = model(input_ids=ids, use_cache=False).logits
    with compiled_blocks(model, broken):
        got = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want)
    assert torch._dynamo.config.suppress_errors is False  # restored
