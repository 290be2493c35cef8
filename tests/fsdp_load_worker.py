"""One process of tests/model/test_fsdp_loading.py (run by torchrun, or alone for the whole-load reference).

    python tests/fsdp_load_worker.py sharded|whole OUT_DIR BASE [BASE...]

After one load of the last base (warming up: imports and first-call costs are not the base's), loads
the first base (sharded: built on the meta device, then this process's shards read from the file;
whole: transformers' from_pretrained), reads every weight it holds, and records the peak resident
memory the load added above what the process held before it (VmHWM, reset through
/proc/self/clear_refs: anonymous and file-mapped pages alike), the parameter bytes this process holds
and the whole base's. Sharded, every base is then loaded again and checked: each gathered weight equals
the file's, and the logits of a fixed input go to OUT_DIR/rank<r>.json for the test to compare with a
one-process model's. A base folder with a ``carried.safetensors`` is a classifier whose head the
adapter carries (modules_to_save): it is loaded for SEQ_CLS with those tensors, copied in after.
"""

import json
import sys
from pathlib import Path

import torch


def status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def carried_of(base: str) -> dict:
    from safetensors.torch import load_file

    path = Path(base) / "carried.safetensors"
    return load_file(str(path)) if path.exists() else {}


def load(mode: str, base: str):
    from shareport.files.tensorfile import stream_model_weights
    from shareport.model.base import empty_base_model, load_base_model
    from shareport.train.accel import load_sharded_base

    carried = carried_of(base)
    task = "SEQ_CLS" if carried else None
    if mode == "whole":
        model = load_base_model(base, task, carried=carried)
    else:
        model = load_sharded_base(
            empty_base_model(base, task, carried=carried),
            stream_model_weights(base),
            torch.device("cpu"),
            base,
            carried,
        )
    with torch.no_grad():  # as attach() copies a carried head into the (whole, never sharded) parameters
        for name, value in carried.items():
            model.get_parameter(name).copy_(value)
    return model


def main() -> None:
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    from shareport.train.accel import local_parameter_bytes, parameter_bytes

    mode, out, bases = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)
    rank = 0
    if mode == "sharded":
        dist.init_process_group("gloo")
        rank = dist.get_rank()
    load(mode, bases[-1])
    reset_peak()
    before = status("VmRSS")
    model = load(mode, bases[0])
    with torch.no_grad():  # transformers maps the file: a page is resident once read
        touched = sum(float((p.to_local() if isinstance(p, DTensor) else p).sum()) for p in model.parameters())
    record = {
        "peak": status("VmHWM") - before,
        "held": local_parameter_bytes(model),
        "whole": parameter_bytes(model),
        "touched": touched,
        "logits": {},
    }
    del model
    for base in bases if mode == "sharded" else ():
        model = load(mode, base)
        reference = {**load_file(str(Path(base) / "model.safetensors")), **carried_of(base)}
        for name, p in model.named_parameters(remove_duplicate=False):
            full = p.full_tensor() if isinstance(p, DTensor) else p
            # a bare encoder's checkpoint lacks the head's prefix ("bert."); a tied head is saved once
            key = next(k for k in (name, name.partition(".")[2], "model.embed_tokens.weight") if k in reference)
            assert torch.equal(full, reference[key]), name
        ids = torch.arange(1, 13).reshape(2, 6) % model.config.vocab_size
        with torch.no_grad():
            record["logits"][base] = model(input_ids=ids).logits.tolist()
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
