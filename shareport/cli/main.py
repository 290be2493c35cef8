"""The ``shareport`` command line: parse, call the library, print a report.

Bad input raises :class:`ShareportError`; the group turns it into one line on stderr and exit
status 1, so every command fails the same way and never prints a traceback for user errors.
"""

from __future__ import annotations

import warnings

import click

from .. import __version__
from .convert import convert_cmd
from .demo import demo_cmd
from .export_adapter import export_adapter_cmd
from .export import export_cmd
from .finetune import finetune_cmd
from .fleet import fleet_cmd
from .frontier import frontier_cmd
from .generate import generate_cmd
from .doctor import doctor_cmd
from .inspect import inspect_cmd
from .train import train_cmd
from .verify import verify_cmd
from ..errors import ShareportError


# Deprecation notices the libraries print on shareport's own calls: nothing a user can act on, and they
# break the progress line. (ONNX Runtime's notices are quietened per session, in export/runtime.py.)
HARMLESS_WARNINGS = (
    (FutureWarning, r"`past_key_values` is deprecated"),  # transformers, on the PyTorch side of verify/generate
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),  # transformers, when PEFT wraps a model
)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            with warnings.catch_warnings():
                for category, message in HARMLESS_WARNINGS:
                    warnings.filterwarnings("ignore", message=message, category=category)
                return super().invoke(ctx)
        except ShareportError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shareport")
def main() -> None:
    """shareport: make LoRA adapters smaller and deployable.

    \b
    Typical flow:
      shareport convert LORA --to aslora -o SHARED          exact shared projection
      shareport finetune SHARED --base BASE --teacher LORA --data TEXT -o RECOVERED
      shareport export RECOVERED --base BASE -o OUT --mode adapter       (verifies)
    Try it on built-in material first: shareport demo
    """


for command in (demo_cmd, inspect_cmd, convert_cmd, fleet_cmd, frontier_cmd, finetune_cmd, train_cmd, export_cmd, verify_cmd,
                export_adapter_cmd, generate_cmd, doctor_cmd):
    main.add_command(command)
