"""What each command does, as one library call: folders in -> folders out -> a report.

Every guarantee lives here or below, so a Python user gets the same as the CLI: outputs are
checked before the work starts, written atomically and never over an input; exports are
verified before they are published; provenance is recorded; under several processes only
the main one writes. Each function returns the report the CLI prints (``--json`` prints it
as is).

    inspect   adapter folder -> summary
    convert   LoRA folder -> shared (or plain) adapter folder [+ figure]
    fleet     N LoRA folders of one base -> fleet folder (shared basis once + one member folder each)
    fleet_add fleet folder + one more LoRA -> the fleet folder grown by one member (bases grown if needed)
    recover   shared adapter + teacher LoRA + base + data -> recovered adapter folder
    train     base + data -> new adapter folder
    export    adapter + base -> verified ONNX folder
    verify    ONNX folder + base + adapter -> comparison report
    export_adapter  adapter + ONNX folder -> .onnx_adapter file
    generate  ONNX folder (+ .onnx_adapter files) + prompt -> greedy text per adapter
    doctor    this machine's runtimes -> report
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

from converters import DEFAULT_RIDGE

from .convert import conversion_steps, convert_adapter
from .convert_options import Calibration, ConvertOptions, parse_buckets
from .errors import ShareportError
from .forms import AUTO, CALIBRATION_MAX_LENGTH, CALIBRATION_SAMPLES, DEFAULT_FLEET_CLUSTERS, GROUPED_FORMS, PER_SITE_FORMS
from .fleet import build_fleet, cluster_counts, fleet_bases
from .fleet_add import add_member, read_fleet
from .quantization import check_quantize_options, quantize_adapter
from .export import graph_file
from .export.exporter import ExportOptions
from .export.exporter import export as export_graph
from .export.doctor import doctor as doctor_report
from .export.generate import generate as generate_text
from .export.carried import check_baked, graph_inputs
from .export.slots import check_fleet_member
from .export.ort_adapter import adapter_arrays, check_fits, match_names, read_onnx_adapter, save_onnx_adapter
from .export.verify import FP16_RTOL, FP32_ATOL, Report
from .export.verify import verify as verify_graph
from .files import adapter_file_size, load_adapter, save_adapter, weights_sha256
from .files.adapters import load_fleet, save_fleet
from .files.fleet import REPORT_NAME as FLEET_REPORT_NAME
from .files.fleet import SHARED_NAME, check_member_name, member_names, split_named
from .files.atomic import MARKER_NAME, MARKER_TEXT, atomic_dir, atomic_file, check_output
from .files.folder import dump_json
from .plots import check_plot_path, has_matplotlib, plot_adapter, plot_frontier
from .summary import summarize
from .train.frontier import (DEFAULT_BUDGETS, FORMS, check_budgets, measure, pareto, parse_serving, point_line,
                             smallest_keeping, stages)
from .train.generated import check_generate
from .train.checkpoint import STATE_JSON
from .train.jobs import REPORT_NAME, TIMINGS_NAME, TrainingOptions, check_inputs, recovery_job, scratch_job
from .train.recipe import run, with_provenance

__all__ = ["ExportOptions", "TrainingOptions", "convert", "doctor", "export", "export_adapter", "fleet", "fleet_add", "generate",
           "inspect", "recover", "train", "verify"]


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


def convert(lora_dir: str, to: str, out: str | None = None, *, rank: int | None = None, energy: float | None = None,
            budget: float | None = None, groups: int | None = None, grouping: str = "any", overwrite: bool = False,
            allow_pickle: bool = False, plot: str | None = None, progress: bool = True,
            calibration: str | None = None, base: str | None = None,
            calibration_samples: int | None = None, calibration_max_length: int | None = None,
            calibration_ridge: float | None = None, quantize: str | None = None,
            group_size: int | None = None, max_rank: int | None = None, uniform_rank: bool = False,
            rank_buckets: str | tuple[int, ...] | None = None) -> dict:
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
    ConvertOptions(to, rank=rank, energy=energy, budget=budget, groups=groups, grouping=grouping, max_rank=max_rank,
                   uniform_rank=uniform_rank, rank_buckets=rank_buckets)
    if (calibration is None) != (base is None):
        raise ShareportError("--calibration needs --base (the model to run the data through)" if base is None
                             else "--base is only used with --calibration DATA")
    settings = {"--calibration-samples": calibration_samples, "--calibration-max-length": calibration_max_length,
                "--calibration-ridge": calibration_ridge}
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
            adapter, calibration, base, CALIBRATION_SAMPLES if calibration_samples is None else calibration_samples,
            CALIBRATION_MAX_LENGTH if calibration_max_length is None else calibration_max_length,
            DEFAULT_RIDGE if calibration_ridge is None else calibration_ridge)
        if to == AUTO:  # rank the candidates by what the model outputs on the calibration examples
            from .train.evaluation import output_kl_measure

            measure = output_kl_measure(model, adapter, sampled)
    with _kind_progress(conversion_steps(adapter, to), progress) as tick:
        result, report = convert_adapter(adapter, to, rank=rank, energy=energy, budget=budget, groups=groups,
                                         grouping=grouping, progress=tick, source_digest=weights_sha256(lora_dir),
                                         calibration=stats, error_measure=measure, max_rank=max_rank,
                                         uniform_rank=uniform_rank, rank_buckets=rank_buckets)
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
        save_adapter(result, out, as_peft=result.form in PER_SITE_FORMS and not result.quantized, overwrite=overwrite,
                     inputs=inputs)
    except BaseException:
        if plot:
            Path(plot).unlink(missing_ok=True)  # all outputs or none
        raise
    return data


def _calibration_statistics(adapter, data_path: str, base_dir: str, samples: int, max_length: int,
                            ridge: float):
    """Every site's input statistics on the calibration data, with the LoRA attached (model/calibration.py).
    Returns (the statistics, seconds, the base model (bare again), the examples drawn)."""
    import time

    import torch

    from .model import load_base_model
    from .model.calibration import collect_statistics, kind_bases
    from .train.data import SAMPLE_SEED, load_data, pad_token_id, sample_examples

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
            more = ("raise --calibration-samples" if len(sequences) < len(data)
                    else "give more data, or raise --calibration-max-length")
            raise ShareportError(f"{data_path}: {tokens} calibration tokens in {len(sequences)} of the file's "
                                 f"{len(data)} example(s), fewer than the {q.shape[1]} dimensions of {kind}'s "
                                 f"statistics; {more}")
    model = load_base_model(base_dir, adapter.task_type, carried=adapter.extra_tensors)
    started = time.perf_counter()
    try:
        with torch.no_grad():
            stats = collect_statistics(model, adapter, sequences, pad_token_id(model.config), where=str(base_dir),
                                       bases=bases)
    except ShareportError as exc:
        message = str(exc)
        raise ShareportError(message if message.startswith(str(base_dir)) else f"{base_dir}: {message}") from None
    seconds = time.perf_counter() - started
    info = {"data": str(data_path), "base": str(base_dir), "samples": len(sequences), "examples": len(data),
            "sample_seed": SAMPLE_SEED, "tokens": tokens, "max_length": max_length,
            "statistics_bytes": stats.nbytes()}
    return Calibration(stats.statistics, ridge, info), seconds, model, sampled


@contextlib.contextmanager
def _kind_progress(steps: int, enabled: bool):
    """One bar over the kinds being converted (stderr; off when not a terminal)."""
    from tqdm import tqdm

    with tqdm(total=steps, desc="converting", unit="kind", file=sys.stderr,
              disable=None if enabled else True, leave=False) as bar:
        def tick(name: str) -> None:
            bar.set_postfix_str(name)
            bar.update(1)

        yield tick


def default_recover_output(shared_dir: str) -> str:
    return str(shared_dir).rstrip("/") + "-recovered"


def recover(shared_dir: str, base_dir: str, teacher_dir: str, data_path: str | None, out: str | None = None, *,
            lm_loss: float = 0.0, options: TrainingOptions = TrainingOptions(), overwrite: bool = False,
            generate: int | None = None) -> dict | None:
    """Distil ``shared_dir`` toward ``teacher_dir``; returns the training report (None on non-main processes).

    ``generate`` (causal LMs, instead of ``data_path``): recover on that many texts sampled from the
    teacher (``train.generated``), seeded by ``options.seed``."""
    out = out or default_recover_output(shared_dir)
    if (data_path is None) == (generate is None):
        both = ", and not both" if data_path is not None else ""
        raise ShareportError(f"finetune needs --data DATA or --generate N (texts sampled from the teacher){both}")
    check_generate(generate)
    inputs = tuple(p for p in (shared_dir, teacher_dir, base_dir, data_path) if p is not None)
    student, teacher = check_inputs(base_dir, data_path, (shared_dir, teacher_dir), pack=options.pack)
    check_output(out, overwrite, inputs)
    job = recovery_job(shared_dir, base_dir, teacher_dir, data_path=data_path, max_length=options.max_length,
                       eval_fraction=options.eval_fraction, checkpoint_dir=options.checkpoint_folder(out),
                       resume=options.resume, merging=options.merging, adapters=(student, teacher),
                       generate=generate, seed=options.seed)
    recipe = options.recipe(job.student, distill_weight=1.0, task_weight=lm_loss)
    entry = {"step": "finetune", "teacher": teacher_dir, "data": data_path, "steps": options.steps,
             "seed": options.seed, **({"generated": generate} if generate is not None else {})}
    return _train_and_write(job, recipe, out, overwrite, inputs, entry, keep=("before", "after"),
                            own_checkpoint=options.checkpoint_dir is None)


def train(form: str, base_dir: str, targets: list[str], rank: int, data_path: str, out: str, *, alpha: float = 8.0,
          options: TrainingOptions = TrainingOptions(), overwrite: bool = False) -> dict | None:
    """Train a new adapter of ``form`` from scratch; returns the training report (None on non-main processes)."""
    if options.merging and form not in GROUPED_FORMS:
        raise ShareportError(f"--merges/--groups merge B's, which only --form aslora does (got --form {form})")
    if form in GROUPED_FORMS and not options.merging:
        raise ShareportError("--form aslora needs --merges or --groups (how far to merge the B's)")
    if data_path is None:
        raise ShareportError("train needs --data DATA (the examples to train on)")
    inputs = (base_dir, data_path)
    check_inputs(base_dir, data_path, pack=options.pack)
    check_output(out, overwrite, inputs)
    if not targets:
        raise ShareportError("--target needs at least one module name")
    job = scratch_job(base_dir, data_path, form, targets=targets, rank=rank, alpha=alpha, seed=options.seed,
                      max_length=options.max_length, eval_fraction=options.eval_fraction,
                      checkpoint_dir=options.checkpoint_folder(out), resume=options.resume, merging=options.merging)
    recipe = options.recipe(job.student, distill_weight=0.0, task_weight=1.0)
    entry = {"step": "train", "form": form, "data": data_path, "steps": options.steps, "seed": options.seed}
    return _train_and_write(job, recipe, out, overwrite, inputs, entry, keep=("after",),
                            own_checkpoint=options.checkpoint_dir is None)


def _train_and_write(job, recipe, out, overwrite, inputs, entry: dict, keep: tuple[str, ...],
                     own_checkpoint: bool) -> dict | None:
    """Run the recipe; the main process writes the adapter (with its history), the report (the same bytes for
    the same inputs) and the timings (which are not). With ``own_checkpoint`` (the default folder beside
    the output, not one the user named with --checkpoint-dir) the checkpoint is removed once the adapter
    is published: its only use was to resume this run."""
    _note_stale_checkpoint(job)
    adapter, report = run(job, recipe)
    if not job.accelerator.is_main_process:
        return None
    entry = {**entry, **{k: report[k] for k in keep}}
    reproducible = {k: v for k, v in report.items() if k != "timings"}
    save_adapter(with_provenance(adapter, entry), out, overwrite=overwrite, inputs=inputs,
                 reports={REPORT_NAME: reproducible, TIMINGS_NAME: report["timings"]})
    folder = job.checkpoint_dir
    if own_checkpoint and folder is not None and (Path(folder) / MARKER_NAME).is_file() \
            and (Path(folder) / STATE_JSON).is_file():
        import shutil

        shutil.rmtree(folder)
    return report


def _note_stale_checkpoint(job) -> None:
    """Say so when a fresh run starts beside the checkpoint of an interrupted one (it replaces it at its
    first checkpoint): the user may have meant --resume."""
    folder = job.checkpoint_dir
    if job.resume_state is not None or folder is None or not (Path(folder) / STATE_JSON).is_file():
        return
    try:
        step = json.loads((Path(folder) / STATE_JSON).read_text(encoding="utf-8")).get("step")
    except (OSError, json.JSONDecodeError):
        step = None
    if job.accelerator.is_main_process:
        print(f"note: {folder} holds the checkpoint of an interrupted run (step {step}); this run starts at step 0 "
              "and replaces it. To continue that run instead, rerun with --resume.", file=sys.stderr)


def export(adapter_dir: str, base_dir: str, out: str, options: ExportOptions = ExportOptions(), *,
           verify: bool = True, atol: float = FP32_ATOL, rtol: float = FP16_RTOL, overwrite: bool = False,
           allow_pickle: bool = False, progress: bool = True) -> dict:
    """Export, verify in the temporary folder, publish: a mismatch publishes nothing (``VerifyMismatch``)."""
    result = export_graph(adapter_dir, base_dir, out, options, overwrite=overwrite, progress=progress,
                          allow_pickle=allow_pickle, verify=verify, atol=atol, rtol=rtol)
    summary = {"graph": out, "mode": options.mode, "dtype": options.dtype, "with_past": options.with_past,
               "embedded_adapter": options.embed_adapter, "genai_config": result.genai_config}
    members = _fleet_member_files(adapter_dir, out, options.dtype) if options.mode == "adapter" else []
    if members:
        summary["fleet_members"] = members
    return {**summary, "verify": result.report.to_dict() if result.report else None}


def _fleet_member_files(adapter_dir: str, out: str, dtype: str) -> list[dict]:
    """Per fleet member: its ``.onnx_adapter`` (cores, and carried tensors where the graph takes them)
    against its plain LoRA's tensors in that dtype (with the same carried tensors, which a PEFT LoRA holds too)."""
    from .files.fleet import fleet_members

    members = fleet_members(load_adapter(adapter_dir))
    if not members:
        return []  # not a fleet's graph: its metadata need not be read (a whole graph, without external data)
    takes_carried = bool(graph_inputs(graph_file.read_info(graph_file.load_proto(out), out)))
    rows = []
    for name, folder in members.items():
        path = Path(out) / graph_file.member_adapter_name(name)
        if path.is_file():
            member = load_adapter(folder)
            lora = member.provenance.get("source_parameters") or 0
            if takes_carried:
                lora += sum(t.numel() for t in member.extra_tensors.values())
            rows.append({"member": name, "file": str(path), "bytes": path.stat().st_size,
                         "plain_lora_bytes": lora * (2 if dtype == "fp16" else 4)})
    return rows


