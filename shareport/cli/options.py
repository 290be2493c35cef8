"""Options several commands share, so they read and behave the same everywhere."""

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables.")
allow_pickle_option = click.option(
    "--allow-pickle",
    is_flag=True,
    help="Allow reading a pickled adapter_model.bin (with torch.load(weights_only=True)). Off by default.",
)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace outputs that exist (folder, file or --plot figure).")
plot_option = click.option(
    "--plot", type=click.Path(dir_okay=False, path_type=str), default=None,
    help="Also write a PNG figure here (needs matplotlib: pip install 'shareport[plot]').",
)
