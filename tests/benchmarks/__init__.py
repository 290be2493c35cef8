"""Benchmarks and the helpers they share; run each from the repository root as
``python3 -m tests.benchmarks.NAME`` (README.md lists them). pytest collects nothing here."""
