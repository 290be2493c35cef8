"""Choices and tolerances of ``shareport export``, ``verify`` and ``generate``: names and numbers only.

No torch, ONNX or ONNX Runtime here, so the command line can offer them without loading those
(``--help``, usage errors); ``exporter``, ``verify`` and ``generate`` import them from here.
"""

MODES = ("folded", "adapter")
# --dtype: the name on the command line -> the torch dtype's name
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16"}
# adapter input names: shareport's pool names, or Olive's (the pool name + ".weight")
ADAPTER_NAMES = ("shareport", "olive")

# verify: fp32 graphs against float64 PyTorch; fp16 graphs relative to the output's size
FP32_ATOL = 1e-4
FP16_RTOL = 2e-2
# fp32: ORT may be this many times as far from float64 PyTorch as float32 PyTorch is (then at least atol)
REFERENCE_MULTIPLE = 8.0
# fp16: ORT may be this many times as far from float64 PyTorch as float16 PyTorch is (then at least
# rtol x max(1, max |PyTorch|)); smaller than fp32's, because float16's own error can be a large
# share of the output: twice the worst ORT/PyTorch float16 ratio measured (1.9, bench_onnx's 33M Llama)
FP16_MULTIPLE = 4.0

# generate --engine
ENGINES = ("auto", "genai", "ort")
