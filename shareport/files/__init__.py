"""Adapter files: the folder's names and config (``folder``), the two formats with the same
verbs ``load``/``dump`` (``peft``, ``native``), safetensors with validated headers
(``tensorfile``) and atomic, never-clobbering output folders (``atomic``)."""

from .adapters import load_adapter, save_adapter
from .folder import adapter_file_size, weights_sha256

__all__ = ["adapter_file_size", "load_adapter", "save_adapter", "weights_sha256"]
