"""An adapter-mode graph bakes the exported adapter's head (PEFT modules_to_save): another adapter's
``.onnx_adapter`` would run with that head, not its own. export-adapter and verify refuse an adapter
whose head differs (or that has none, or one the graph lacks), in one line naming its folder and the
tensor, and write nothing; an adapter with the same head is accepted and its file, run in ONNX
Runtime, gives what PEFT gives for it. Graphs exported before the record are checked against their
initializers. Real PEFT LoRAs on a tiny BERT classifier.
"""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from shareport.errors import ShareportError
from shareport.export import graph_file, runtime
from shareport.export.exporter import ExportOptions, export
from shareport.export.ort_adapter import read_onnx_adapter
from shareport.export.verify import FP32_ATOL, verify
from shareport.files.adapters import load_adapter, save_adapter
from tests.onnx_cases import classifier_feeds, peft_logits
from tests.tiny import TARGETS, make_peft_adapter, tiny_bert
from tests.training_helpers import save_base

HEAD = ("classifier.bias", "classifier.weight")


def _lora(folder, seed: int, head_seed: int | None):
    """A PEFT LoRA on the tiny BERT classifier; its head drawn from ``head_seed`` (None: PEFT's copy of the base's)."""
    peft_model = make_peft_adapter(
        tiny_bert(num_labels=3),
        folder,
        seed=seed,
        r=2,
        lora_alpha=4,
        target_modules=TARGETS["bert"],
        task_type="SEQ_CLS",
        modules_to_save=["classifier"],
    )
    if head_seed is not None:  # a trained head has moved away from the base's
        carried = peft_model.base_model.model.classifier.modules_to_save.default
        gen = torch.Generator().manual_seed(head_seed)
        with torch.no_grad():
            for param in (carried.weight, carried.bias):
                param.copy_(torch.randn(param.shape, generator=gen))
        peft_model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    save_base(tiny_bert(num_labels=3), root / "base")
    _lora(root / "alpha", seed=1, head_seed=101)
    _lora(root / "other_head", seed=2, head_seed=102)
    _lora(root / "base_head", seed=3, head_seed=None)
    _lora(root / "same_head", seed=4, head_seed=101)  # other LoRA factors, alpha's head
    headless = load_adapter(root / "other_head")
    headless.extra_tensors = {}
    save_adapter(headless, root / "headless", as_peft=True)
    graph = export(
        root / "alpha", root / "base", root / "onnx", ExportOptions(mode="adapter"), progress=False, verify=False
    ).path
    return root, graph


_feeds, _peft_logits = classifier_feeds, peft_logits


def _unrecorded(graph, out):
    """A copy of ``graph`` as exported before the baked head was recorded (no ``carried`` section)."""
    shutil.copytree(graph, out)
    proto = onnx.load(str(out / graph_file.GRAPH_NAME))
    for prop in proto.metadata_props:
        if prop.key == graph_file.INFO_KEY:
            info = json.loads(prop.value)
            assert "baked" in info.pop("carried")
            prop.value = json.dumps(info, sort_keys=True)
    onnx.save(proto, str(out / graph_file.GRAPH_NAME))
    return out


@pytest.fixture(params=["recorded", "unrecorded"])
def graph(request, case, tmp_path):
    root, graph = case
    return graph if request.param == "recorded" else _unrecorded(graph, tmp_path / "old")


@pytest.mark.parametrize(
    "name, why",
    [
        ("other_head", "carries another 'classifier.bias'"),
        ("base_head", "carries another 'classifier.bias'"),
        ("headless", "carries no 'classifier.bias'"),
    ],
)
def test_export_adapter_refuses_another_head_and_writes_nothing(case, graph, cli, tmp_path, name, why):
    root, _ = case
    if name == "headless" and graph != case[1]:
        pytest.skip("a graph without the record cannot tell what it baked where the adapter carries nothing")
    out = tmp_path / "x.onnx_adapter"
    r = cli("export-adapter", root / name, "--graph", graph, "-o", out)
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert str(root / name) in r.output and why in r.output
    assert not out.exists() and not list(tmp_path.glob("*.onnx_adapter"))
    if name != "headless":  # (PEFT cannot load a SEQ_CLS LoRA saved without its head)
        # the graph really would be wrong with it: PEFT's outputs for the two heads are far apart
        feeds = _feeds()
        theirs, alphas = (_peft_logits(root / "base", root / n, feeds) for n in (name, "alpha"))
        assert np.abs(theirs - alphas).max() > 0.1


def test_an_adapter_with_the_same_head_is_accepted_and_runs_as_peft(case, graph, cli, tmp_path):
    root, _ = case
    out = tmp_path / "same.onnx_adapter"
    r = cli("export-adapter", root / "same_head", "--graph", graph, "-o", out)
    assert r.exit_code == 0, r.output
    feeds = _feeds()
    got = runtime.run(runtime.session(graph / graph_file.GRAPH_NAME), feeds, runtime.load_lora(read_onnx_adapter(out)))[
        0
    ]
    want = _peft_logits(root / "base", root / "same_head", feeds)
    assert np.abs(got - want).max() <= FP32_ATOL
    assert np.abs(want - _peft_logits(root / "base", root / "alpha", feeds)).max() > 0.1  # not alpha's outputs


def test_verify_refuses_another_head_in_one_line(case, graph, cli):
    root, _ = case
    with pytest.raises(ShareportError, match="other_head: carries another 'classifier.bias'"):
        verify(graph, root / "base", root / "other_head")
    r = cli("verify", graph, "--base", root / "base", "--adapter", root / "other_head")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert verify(graph, root / "base", root / "alpha").ok  # the exported adapter itself passes


def test_the_record_is_the_baked_values_per_tensor(case):
    """The graph's metadata holds one digest per head tensor, equal to the initializer the graph runs with."""
    from shareport.export.carried import GRAPH_PREFIX, tensor_digest

    _, graph = case
    proto = onnx.load(str(graph / graph_file.GRAPH_NAME))
    baked = graph_file.read_info(proto, graph)["carried"]["baked"]
    assert sorted(baked) == sorted(HEAD)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert all(baked[n] == tensor_digest(inits[GRAPH_PREFIX + n]) for n in HEAD)
