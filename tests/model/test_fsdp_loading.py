"""Loading the base sharded (FSDP): each process reads and holds only its shard of every weight.

Two CPU processes (gloo, torchrun) load bases built on the meta device, shard by shard from the
safetensors file (tests/fsdp_load_worker.py). Checked against independent references: every gathered
weight equals the file's; each process holds exactly the rows torch.chunk gives it, computed here
from the file's shapes; the logits equal a one-process transformers model's; and the peak resident
memory a process adds while loading a 60 MB base is its half plus one shard in transit, against the
whole base for transformers' own load (measured in a third process). Marked `distributed`."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from shareport.errors import ShareportError
from shareport.files.tensorfile import StreamedTensors, stream_model_weights
from shareport.model.base import checkpoint_name, load_base_model
from tests.tiny import tiny_bert, tiny_llama
from tests.train.test_finetune_distributed import REPO, _free_port

MiB = 2**20


def _llama(folder, **sizes):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=64, **sizes)
    LlamaForCausalLM(config).eval().save_pretrained(str(folder))
    return folder


def _shard_bytes(base, rank: int, world: int) -> int:
    """What torch.chunk on dim 0 gives process ``rank`` of the file's tensors, in bytes."""
    total = 0
    for tensor in load_file(str(base / "model.safetensors")).values():
        rows = tensor.shape[0]
        chunk = math.ceil(rows / world)
        held = max(0, min(rows, (rank + 1) * chunk) - rank * chunk)
        total += held * (tensor.numel() // rows) * tensor.element_size()
    return total


@pytest.mark.distributed
def test_each_process_loads_and_holds_only_its_shard(tmp_path):
    big = _llama(
        tmp_path / "big",
        vocab_size=8192,
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=6,
    )  # 15.7M parameters, 60 MiB in fp32
    tied = _llama(
        tmp_path / "tied",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    tiny = tmp_path / "tiny"
    tiny_llama(layers=2).save_pretrained(str(tiny))
    bert = tmp_path / "bert"  # a bare encoder checkpoint, its 3-label head carried by the adapter
    tiny_bert(layers=2).save_pretrained(str(bert))
    torch.manual_seed(5)
    save_file(
        {"classifier.weight": torch.randn(3, 32), "classifier.bias": torch.randn(3)}, str(bert / "carried.safetensors")
    )

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    worker = str(REPO / "tests" / "fsdp_load_worker.py")
    (tmp_path / "whole").mkdir()
    alone = subprocess.Popen(
        [sys.executable, worker, "whole", str(tmp_path / "whole"), str(big), str(tiny)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            worker,
            "sharded",
            str(tmp_path),
            str(big),
            str(tiny),
            str(tied),
            str(bert),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert alone.wait(timeout=200) == 0, alone.stderr.read()[-3000:]

    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    whole_load = json.loads((tmp_path / "whole" / "rank0.json").read_text())
    base_bytes = (big / "model.safetensors").stat().st_size
    largest = max(t.numel() * t.element_size() for t in load_file(str(big / "model.safetensors")).values())
    for rank, record in enumerate(records):
        assert record["held"] == _shard_bytes(big, rank, 2)
        assert record["whole"] == whole_load["whole"] == sum(r["held"] for r in records)
        # its half, plus one parameter's shard in transit (mapped from the file and copied), plus slack
        assert record["peak"] <= record["held"] + largest / 2 + 4 * MiB, record["peak"] / MiB
        assert record["peak"] < 0.65 * base_bytes
    assert whole_load["peak"] > 0.95 * base_bytes  # the measure sees a whole base being loaded

    for base in (big, tiny, tied, bert):
        carried = load_file(str(base / "carried.safetensors")) if base == bert else {}
        model = load_base_model(base, "SEQ_CLS" if carried else None, carried=carried)
        with torch.no_grad():
            for name, value in carried.items():
                model.get_parameter(name).copy_(value)
            want = model(input_ids=torch.arange(1, 13).reshape(2, 6) % model.config.vocab_size).logits
        for record in records:
            torch.testing.assert_close(torch.tensor(record["logits"][str(base)]), want, atol=1e-5, rtol=0)


def test_rows_map_only_a_tensors_rows(tmp_path):
    tensors = {"w": torch.randn(7, 5), "h": torch.randn(9, 3).half(), "s": torch.tensor(2.0), "e": torch.empty(0, 4)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    streamed = StreamedTensors(tmp_path / "t.safetensors")
    for start, stop in ((0, 4), (4, 7), (7, 7), (2, 3)):
        assert torch.equal(streamed.rows("w", start, stop), tensors["w"][start:stop])
    assert torch.equal(streamed.rows("h", 5, 9), tensors["h"][5:9])
    assert torch.equal(streamed.rows("s", 0, 1), tensors["s"]) and streamed.rows("e", 0, 0).shape == (0, 4)
    with pytest.raises(ShareportError, match=r"t.safetensors: tensor 'w' has 7 rows, not 4:8"):
        streamed.rows("w", 4, 8)


def test_model_weights_are_read_from_one_file_or_the_shards_an_index_lists(tmp_path):
    model = tiny_llama(layers=2)
    model.save_pretrained(str(tmp_path / "one"))
    model.save_pretrained(str(tmp_path / "shards"), max_shard_size="20KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").exists()
    expected = load_file(str(tmp_path / "one" / "model.safetensors"))
    for folder in ("one", "shards"):
        weights = stream_model_weights(tmp_path / folder)
        assert sorted(weights) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(weights[name], tensor) and torch.equal(weights.rows(name, 1, 3), tensor[1:3])
    with pytest.raises(ShareportError, match="no model.safetensors or model.safetensors.index.json"):
        stream_model_weights(tmp_path)


def test_checkpoint_names_follow_the_base_models_prefix():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(
        BertConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    )
    bare = {"embeddings.word_embeddings.weight"}
    assert checkpoint_name(model, "bert.embeddings.word_embeddings.weight", bare) == "embeddings.word_embeddings.weight"
    assert (
        checkpoint_name(model, "bert.pooler.dense.weight", {"bert.pooler.dense.weight"}) == "bert.pooler.dense.weight"
    )
    assert checkpoint_name(model, "classifier.weight", bare) is None
