"""The ``shareport`` command line: one module per command, each parse -> one library call -> print."""

from .main import main

__all__ = ["main"]
