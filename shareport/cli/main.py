"""The ``shareport`` command line: parse, call the library, print a report.

Bad input raises :class:`ShareportError`; the group turns it into one line on stderr and exit
status 1, so every command fails the same way and never prints a traceback for user errors.

Each command's module is imported only when that command runs (or shows its own help): the
libraries behind them (torch, transformers, ONNX Runtime) take seconds to import, and
``--version``, ``--help`` or a misspelt command need none of them. The group's ``--help`` reads
each command's summary from its module's source.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import warnings
from collections.abc import MutableMapping

import click
from click.utils import make_default_short_help

from .. import __version__
from ..errors import ShareportError

# command name -> (module in shareport.cli, the click command in it)
COMMANDS = {
    "demo": ("demo", "demo_cmd"),
    "inspect": ("inspect", "inspect_cmd"),
    "convert": ("convert", "convert_cmd"),
    "fleet": ("fleet", "fleet_cmd"),
    "fleet-add": ("fleet_add", "fleet_add_cmd"),
    "frontier": ("frontier", "frontier_cmd"),
    "finetune": ("finetune", "finetune_cmd"),
    "train": ("train", "train_cmd"),
    "export": ("export", "export_cmd"),
    "verify": ("verify", "verify_cmd"),
    "export-adapter": ("export_adapter", "export_adapter_cmd"),
    "generate": ("generate", "generate_cmd"),
    "doctor": ("doctor", "doctor_cmd"),
}


class LazyCommands(MutableMapping):
    """The group's commands, each imported from its module on first use."""

    def __init__(self, specs: dict[str, tuple[str, str]]):
        self.specs, self.loaded = dict(specs), {}

    def __getitem__(self, name: str) -> click.Command:
        if name not in self.loaded:
            module, attr = self.specs[name]  # KeyError: no such command
            self.loaded[name] = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
        return self.loaded[name]

    def __setitem__(self, name: str, command: click.Command) -> None:
        self.specs[name] = ("", "")
        self.loaded[name] = command

    def __delitem__(self, name: str) -> None:
        del self.specs[name]
        self.loaded.pop(name, None)

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def docstring(self, name: str) -> str:
        """The command's help text, from its module's source when the module is not imported yet."""
        if name in self.loaded:
            return self.loaded[name].help or ""
        module, attr = self.specs[name]
        origin = importlib.util.find_spec(f"{__package__}.{module}").origin
        with open(origin, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), origin)
        function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == attr)
        return ast.get_docstring(function) or ""


# Deprecation notices the libraries print on shareport's own calls: nothing a user can act on, and they
# break the progress line. (ONNX Runtime's notices are quietened per session, in export/runtime.py.)
HARMLESS_WARNINGS = (
    (FutureWarning, r"`past_key_values` is deprecated"),  # transformers, on the PyTorch side of verify/generate
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),  # transformers, when PEFT wraps a model
)


class _Group(click.Group):
    def format_commands(self, ctx, formatter) -> None:
        """click's list of commands and their summaries, without importing the commands."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(map(len, names))
        rows = [(name, short_help(self.commands, name, limit)) for name in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

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


def short_help(commands: LazyCommands, name: str, limit: int = 45) -> str:
    """What click's ``Command.get_short_help_str`` gives, from the docstring (text after ``\\f`` is not help)."""
    text = inspect.cleandoc(commands.docstring(name)).split("\f", 1)[0]
    return make_default_short_help(text, limit)


main.commands = LazyCommands(COMMANDS)
