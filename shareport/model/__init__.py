"""The base model and surgery on it: loading (``base``), attaching/folding adapters
(``surgery``) and fresh adapters for a model (``fresh``). Never reads or writes adapter files."""

from .base import load_base_model
from .surgery import Attached, LoRALinear, attach, fold

__all__ = ["Attached", "LoRALinear", "attach", "fold", "load_base_model"]
