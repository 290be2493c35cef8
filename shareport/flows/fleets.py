"""``fleet`` and ``fleet_add``: N LoRAs of one base into a fleet folder, and one more member into it.
See ``shareport.flows``."""

from __future__ import annotations

from pathlib import Path

from converters import DEFAULT_RIDGE

from ..convert_options import Calibration
from ..errors import ShareportError
from ..files import adapter_file_size, load_adapter, weights_sha256
from ..files.adapters import load_fleet, save_fleet
from ..files.atomic import MARKER_NAME, check_output
from ..files.fleet import REPORT_NAME as FLEET_REPORT_NAME
from ..files.fleet import SHARED_NAME, added_member_name, check_member_name, folder_members, member_names, split_named
from ..fleet import against_alone, build_fleet, cluster_counts, fleet_bases
from ..fleet_add import add_member, read_fleet
from ..fleet_bytes import bytes_hint, check_bytes, fleet_at_bytes
from ..forms import (
    CALIBRATION_MAX_LENGTH,
    CALIBRATION_SAMPLES,
    DEFAULT_FLEET_CLUSTERS,
    QUANTIZE_CHOICES,
)
from ..quantization import check_quantize_options, quantize_fleet


def fleet(
    lora_dirs: list[str],
    out: str,
    *,
    form: str | None = None,
    rank: int | None = None,
    budget: float | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    calibration: list[str] | tuple | str = (),
    base: str | None = None,
    clusters: int | str = DEFAULT_FLEET_CLUSTERS,
    quantize: str | None = None,
    group_size: int | None = None,
    bytes_share: float | None = None,
) -> dict:
    """Compress N LoRAs of one base into a fleet folder: ``shared.safetensors`` once, one member folder each.

    ``lora_dirs``: folders, or ``NAME=PATH`` to name a member; the others take their shortest
    distinct path suffix (``files.fleet.member_names``). ``form`` None: the form with the least
    error at the budget (``fleet.build_fleet``). ``calibration`` (with ``base``): data files as
    ``finetune`` reads them, one ``FILE`` for every member and/or ``NAME=FILE`` per member; each
    member's statistics are measured with its own LoRA attached on its own data, and its cores fit
    to them (``CALIBRATION_SAMPLES`` examples of at most ``CALIBRATION_MAX_LENGTH`` tokens, ridge
    ``converters.DEFAULT_RIDGE``, as ``convert`` defaults). ``clusters``: a number of clusters with a
    basis each, or "auto" (``fleet.build_fleet``). ``quantize`` ("int8" or "int4", after the fleet is
    built): every stored factor (shared bases, each member's B's or cores) as integers in groups of
    ``group_size`` with float16 scales (``quantization.quantize_fleet``); the report's ``quantization``
    has the bytes and, per member, its weight error against its LoRA in float and quantized.
    ``bytes_share`` (instead of ``budget``, ``rank`` and ``quantize``): the fleet whose stored factors
    take at most that share of the LoRAs' float32 bytes, in the storage (float32, int8, int4) with the
    least error (``fleet_bytes.fleet_at_bytes``); the report's ``storage`` lists the three.

    Every input is read and checked (names, same base, sites and shapes; no adapter given twice, by
    folder or by bytes) before the output is checked, and both before the work; the folder appears
    whole or not at all. The report: per member its relative error and stored parameters, the
    shared basis, the total against the N separate LoRAs (parameters and bytes), the candidates when
    the form was chosen, and a warning per member keeping under half its energy.
    """
    if bytes_share is not None:  # before anything is read
        _check_bytes_options(
            bytes_share, budget=budget, rank=rank, quantize=quantize, group_size=group_size, calibration=calibration
        )
    else:
        check_quantize_options(quantize, group_size)
    calibration = [calibration] if isinstance(calibration, str) else list(calibration)
    if calibration and base is None:
        raise ShareportError("--calibration needs --base (the model to run the data through)")
    if base is not None and not calibration:
        raise ShareportError("--base is only used with --calibration DATA")
    named = member_names([str(d) for d in lora_dirs])
    cluster_counts(clusters, len(named), rank=rank)  # refused before any read
    names, paths = [n for n, _ in named], [p for _, p in named]
    data_files = _calibration_files(calibration, names) if calibration else None
    adapters, seen_bytes = [], {}
    for folder in paths:
        adapter = load_adapter(folder, allow_pickle=allow_pickle)
        digest = weights_sha256(folder)
        if digest is not None and digest in seen_bytes:
            raise ShareportError(f"{folder}: the same weights as {seen_bytes[digest]} (an adapter given twice)")
        if digest is not None:  # a pickled-only adapter has no safetensors digest to compare
            seen_bytes[digest] = folder
        adapters.append(adapter)
    inputs = paths + sorted(set(data_files or [])) + ([base] if base else [])
    check_output(out, overwrite, inputs)
    stats, seconds = _fleet_statistics(adapters, data_files, base) if data_files else (None, None)
    storage = quantization = None
    if bytes_share is not None:  # built, and quantized where an integer storage won
        result, quantization, storage = fleet_at_bytes(
            adapters, names, form, share=bytes_share, clusters=clusters, group_size=group_size
        )
        quantize = quantization["quantize"] if quantization else None
        group_size = quantization["group_size"] if quantization else None
    else:
        result = build_fleet(adapters, names, form, rank=rank, budget=budget, calibration=stats, clusters=clusters)
    if stats is None:  # a calibrated fleet's errors are output errors: not comparable with weights alone
        result = against_alone(result, adapters, quantize=quantize, group_size=group_size)
    report = result.report.to_dict()
    if storage is not None:
        report["storage"] = storage
    elif quantize is None and stats is None:
        report["hints"] = bytes_hint(result)
    if quantize is not None and quantization is None:
        result, quantization = quantize_fleet(result, adapters, quantize, group_size=group_size)
    if quantization is not None:
        _add_quantization(report, quantization)
    save_fleet(result, out, overwrite=overwrite, inputs=inputs, reports={FLEET_REPORT_NAME: report})
    lora_bytes = [adapter_file_size(d) for d in paths]
    member_bytes = [adapter_file_size(Path(out) / n) for n in names]
    shared_bytes = (Path(out) / SHARED_NAME).stat().st_size
    for member, size, source in zip(report["members"], member_bytes, lora_bytes):
        member.update(bytes=size, lora_bytes=source)
    data = {
        "output": str(out),
        **report,
        "shared_bytes": shared_bytes,
        "bytes": shared_bytes + sum(member_bytes),
        "lora_bytes": sum(lora_bytes),
    }
    if stats is not None:  # not in the written report: the same input must give the same bytes
        data["calibration"] = {**data["calibration"], "seconds": seconds}
    return data