def verify(graph_dir: str, base_dir: str, adapter_dir: str, *, atol: float = FP32_ATOL, rtol: float = FP16_RTOL,
           allow_pickle: bool = False) -> Report:
    return verify_graph(graph_dir, base_dir, adapter_dir, atol=atol, rtol=rtol, allow_pickle=allow_pickle)


def export_adapter(adapter_dir: str, graph_dir: str, out: str | None = None, *, overwrite: bool = False,
                   allow_pickle: bool = False) -> dict:
    """An ``.onnx_adapter`` of ``adapter_dir`` for the graph in ``graph_dir`` (refuses one that does not fit).

    ``adapter_dir`` may also be an ``.onnx_adapter`` file (e.g. Olive's, whose ``.weight`` name
    suffix is mapped to the graph's names): it is checked and rewritten for the graph.
    """
    proto = graph_file.load_proto(graph_dir)
    info = graph_file.read_info(proto, graph_dir)  # refuses a graph shareport did not write
    slots = graph_file.graph_slots(proto)
    note = ""
    if Path(adapter_dir).is_file():
        arrays, note = match_names(read_onnx_adapter(adapter_dir), slots, str(adapter_dir))
        check_fits(arrays, slots, what=f"{adapter_dir}:")
    else:
        adapter = load_adapter(adapter_dir, allow_pickle=allow_pickle)
        check_fleet_member(info, adapter, str(adapter_dir))  # a fleet's graph holds its shared basis
        check_baked(info, adapter, str(adapter_dir), proto=proto, folder=graph_dir)  # and maybe another's head
        arrays = adapter_arrays(adapter, slots, what=f"{adapter_dir}:", carried=graph_inputs(info), graph_info=info)
    name = Path(adapter_dir).resolve().name
    path = Path(out) if out else Path(graph_dir) / (name if name.endswith(".onnx_adapter") else f"{name}.onnx_adapter")
    save_onnx_adapter(arrays, path, overwrite=overwrite, inputs=[adapter_dir])
    first = next(iter(arrays.values()))
    return {"output": str(path), "tensors": len(arrays), "parameters": sum(a.size for a in arrays.values()),
            "dtype": str(first.dtype), "note": note}


