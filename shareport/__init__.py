"""shareport: convert LoRA adapters to shared forms, recover, export to ONNX and verify."""

__version__ = "0.1.0"