def _check_bytes_options(share: float, *, budget, rank, quantize, group_size, calibration) -> None:
    """--bytes chooses the budget and the storage itself; it ranks them by weights (module fleet_bytes)."""
    check_bytes(share)
    chosen = (("--budget", budget), ("--rank", rank), ("--quantize", quantize))
    given = [flag for flag, value in chosen if value is not None]
    if given:
        raise ShareportError(f"--bytes sets the budget and the storage itself: give it or {given[0]}, not both")
    if calibration:
        raise ShareportError(
            "--bytes ranks float32, int8 and int4 by weight error, which a calibrated fleet's output error "
            "is not comparable with: give --budget (and --quantize) with --calibration"
        )
    check_quantize_options(QUANTIZE_CHOICES[0], group_size)  # a --group-size for the integer storages


def _add_quantization(report: dict, quantization: dict) -> None:
    """The quantized fleet's report: ``quantization`` (settings, bytes) at the top, and per member its
    float and quantized weight errors against its LoRA (``relative_error`` stays the fleet's float one,
    so a calibrated fleet's output error keeps its meaning)."""
    rows = quantization.pop("members")
    report["quantization"] = quantization
    for member, row in zip(report["members"], rows):
        member["quantization"] = row


def fleet_add(
    fleet_dir: str,
    lora_dir: str,
    *,
    out: str | None = None,
    max_error: float | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """Add one LoRA to a fleet folder: ``fleet_add.add_member`` (projected onto the bases, which grow
    only when its error is over the target), written over ``fleet_dir`` in one atomic step, or to
    ``out`` (then ``fleet_dir`` is left as it is).

    ``lora_dir``: a folder, or ``NAME=PATH``; without a name the member is named as ``fleet`` would have
    named it among the members' inputs (``files.fleet.added_member_name``: ``run4/lora`` -> ``run4``).
    Everything is read and checked first (every member, so a changed shared file is refused; the
    name; base, sites and shapes; the output), then the fleet is grown and written. In place, a
    folder holding anything besides the fleet is refused (replacing it would delete that). The
    report is the fleet's, each member with its error, plus ``added`` (the new member's error
    before and after, the target and its rule, the kinds grown) and ``rewritten`` (the files that
    changed)."""
    name, path = split_named(str(lora_dir))
    if name is None:
        name = added_member_name(path, list(folder_members(Path(fleet_dir))))
        check_member_name(name, f"{path} (its name from its folders)")
    else:
        check_member_name(name, str(lora_dir))
    loaded = load_fleet(fleet_dir, allow_pickle=allow_pickle)
    quantized = next((m for m, a in loaded.members.items() if a.quantized), None)
    if quantized is not None:
        # growing the bases pads cores and projects onto bases the integers only approximate: refused
        # rather than written with new members fit to dequantized bases and old ones re-quantized
        raise ShareportError(
            f"{Path(fleet_dir) / quantized}: a member of a quantized fleet (integer factors); fleet-add "
            "grows float fleets only: build the fleet again with the new LoRA and --quantize"
        )
    if name in loaded.members:
        raise ShareportError(
            f"{lora_dir}: the fleet {fleet_dir} already has a member '{name}'; name the new one with NAME=PATH"
        )
    adapter = load_adapter(path, allow_pickle=allow_pickle)
    target = Path(out if out is not None else fleet_dir)
    if out is None:
        if loaded.foreign:
            raise ShareportError(
                f"{fleet_dir}: holds '{loaded.foreign[0]}', which is not part of the fleet; "
                "fleet-add replaces the folder whole: move it out, or write the grown fleet "
                "elsewhere with -o"
            )
        if not (Path(fleet_dir) / MARKER_NAME).is_file():
            raise ShareportError(
                f"{fleet_dir}: has no {MARKER_NAME} marker, so shareport did not write it; "
                "write the grown fleet elsewhere with -o"
            )
        check_output(target, True, [path])
    else:
        check_output(target, overwrite, [path, fleet_dir])
    fleet = read_fleet(loaded.members, loaded.report, str(Path(fleet_dir) / FLEET_REPORT_NAME))
    added = add_member(fleet, adapter, name, max_error=max_error)
    unchanged = [SHARED_NAME, *fleet.names] if added.unchanged else []
    report = added.fleet.report.to_dict()
    save_fleet(
        added.fleet,
        target,
        overwrite=out is None or overwrite,
        inputs=[path] if out is None else [path, fleet_dir],
        reports={FLEET_REPORT_NAME: report},
        previous=Path(fleet_dir),
        unchanged=unchanged,
    )
    rewritten = [f"{name}/"] + ([] if added.unchanged else [SHARED_NAME, *(f"{n}/" for n in fleet.names)])
    new = report["members"][-1]
    return {
        "output": str(target),
        **report,
        "rewritten": [*rewritten, FLEET_REPORT_NAME],
        "added": {
            "member": name,
            "relative_error": new["relative_error"],
            **report["additions"][-1],
            "warnings": report["warnings"][len(fleet.report.warnings) :],
        },
    }


def _calibration_files(args: list[str], names: list[str]) -> list[str]:
    """Per member its data file: its own ``NAME=FILE``, else the one plain ``FILE`` (shared by the rest)."""
    shared, own = None, {}
    for arg in args:
        name, path = split_named(arg)
        if name is None:
            if shared is not None:
                raise ShareportError(
                    f"--calibration {arg}: a second file for every member (the first is {shared}); "
                    "give one FILE for all, and NAME=FILE for members with their own"
                )
            shared = path
        elif name not in names:
            raise ShareportError(f"--calibration {arg}: no member is named '{name}' (members: {', '.join(names)})")
        elif name in own:
            raise ShareportError(f"--calibration {arg}: member '{name}' already has {own[name]}")
        else:
            own[name] = path
    missing = [n for n in names if n not in own and shared is None]
    if missing:
        raise ShareportError(
            f"--calibration: member '{missing[0]}' has no data: give NAME=FILE for it, or one "
            "FILE for every member without its own"
        )
    return [own.get(n, shared) for n in names]


def _fleet_statistics(adapters, data_files: list[str], base_dir: str):
    """Per member the input statistics of its own data with its own LoRA attached, in the fleet's bases
    (``fleet.fleet_bases``: one basis per kind for every member). Returns (one ``Calibration`` per
    member, seconds spent running the base)."""
    import time

    import torch

    from ..model import load_base_model
    from ..model.calibration import collect_statistics
    from ..train.data import SAMPLE_SEED, load_data, pad_token_id, sample_examples

    bases = fleet_bases(adapters)
    drawn = {
        path: sample_examples(load_data(path, base_dir, CALIBRATION_MAX_LENGTH), CALIBRATION_SAMPLES)
        for path in dict.fromkeys(data_files)
    }  # every file read (and refused) before the slow part
    out, seconds = [], 0.0
    for adapter, path in zip(adapters, data_files):
        sequences = drawn[path].sequences
        model = load_base_model(base_dir, adapter.task_type, carried=adapter.extra_tensors)  # its own head
        started = time.perf_counter()
        with torch.no_grad():
            stats = collect_statistics(
                model,
                adapter,
                sequences,
                pad_token_id(model.config),
                where=str(base_dir),
                bases={kind: ([s.path for s in sites], bases[kind]) for kind, sites in adapter.kinds().items()},
            )
        seconds += time.perf_counter() - started
        info = {
            "data": str(path),
            "base": str(base_dir),
            "samples": len(sequences),
            "sample_seed": SAMPLE_SEED,
            "tokens": sum(len(seq) for seq in sequences),
            "max_length": CALIBRATION_MAX_LENGTH,
        }
        out.append(Calibration(stats.statistics, DEFAULT_RIDGE, info))
    return out, seconds
