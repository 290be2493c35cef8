#!/usr/bin/env bash
# Byte-identity check for refactors: run it at two commits on the same demo folder
# (`shareport demo -o DEMO --no-export`) and diff the outputs. Usage: outputs_manifest.sh DEMO WORK_DIR
# Prints the sha256 of every file that convert (5 forms + a budget), export (folded, adapter,
# with past) and export-adapter write from the demo's LoRA.
set -euo pipefail
demo=$1; work=$2
rm -rf "$work"; mkdir -p "$work"
export SHAREPORT_NO_PROGRESS=1
for form in sharea shareb shareab aslora lora; do
  shareport convert "$demo/lora" --to $form -o "$work/$form" --json > "$work/$form.report.json"
done
shareport convert "$demo/lora" --to aslora --budget 0.1 --grouping adjacent -o "$work/aslora10" --json > "$work/aslora10.report.json"
shareport export "$work/aslora" --base "$demo/base" --onnx "$work/onnx-folded" --mode folded --json > "$work/onnx-folded.report.json"
shareport export "$work/aslora" --base "$demo/base" --onnx "$work/onnx-adapter" --mode adapter --json > "$work/onnx-adapter.report.json"
shareport export "$work/sharea" --base "$demo/base" --onnx "$work/onnx-past" --mode adapter --with-past --json > "$work/onnx-past.report.json"
shareport convert "$demo/lora" --to sharea --rank 3 -o "$work/sharea3" --json > "$work/sharea3.report.json"
shareport export-adapter "$work/sharea3" --graph "$work/onnx-past" -o "$work/other.onnx_adapter"
cd "$work" && find . -type f ! -name '*.report.json' | sort | xargs sha256sum
