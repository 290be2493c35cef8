"""``inspect`` and ``convert``: an adapter folder in, a summary or a converted adapter folder out
(with calibration statistics drawn from data when asked). See ``shareport.flows``."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from converters import DEFAULT_RIDGE

from ..convert import conversion_steps, convert_adapter
from ..convert_options import Calibration, ConvertOptions, parse_buckets
from ..errors import ShareportError
from ..files import adapter_file_size, load_adapter, save_adapter, weights_sha256
from ..files.atomic import check_output
from ..forms import (
    AUTO,
    CALIBRATION_MAX_LENGTH,
    CALIBRATION_SAMPLES,
    PER_SITE_FORMS,
)
from ..plots import check_plot_path, plot_adapter
from ..quantization import check_quantize_options, quantize_adapter
from ..summary import summarize


def inspect(adapter_dir: str, allow_pickle: bool = False, plot: str | None = None, overwrite: bool = False) -> dict:
    if plot:
        check_plot_path(plot, overwrite, [adapter_dir])
    adapter = load_adapter(adapter_dir, allow_pickle=allow_pickle)
    info = summarize(adapter, adapter_file_size(adapter_dir))
    if plot:
        plot_adapter(adapter, plot)
        info["plot"] = plot
    return info


def default_convert_output(lora_dir: str, to: str) -> str:
    return f"{str(lora_dir).rstrip('/')}-{to}"


def convert(
    lora_dir: str,
    to: str,
    out: str | None = None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    budget: float | None = None,
    groups: int | None = None,
    grouping: str = "any",
    overwrite: bool = False,
    allow_pickle: bool = False,
    plot: str | None = None,
    progress: bool = True,
    calibration: str | None = None,
    base: str | None = None,
    calibration_samples: int | None = None,
    calibration_max_length: int | None = None,
    calibration_ridge: float | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    max_rank: int | None = None,
    uniform_rank: bool = False,
    rank_buckets: str | tuple[int, ...] | None = None,
) -> dict:
    """Convert a LoRA folder into ``to``; the output (and the figure, if asked) appear together or not at all.

    ``max_rank`` / ``uniform_rank`` / ``rank_buckets`` ("4,8,16" or ranks): a serving rule for the budget
    plan (``convert_options.ConvertOptions``), checked before anything is read; the report's ``serving``
    gives its planned error against the unconstrained plan's and the parameters a padding server holds.

    ``quantize`` ("int8" or "int4", after the projection): every factor is stored as integers in groups
    of ``group_size`` with float16 scales (``shareport.quantization``); the report's ``quantization``
    gives the update error it adds and the bytes. A quantized result is written in the native format,
    a plain LoRA too (PEFT stores floats only: ``--to lora`` without ``quantize`` dequantizes).

    ``calibration`` (data: text, jsonl or tokenized, as ``finetune`` reads it) with ``base``:
    ``calibration_samples`` examples drawn across the file (``train.data.sample_examples``), cut to
    ``calibration_max_length`` tokens, are run through the base with the LoRA attached, and every form
    minimises the error of the update's outputs on those inputs (``shareport.convert_options.Calibration``)
    instead of the plain Frobenius error. The three ``calibration_*`` settings default to
    ``CALIBRATION_SAMPLES``, ``CALIBRATION_MAX_LENGTH`` and ``converters.DEFAULT_RIDGE``; given without
    ``calibration`` they are refused (they would do nothing).
    """
    out = out or default_convert_output(lora_dir, to)
    if isinstance(rank_buckets, str):
        rank_buckets = parse_buckets(rank_buckets)
    # the options alone (no calibration yet: that form check waits for the statistics)
    ConvertOptions(
        to,
        rank=rank,
        energy=energy,
        budget=budget,
        groups=groups,
        grouping=grouping,
        max_rank=max_rank,
        uniform_rank=uniform_rank,
        rank_buckets=rank_buckets,
    )
    if (calibration is None) != (base is None):
        raise ShareportError(
            "--calibration needs --base (the model to run the data through)"
            if base is None
            else "--base is only used with --calibration DATA"
        )
    settings = {
        "--calibration-samples": calibration_samples,
        "--calibration-max-length": calibration_max_length,
        "--calibration-ridge": calibration_ridge,
    }
    unused = [flag for flag, value in settings.items() if value is not None]
    if calibration is None and unused:
        raise ShareportError(f"{unused[0]} is only used with --calibration DATA")
    check_quantize_options(quantize, group_size)
    adapter = load_adapter(lora_dir, allow_pickle=allow_pickle, stream=True)  # inputs, then outputs, then the work
    inputs = [lora_dir] + [p for p in (calibration, base) if p]
    check_output(out, overwrite, inputs)
    if plot:
        check_plot_path(plot, overwrite, inputs)
    stats, seconds, measure = None, None, None
    if calibration is not None:
        stats, seconds, model, sampled = _calibration_statistics(
            adapter,
            calibration,
            base,
            CALIBRATION_SAMPLES if calibration_samples is None else calibration_samples,
            CALIBRATION_MAX_LENGTH if calibration_max_length is None else calibration_max_length,
            DEFAULT_RIDGE if calibration_ridge is None else calibration_ridge,
        )
        if to == AUTO:  # rank the candidates by what the model outputs on the calibration examples
            from ..train.evaluation import output_kl_measure

            measure = output_kl_measure(model, adapter, sampled)
    with _kind_progress(conversion_steps(adapter, to), progress) as tick:
        result, report = convert_adapter(
            adapter,
            to,
            rank=rank,
            energy=energy,
            budget=budget,
            groups=groups,
            grouping=grouping,
            progress=tick,
            source_digest=weights_sha256(lora_dir),
            calibration=stats,
            error_measure=measure,
            max_rank=max_rank,
            uniform_rank=uniform_rank,
            rank_buckets=rank_buckets,
        )
    data = {"output": out, **report.to_dict()}
    if quantize is not None:
        result, data["quantization"] = quantize_adapter(result, quantize, group_size)
    if stats is not None:  # not in the provenance: the same input must give the same bytes
        data["calibration"] = {**report.settings["calibration"], "seconds": seconds}
    if plot:
        if result.form in PER_SITE_FORMS:  # per-site ranks: no shared rank to mark, every site its own B
            plot_adapter(adapter, plot)
        else:
            plot_adapter(adapter, plot, grouped=result, ranks={k.kind: k.rank for k in report.kinds})
        data["plot"] = plot
    try:
        save_adapter(
            result,
            out,
            as_peft=result.form in PER_SITE_FORMS and not result.quantized,
            overwrite=overwrite,
            inputs=inputs,
        )
    except BaseException:
        if plot:
            Path(plot).unlink(missing_ok=True)  # all outputs or none
        raise
    return data


def _calibration_statistics(adapter, data_path: str, base_dir: str, samples: int, max_length: int, ridge: float):
    """Every site's input statistics on the calibration data, with the LoRA attached (model/calibration.py).
    Returns (the statistics, seconds, the base model (bare again), the examples drawn)."""
    import time

    import torch

    from ..model import load_base_model
    from ..model.calibration import collect_statistics, kind_bases
    from ..train.data import SAMPLE_SEED, load_data, pad_token_id, sample_examples

    if samples < 1:
        raise ShareportError(f"--calibration-samples must be at least 1, got {samples}")
    if max_length < 2:
        raise ShareportError(f"--calibration-max-length must be at least 2, got {max_length}")
    if not ridge >= 0:
        raise ShareportError(f"--calibration-ridge must be >= 0, got {ridge}")
    data = load_data(data_path, base_dir, max_length)
    sampled = sample_examples(data, samples)
    sequences = sampled.sequences
    tokens = sum(len(seq) for seq in sequences)
    # before the (slow) model load: each kind's p x p statistics need at least p tokens
    bases = kind_bases(adapter)
    for kind, (_, q) in bases.items():
        if tokens < q.shape[1]:
            more = (
                "raise --calibration-samples"
                if len(sequences) < len(data)
                else "give more data, or raise --calibration-max-length"
            )
            raise ShareportError(
                f"{data_path}: {tokens} calibration tokens in {len(sequences)} of the file's "
                f"{len(data)} example(s), fewer than the {q.shape[1]} dimensions of {kind}'s "
                f"statistics; {more}"
            )
    model = load_base_model(base_dir, adapter.task_type, carried=adapter.extra_tensors)
    started = time.perf_counter()
    try:
        with torch.no_grad():
            stats = collect_statistics(
                model, adapter, sequences, pad_token_id(model.config), where=str(base_dir), bases=bases
            )
    except ShareportError as exc:
        message = str(exc)
        raise ShareportError(message if message.startswith(str(base_dir)) else f"{base_dir}: {message}") from None
    seconds = time.perf_counter() - started
    info = {
        "data": str(data_path),
        "base": str(base_dir),
        "samples": len(sequences),
        "examples": len(data),
        "sample_seed": SAMPLE_SEED,
        "tokens": tokens,
        "max_length": max_length,
        "statistics_bytes": stats.nbytes(),
    }
    return Calibration(stats.statistics, ridge, info), seconds, model, sampled


@contextlib.contextmanager
def _kind_progress(steps: int, enabled: bool):
    """One bar over the kinds being converted (stderr; off when not a terminal)."""
    from tqdm import tqdm

    with tqdm(
        total=steps, desc="converting", unit="kind", file=sys.stderr, disable=None if enabled else True, leave=False
    ) as bar:

        def tick(name: str) -> None:
            bar.set_postfix_str(name)
            bar.update(1)

        yield tick