def generate(graph_dir: str, prompt: str, adapters: list[str] | tuple = (), *, max_new_tokens: int = 32,
             engine: str = "auto", no_adapter: bool = False) -> dict:
    """Greedy text from a with-past export, once per adapter (onnxruntime-genai, else ONNX Runtime)."""
    return generate_text(graph_dir, prompt, adapters, max_new_tokens=max_new_tokens, engine=engine,
                         no_adapter=no_adapter)


def doctor() -> dict:
    """Versions of torch, transformers, ONNX Runtime (and genai), providers that work, clashes."""
    return doctor_report()


def frontier(lora_dir: str, base_dir: str, data_path: str, out: str, *, eval_path: str | None = None,
             budgets=DEFAULT_BUDGETS, forms=FORMS, recover_steps: int = 0, keep: float = 0.99,
             options: TrainingOptions = TrainingOptions(), overwrite: bool = False, progress: bool = True,
             serving=()) -> dict:
    """Every form at every budget, evaluated (and recovered) against the LoRA; a table's worth of
    points, the Pareto front, and the smallest point keeping ``keep`` of the LoRA's fidelity.
    ``serving`` ("uniform", "max-rank=R", "buckets=R1,R2"): each adds a point per form and budget, planned
    under that rule (``convert --uniform-rank`` ...), drawn as its own line.

    Finished points are kept in ``<out>.cache`` (a folder of ours), so a rerun with the same
    inputs resumes where an interrupted one stopped; the output folder appears at the end.
    """
    budgets = check_budgets(budgets)
    serving = parse_serving(serving)
    unknown = sorted(set(forms) - set(FORMS))
    if unknown or not forms:
        raise ShareportError(f"--forms: unknown form '{unknown[0] if unknown else ''}' (known: {', '.join(FORMS)})")
    if not 0 < keep <= 1:
        raise ShareportError(f"--keep must be in (0, 1], got {keep}")
    inputs = [lora_dir, base_dir, data_path] + ([eval_path] if eval_path else [])
    (lora,) = check_inputs(base_dir, data_path, (lora_dir,), pack=options.pack)
    if eval_path and not Path(eval_path).is_file():
        raise ShareportError(f"{eval_path}: evaluation file not found")
    check_output(out, overwrite, inputs)
    job = recovery_job(lora_dir, base_dir, lora_dir, data_path=data_path, max_length=options.max_length,
                       eval_fraction=options.eval_fraction, adapters=(lora, lora), eval_path=eval_path)
    cache = _PointCache(Path(f"{str(out).rstrip('/')}.cache"), {
        "lora": weights_sha256(lora_dir), "base": str(Path(base_dir).resolve()), "data": str(data_path),
        "eval": eval_path, "options": dataclasses.asdict(options)})
    reference, points = _measure_with_progress(job, lora, forms, budgets, options, recover_steps, cache, progress,
                                               serving)
    labelled = reference.get("accuracy") is not None
    front, chosen = pareto(points), smallest_keeping(points, keep)
    data = {
        "output": str(out), "lora_parameters": lora.num_parameters(), "budgets": list(budgets), "forms": list(forms),
        "recover_steps": recover_steps, "serving": list(serving), "keep": keep, "fidelity": "accuracy / LoRA accuracy" if labelled else
        "top-1 agreement with the LoRA", "lora": reference, "points": [p.to_dict() for p in points],
        "pareto": [p.to_dict() for p in front], "smallest_keeping": chosen.to_dict() if chosen else None,
    }
    with atomic_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        (tmp / "frontier.json").write_text(dump_json(data), encoding="utf-8")
        if has_matplotlib():
            labelled_points = [dataclasses.replace(p, form=p.label) for p in points]  # a line per form and rule
            plot_frontier(labelled_points, [dataclasses.replace(p, form=p.label) for p in front],
                          None if chosen is None else dataclasses.replace(chosen, form=chosen.label),
                          tmp / "frontier.png",
                          "accuracy relative to the LoRA" if labelled else "top-1 agreement with the LoRA", keep)
    if has_matplotlib():
        data["plot"] = str(Path(out) / "frontier.png")
    return data


