"""``shareport inspect DIR``: what an adapter holds, per kind and per layer."""

from __future__ import annotations

import click

from .options import Folder, allow_pickle_option, json_option, overwrite_option, plot_option
from .table import format_table, human_bytes, share_of_source, to_json


@click.command("inspect")
@click.argument("adapter_dir", type=Folder())
@json_option
@allow_pickle_option
@plot_option
@overwrite_option
def inspect_cmd(adapter_dir: str, as_json: bool, allow_pickle: bool, plot: str | None, overwrite: bool) -> None:
    """Show an adapter's form, base model, kinds, layers, ranks, size and per-layer norms.

    ADAPTER_DIR is a PEFT LoRA folder or a shareport (native) folder. With --plot, also
    write a PNG: per kind, the layer-by-layer distance matrix of the updates (layers that
    share a B outlined) and the energy kept against a shared rank.
    """
    from .. import flows  # here, not at the top: usage errors and --help need no torch

    info = flows.inspect(adapter_dir, allow_pickle=allow_pickle, plot=plot, overwrite=overwrite)
    if as_json:
        click.echo(to_json(info))
        return
    click.echo(render(adapter_dir, info))


def render(adapter_dir: str, info: dict) -> str:
    size = f"{info['parameters']:,}"
    if info["source_ratio"] is not None:
        size += " = " + share_of_source(info["source_ratio"], info["source_parameters"])
    head = [
        ("adapter", adapter_dir),
        ("form", info["form"]),
        ("base model", info["base_model"] or "(not recorded)"),
        ("task type", info["task_type"] or "(not recorded)"),
        ("layers", " + ".join(filter(None, [_ranges(info["layers"]), *info["outside_blocks"]]))),
        ("ranks", ", ".join(map(str, info["ranks"]))),
        ("parameters", size),
        ("plain LoRA at these ranks", f"{info['lora_equivalent_parameters']:,} parameters"),
        ("file size", human_bytes(info["file_size"] or 0)),
        ("factor storage", _storage(info["storage"])),
    ]
    fleet = info.get("fleet")
    if fleet:
        cluster = f", cluster {fleet['cluster']}" if fleet["cluster"] is not None else ""
        head.append(
            (
                "fleet member",
                f"of a {fleet['form']} fleet{cluster}: {fleet['own_parameters']:,} parameters its own, "
                f"{fleet['shared_parameters']:,} in {fleet['shared_file']} (shared with the other members; "
                "the count above forms each B in full)",
            )
        )
    if info["extra_tensors"]:
        head.append(("carried tensors", ", ".join(info["extra_tensors"])))
    parts = ["\n".join(f"{k:>25}: {v}" for k, v in head)]
    summary_rows = [
        (k, f"{v['shape'][0]}x{v['shape'][1]}", v["sites"], v["unique_A"], v["unique_B"])
        for k, v in info["kinds"].items()
    ]
    parts.append(format_table(["kind", "update shape", "sites", "unique A", "unique B"], summary_rows))
    for kind, v in info["kinds"].items():
        rows = [
            (row["layer"] if row["layer"] >= 0 else "-", row["rank"], row["scale"], row["B"], row["update_norm"])
            for row in v["layers"]
        ]
        parts.append(format_table(["layer", "rank", "scale", "B tensor", "||dW||_F"], rows, title=f"[{kind}]"))
    return "\n\n".join(parts)


def _storage(s: dict) -> str:
    """Bytes and bits per parameter of the factors, and how they are quantized, if they are."""
    text = f"{human_bytes(s['bytes'])} = {s['bits_per_parameter']:.2f} bits per parameter"
    if s["quantized_tensors"]:
        bits = "/".join(f"int{b}" for b in s["quantized_bits"])
        groups = "/".join(map(str, s["group_sizes"]))
        text += f" ({s['quantized_tensors']} tensors {bits} in groups of {groups}, float16 scales)"
    return text


def _ranges(values: list[int]) -> str:
    """[0,1,2,5] -> '0-2, 5'."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)
