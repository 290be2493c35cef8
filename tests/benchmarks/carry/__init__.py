"""Carrying the ONNX Runtime CUDA wheels to the device in per-call parts (README.md)."""