def _measure_with_progress(job, lora, forms, budgets, options, recover_steps, cache, progress: bool, serving=()):
    """``frontier.measure`` under one bar over every point (form, budget, converting or recovering,
    elapsed time), each point's line printed as it finishes; all on stderr, nothing with ``progress``
    off (--json)."""
    from tqdm import tqdm

    with tqdm(total=stages(forms, budgets, recover_steps, serving), desc="frontier", unit="point", file=sys.stderr,
              disable=None if progress else True, dynamic_ncols=True) as bar:
        def on_stage(form: str, budget: float, what: str) -> None:
            bar.set_postfix_str(f"{form} at {budget:g}: {what}")

        def on_point(point) -> None:
            bar.update(1)
            if progress:
                bar.write(point_line(point), file=sys.stderr)

        return measure(job, lora, forms, budgets=budgets, options=options, recover_steps=recover_steps,
                       cached=cache.get, store=cache.put, on_stage=on_stage, on_point=on_point, serving=serving)


class _PointCache:
    """Finished frontier points, one JSON file each, valid only for the same inputs (``key``)."""

    def __init__(self, folder: Path, key: dict):
        self.folder = folder
        self.key = hashlib.sha256(dump_json(key).encode()).hexdigest()[:16]

    def get(self, name: str):
        path = self.folder / f"{self.key}-{name}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def put(self, name: str, data) -> None:
        if not self.folder.exists():
            self.folder.mkdir(parents=True)  # -o new/x: the parents are made as for every output
            (self.folder / MARKER_NAME).write_text(MARKER_TEXT, encoding="utf-8")
        elif not (self.folder / MARKER_NAME).is_file():
            raise ShareportError(f"{self.folder}: a folder shareport did not write is where the frontier keeps its "
                                 "cache; move it away")
        with atomic_file(self.folder / f"{self.key}-{name}.json", overwrite=True,
                         owned=lambda p: True) as tmp:  # our cache folder, our files
            tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")


