"""ONNX export of a base model with an adapter, folded in or kept swappable, and its verification.

Modules, one job each:

- ``slots``: an adapter's pool in the graph's layout (transposed for MatMul, scale folded into
  one factor) and the symbolic rank dim of each tensor.
- ``signature``: which inputs and outputs a model's graph has, example inputs, dynamic shapes.
- ``wrapper``: the ``nn.Module`` that ``torch.onnx.export`` traces (flat tensors in and out).
- ``graph_file``: post-processing and saving the ONNX graph, reading its metadata back.
- ``ort_adapter``: ``.onnx_adapter`` files (ONNX Runtime's multi-LoRA format) and the check that
  an adapter fits a graph.
- ``runtime``: ONNX Runtime sessions on the provider that really works here (CUDA, else CPU).
- ``exporter``: the ``shareport export`` pipeline.
- ``verify``: ORT against PyTorch on several shapes, with and without the adapter.
"""
