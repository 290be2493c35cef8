import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker (and per process a test starts): N workers with N threads each on N cores
    # make torch's OpenMP threads wait on each other, many times slower than one thread each
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=UserWarning, module="peft")

# The files that take longest (CPU seconds on a clean clone, longest first). With parallel workers
# (`-n auto --dist loadfile`) each file runs whole on one worker, and a long file started last keeps
# one worker busy while the others idle: starting the longest first (longest-processing-time order)
# keeps the workers' finishing times close. A file missing here only runs later; nothing is skipped.
LONGEST_FIRST = (
    "test_example_decoder.py",
    "test_demo.py",
    "test_examples.py",
    "test_hardening_models.py",
    "test_genai.py",
    "test_onnx_export.py",
    "test_verify_mutants.py",
    "test_finetune_fsdp.py",
    "test_onnx_adapter.py",
    "test_bad_input_commands.py",
    "test_fleet_export.py",
    "test_calibration_convert.py",
    "test_verify_strict.py",
    "test_minilm_heads.py",
)


def pytest_configure(config):
    # xdist's default orders files by their number of tests, which puts the one-test, one-minute
    # example files last; keep the order below instead
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Longest files first (stable: each file keeps its own order). Every worker sorts the same way."""
    rank = {name: pos for pos, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def cli():
    """Run the CLI in-process; returns click's Result (exit_code, output)."""
    from click.testing import CliRunner

    from shareport.cli.main import main

    runner = CliRunner()

    def run(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return run