def fleet(lora_dirs: list[str], out: str, *, form: str | None = None, rank: int | None = None,
          budget: float | None = None, overwrite: bool = False, allow_pickle: bool = False,
          calibration: list[str] | tuple | str = (), base: str | None = None,
          clusters: int | str = DEFAULT_FLEET_CLUSTERS) -> dict:
    """Compress N LoRAs of one base into a fleet folder: ``shared.safetensors`` once, one member folder each.

    ``lora_dirs``: folders, or ``NAME=PATH`` to name a member; the others take their shortest
    distinct path suffix (``files.fleet.member_names``). ``form`` None: the form with the least
    error at the budget (``fleet.build_fleet``). ``calibration`` (with ``base``): data files as
    ``finetune`` reads them, one ``FILE`` for every member and/or ``NAME=FILE`` per member; each
    member's statistics are measured with its own LoRA attached on its own data, and its cores fit
    to them (``CALIBRATION_SAMPLES`` examples of at most ``CALIBRATION_MAX_LENGTH`` tokens, ridge
    ``converters.DEFAULT_RIDGE``, as ``convert`` defaults). ``clusters``: a number of clusters with a
    basis each, or "auto" (``fleet.build_fleet``).

    Every input is read and checked (names, same base, sites and shapes; no adapter given twice, by
    folder or by bytes) before the output is checked, and both before the work; the folder appears
    whole or not at all. The report: per member its relative error and stored parameters, the
    shared basis, the total against the N separate LoRAs (parameters and bytes), the candidates when
    the form was chosen, and a warning per member keeping under half its energy.
    """
    calibration = [calibration] if isinstance(calibration, str) else list(calibration)
    if calibration and base is None:
        raise ShareportError("--calibration needs --base (the model to run the data through)")
    if base is not None and not calibration:
        raise ShareportError("--base is only used with --calibration DATA")
    named = member_names([str(d) for d in lora_dirs])
    cluster_counts(clusters, len(named), rank=rank, calibrated=bool(calibration))  # refused before any read
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
    result = build_fleet(adapters, names, form, rank=rank, budget=budget, calibration=stats, clusters=clusters)
    report = result.report.to_dict()
    save_fleet(result, out, overwrite=overwrite, inputs=inputs, reports={FLEET_REPORT_NAME: report})
    lora_bytes = [adapter_file_size(d) for d in paths]
    member_bytes = [adapter_file_size(Path(out) / n) for n in names]
    shared_bytes = (Path(out) / SHARED_NAME).stat().st_size
    for member, size, source in zip(report["members"], member_bytes, lora_bytes):
        member.update(bytes=size, lora_bytes=source)
    data = {"output": str(out), **report, "shared_bytes": shared_bytes, "bytes": shared_bytes + sum(member_bytes),
            "lora_bytes": sum(lora_bytes)}
    if stats is not None:  # not in the written report: the same input must give the same bytes
        data["calibration"] = {**data["calibration"], "seconds": seconds}
    return data


