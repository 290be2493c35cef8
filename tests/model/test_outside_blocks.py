"""Sites outside the numbered blocks (PEFT's 'dense' also matches BERT's pooler) are a kind of
their own with a clean name, and inspect says 'layers 0-2 + pooler.dense', not '-1-2'."""

import json

from shareport.files import load_adapter
from tests.tiny import make_peft_adapter, tiny_bert


def test_pooler_is_its_own_cleanly_named_kind(tmp_path, cli):
    make_peft_adapter(
        tiny_bert(layers=3, num_labels=3), tmp_path / "lora", r=2, target_modules=["dense"], task_type="SEQ_CLS"
    )
    adapter = load_adapter(tmp_path / "lora")
    pooler = adapter.sites["bert.pooler.dense"]
    assert pooler.kind == "pooler.dense" and adapter.outside_kinds() == ["pooler.dense"]
    assert adapter.layers() == [0, 1, 2]
    assert len(adapter.kinds()["pooler.dense"]) == 1
    r = cli("inspect", tmp_path / "lora")
    assert r.exit_code == 0, r.output
    assert "layers: 0-2 + pooler.dense" in r.output
    pooler_table = r.output.split("[pooler.dense]")[1]
    assert "-1" not in pooler_table
    info = json.loads(cli("inspect", tmp_path / "lora", "--json").output)
    assert info["layers"] == [0, 1, 2] and info["outside_blocks"] == ["pooler.dense"]
    assert "bert.pooler.dense" not in info["kinds"] and "pooler.dense" in info["kinds"]


def test_converting_keeps_the_pooler_update(tmp_path, cli):
    """The pooler kind has one site: any form keeps its update exactly at its own rank."""
    make_peft_adapter(
        tiny_bert(layers=3, num_labels=3), tmp_path / "lora", r=2, target_modules=["dense"], task_type="SEQ_CLS"
    )
    assert cli("convert", tmp_path / "lora", "--to", "sharea", "--rank", 2, "-o", tmp_path / "out").exit_code == 0
    lora, out = load_adapter(tmp_path / "lora"), load_adapter(tmp_path / "out")
    diff = (lora.update("bert.pooler.dense") - out.update("bert.pooler.dense")).abs().max()
    assert float(diff) < 1e-5
