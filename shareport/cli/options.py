"""Options several commands share, so they read and behave the same everywhere."""

import os

import click

from ..errors import ShareportError

json_option = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables.")
allow_pickle_option = click.option(
    "--allow-pickle",
    is_flag=True,
    help="Allow reading a pickled adapter_model.bin (with torch.load(weights_only=True)). Off by default.",
)
overwrite_option = click.option(
    "--overwrite", is_flag=True, help="Replace outputs that exist (the output and the --plot figure)."
)
overwrite_output_option = click.option("--overwrite", is_flag=True, help="Replace the output if it exists.")
plot_option = click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    help="Also write a PNG figure here (needs matplotlib: pip install 'shareport[plot]').",
)


class OutputOption(click.Option):
    """An option whose --help lists only ``shown`` of its names; the others stay accepted (old spellings)."""

    def __init__(self, param_decls, shown=("-o", "--output"), **kwargs):
        super().__init__(param_decls, **kwargs)
        self.shown = tuple(shown)

    def get_help_record(self, ctx):
        opts = self.opts
        self.opts = [name for name in opts if name in self.shown]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = opts


def output_option(*aliases: str, dest: str = "out", shown: tuple[str, ...] = ("-o", "--output"), **kwargs):
    """``-o/--output`` (the one documented spelling) plus hidden ``aliases`` mapping to the same parameter."""
    return click.option("-o", "--output", *aliases, dest, cls=OutputOption, shown=shown, **kwargs)


class Folder(click.Path):
    """A folder parameter. A file given there is bad input like a missing folder (one ``Error:`` line, exit 1),
    not a usage error; whether the folder exists is the library's check."""

    def __init__(self, path_type=str):
        super().__init__(file_okay=False, path_type=path_type)

    def convert(self, value, param, ctx):
        if os.path.isfile(value):
            name = "this argument" if param is None else param.human_readable_name
            if isinstance(param, click.Option):
                name = next((o for o in param.opts if o.startswith("--")), param.opts[0])
            raise ShareportError(f"{os.fsdecode(value)}: a file, where {name} needs a folder")
        return super().convert(value, param, ctx)