def fleet_add(fleet_dir: str, lora_dir: str, *, out: str | None = None, max_error: float | None = None,
              overwrite: bool = False, allow_pickle: bool = False) -> dict:
    """Add one LoRA to a fleet folder: ``fleet_add.add_member`` (projected onto the bases, which grow
    only when its error is over the target), written over ``fleet_dir`` in one atomic step, or to
    ``out`` (then ``fleet_dir`` is left as it is).

    ``lora_dir``: a folder, or ``NAME=PATH``; without a name the member takes its folder's name.
    Everything is read and checked first (every member, so a changed shared file is refused; the
    name; base, sites and shapes; the output), then the fleet is grown and written. In place, a
    folder holding anything besides the fleet is refused (replacing it would delete that). The
    report is the fleet's, each member with its error, plus ``added`` (the new member's error
    before and after, the target and its rule, the kinds grown) and ``rewritten`` (the files that
    changed)."""
    name, path = split_named(str(lora_dir))
    name = name if name is not None else Path(os.path.abspath(path)).name
    check_member_name(name, str(lora_dir))
    loaded = load_fleet(fleet_dir, allow_pickle=allow_pickle)
    if name in loaded.members:
        raise ShareportError(f"{lora_dir}: the fleet {fleet_dir} already has a member '{name}'; name the new one "
                             "with NAME=PATH")
    adapter = load_adapter(path, allow_pickle=allow_pickle)
    target = Path(out if out is not None else fleet_dir)
    if out is None:
        if loaded.foreign:
            raise ShareportError(f"{fleet_dir}: holds '{loaded.foreign[0]}', which is not part of the fleet; "
                                 "fleet-add replaces the folder whole: move it out, or write the grown fleet "
                                 "elsewhere with -o")
        if not (Path(fleet_dir) / MARKER_NAME).is_file():
            raise ShareportError(f"{fleet_dir}: has no {MARKER_NAME} marker, so shareport did not write it; "
                                 "write the grown fleet elsewhere with -o")
        check_output(target, True, [path])
    else:
        check_output(target, overwrite, [path, fleet_dir])
    fleet = read_fleet(loaded.members, loaded.report, str(Path(fleet_dir) / FLEET_REPORT_NAME))
    added = add_member(fleet, adapter, name, max_error=max_error)
    unchanged = [SHARED_NAME, *fleet.names] if added.unchanged else []
    report = added.fleet.report.to_dict()
    save_fleet(added.fleet, target, overwrite=out is None or overwrite,
               inputs=[path] if out is None else [path, fleet_dir], reports={FLEET_REPORT_NAME: report},
               previous=Path(fleet_dir), unchanged=unchanged)
    rewritten = [f"{name}/"] + ([] if added.unchanged else [SHARED_NAME, *(f"{n}/" for n in fleet.names)])
    new = report["members"][-1]
    return {"output": str(target), **report, "rewritten": [*rewritten, FLEET_REPORT_NAME],
            "added": {"member": name, "relative_error": new["relative_error"], **report["additions"][-1],
                      "warnings": report["warnings"][len(fleet.report.warnings):]}}


def _calibration_files(args: list[str], names: list[str]) -> list[str]:
    """Per member its data file: its own ``NAME=FILE``, else the one plain ``FILE`` (shared by the rest)."""
    shared, own = None, {}
    for arg in args:
        name, path = split_named(arg)
        if name is None:
            if shared is not None:
                raise ShareportError(f"--calibration {arg}: a second file for every member (the first is {shared}); "
                                     "give one FILE for all, and NAME=FILE for members with their own")
            shared = path
        elif name not in names:
            raise ShareportError(f"--calibration {arg}: no member is named '{name}' (members: {', '.join(names)})")
        elif name in own:
            raise ShareportError(f"--calibration {arg}: member '{name}' already has {own[name]}")
        else:
            own[name] = path
    missing = [n for n in names if n not in own and shared is None]
    if missing:
        raise ShareportError(f"--calibration: member '{missing[0]}' has no data: give NAME=FILE for it, or one "
                             "FILE for every member without its own")
    return [own.get(n, shared) for n in names]


def _fleet_statistics(adapters, data_files: list[str], base_dir: str):
    """Per member the input statistics of its own data with its own LoRA attached, in the fleet's bases
    (``fleet.fleet_bases``: one basis per kind for every member). Returns (one ``Calibration`` per
    member, seconds spent running the base)."""
    import time

    import torch

    from .model import load_base_model
    from .model.calibration import collect_statistics
    from .train.data import SAMPLE_SEED, load_data, pad_token_id, sample_examples

    bases = fleet_bases(adapters)
    drawn = {path: sample_examples(load_data(path, base_dir, CALIBRATION_MAX_LENGTH), CALIBRATION_SAMPLES)
             for path in dict.fromkeys(data_files)}  # every file read (and refused) before the slow part
    out, seconds = [], 0.0
    for adapter, path in zip(adapters, data_files):
        sequences = drawn[path].sequences
        model = load_base_model(base_dir, adapter.task_type, carried=adapter.extra_tensors)  # its own head
        started = time.perf_counter()
        with torch.no_grad():
            stats = collect_statistics(model, adapter, sequences, pad_token_id(model.config), where=str(base_dir),
                                       bases={kind: ([s.path for s in sites], bases[kind])
                                              for kind, sites in adapter.kinds().items()})
        seconds += time.perf_counter() - started
        info = {"data": str(path), "base": str(base_dir), "samples": len(sequences), "sample_seed": SAMPLE_SEED,
                "tokens": sum(len(seq) for seq in sequences), "max_length": CALIBRATION_MAX_LENGTH}
        out.append(Calibration(stats.statistics, DEFAULT_RIDGE, info))
    return out, seconds
