"""Would weighting each site's error by what the classifier's KL sees close issue 19's gap? Truncation, four ways.

    OMP_NUM_THREADS=1 python3 -m tests.benchmarks.bench_calibrated_fisher [--out /tmp/bench-calibrated]
        [--budget 0.1] [--samples 128] [--draws 2]

Not collected by pytest. The task, LoRA, base and scoring are bench_calibrated.py's (same ``--out``,
so the LoRA trained there is reused). Issue 19's objective weighs each site's output error by its
inputs only; the held-out KL it is judged by also depends on how much each output direction of each
site moves the prediction. This adds that side and measures what it buys, for per-site truncation
(the one form where both sides keep a closed form).

Per site, ``dW_l = Bt_l A_l`` with ``Bt_l = O_l T_l`` (thin QR, O_l (n_out, r)) and ``A_l^T = P_l R_l``
(thin QR, P_l (n_in, r)), so ``dW_l = O_l D_l P_l^T`` with ``D_l = T_l R_l^T`` (r, r). Two (r, r)
statistics over the calibration texts' tokens (with the LoRA attached, as the library collects):

- input:  ``S_l = P_l^T E[x x^T] P_l`` (the library's statistics, in the site's own basis);
- output: ``G_l = O_l^T E[g g^T] O_l`` with g = d log p(c | text) / d y_l, the gradient at the site's
  output y_l of the log-probability of a class c drawn from the LoRA's own prediction (``--draws``
  per text). ``E[g g^T] (x) E[x x^T]`` is the K-FAC approximation of the Fisher of the LoRA's output
  distribution, whose quadratic form is the KL to it to second order.

Each variant minimises ``tr(G_l E S_l E^T)``, E = D_l - D'_l, at rank k per site:
``D' = G^{-1/2} trunc_k(G^{1/2} D S^{1/2}) S^{-1/2}`` (both damped by 1% of their mean eigenvalue, as the
library damps S), with per-rank decreases the squared singular values of ``G^{1/2} D S^{1/2}``; the
library's planner (converters.truncate) spends the budget across all sites on those decreases.
Variants: plain (G = S = I: the library's plain truncation), input (S only: its calibrated
truncation), output (G only), fisher (both).

Prints one table (held-out KL to the LoRA, agreement, accuracy, parameters) and as its last line the
KL of input and fisher relative to plain. Measured 2026-11-30 at 10%, KL relative to plain (0.3325):
with all 1,349 train texts (``--samples 5000``, 2 draws) input 0.73x, fisher 0.64x (output alone 0.97x);
with the library's default 128 texts input 0.74x, fisher 0.88x (0.84x with 8 draws): the output
statistics need far more data than the input ones, and even with all of it the gain is short of the
0.5x issue 19 asks. Not adopted in the library for that reason.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from converters.calibration import damp, psd_roots
from converters.truncate import plan_from_spectra
from shareport.adapter import Adapter
from shareport.convert import kind_factors
from shareport.model import attach, load_base_model
from shareport.train.data import collate, load_data, pad_token_id, sample_examples
from tests.benchmarks import bench_calibrated as calibrated  # first: sets the offline environment

F64 = torch.float64
RIDGE = 1e-2
VARIANTS = {"plain": (False, False), "input": (True, False), "output": (False, True), "fisher": (True, True)}


def site_bases(lora) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per site: O (n_out, r), P (n_in, r) orthonormal, and D (r, r) with dW = O D P^T."""
    out = {}
    for sites in lora.kinds().values():
        As, Bts = kind_factors(lora, sites)
        for site, a, bt in zip(sites, As, Bts):
            o, t = torch.linalg.qr(bt.to(F64), mode="reduced")
            p, r = torch.linalg.qr(a.to(F64).T, mode="reduced")
            out[site.path] = (o, p, t @ r.T)
    return out


def statistics(ctx, bases, samples: int, draws: int) -> tuple[dict, dict, int]:
    """S_l, G_l (see the module doc) and the number of texts: ``samples`` calibration texts drawn as
    the library draws them."""
    lora = ctx.lora
    data = sample_examples(load_data(ctx.calibration, ctx.base, ctx.f.max_length), samples)
    model = load_base_model(ctx.base, lora.task_type, carried=lora.extra_tensors)
    for param in model.parameters():
        param.requires_grad_(True)  # so every site's output carries a gradient
    attached = attach(model, lora, dtype=torch.float32)
    s = {path: torch.zeros(p.shape[1], p.shape[1], dtype=F64) for path, (_, p, _) in bases.items()}
    g = {path: torch.zeros(o.shape[1], o.shape[1], dtype=F64) for path, (o, _, _) in bases.items()}
    tokens = [0]
    mask_now = {}

    def hook_for(path):
        o, p, _ = bases[path]

        def on_grad(grad):
            # padded positions reach nothing downstream: their gradient is zero, they add nothing
            y = grad.reshape(-1, grad.shape[-1]).to(F64) @ o  # (positions, r)
            g[path] += y.T @ y

        def hook(module, args, output):
            x = args[0].detach()[mask_now["mask"]].to(F64) @ p  # (tokens, r): padding left out
            s[path] += x.T @ x
            output.register_hook(on_grad)

        return hook

    handles = [attached.wrappers[path].register_forward_hook(hook_for(path)) for path in bases]
    pad = pad_token_id(model.config)
    draw = torch.Generator().manual_seed(0)
    try:
        for start in range(0, len(data), 16):
            batch = collate(data, list(range(start, min(start + 16, len(data)))), pad)
            mask = batch["attention_mask"]
            mask_now["mask"] = mask.bool()
            tokens[0] += int(mask.sum())
            logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            for d in range(draws):
                classes = torch.multinomial(log_probs.detach().exp(), 1, generator=draw)  # (batch, 1)
                model.zero_grad(set_to_none=True)
                log_probs.gather(1, classes).sum().backward(retain_graph=d < draws - 1)
    finally:
        for handle in handles:
            handle.remove()
        attached.detach()
    return (
        {path: m / tokens[0] for path, m in s.items()},
        {path: m / (len(data) * draws) for path, m in g.items()},
        len(data),
    )


def truncated(ctx, bases, s, g, use_input: bool, use_output: bool, budget: float) -> Adapter:
    """Per-site weighted truncation with the budget spent across sites on the weighted spectra."""
    lora = ctx.lora
    spectra, shapes, ranks, parts = {}, {}, {}, {}
    for kind, sites in lora.kinds().items():
        spectra[kind], parts[kind] = [], []
        for site in sites:
            o, p, d = bases[site.path]
            eye = torch.eye(d.shape[0], dtype=F64)
            s_root, s_inv = psd_roots(damp(s[site.path], RIDGE)) if use_input else (eye, eye)
            g_root, g_inv = psd_roots(damp(g[site.path], RIDGE)) if use_output else (eye, eye)
            u, sigma, vh = torch.linalg.svd(g_root @ d @ s_root)
            spectra[kind].append(sigma.square())
            parts[kind].append((o @ g_inv @ (u * sigma), vh @ s_inv @ p.T))  # B (n_out, r), A (r, n_in)
        shapes[kind] = (bases[sites[0].path][0].shape[0], bases[sites[0].path][1].shape[0])
        ranks[kind] = [bases[site.path][2].shape[0] for site in sites]
    plan = plan_from_spectra(spectra, shapes, ranks, budget=budget)
    factors = {}
    for kind, sites in lora.kinds().items():
        for site, k, (b, a) in zip(sites, plan.kinds[kind].ranks, parts[kind]):
            if k:
                factors[site.path] = (a[:k].float(), b[:, :k].float(), 1.0)
    return Adapter.from_factors(
        factors, task_type=lora.task_type, extra_tensors=dict(lora.extra_tensors), config=dict(lora.config)
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-calibrated"))
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--samples", type=int, default=calibrated.Settings.samples)
    parser.add_argument("--draws", type=int, default=2, help="classes drawn per text for the output statistics")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = calibrated.Context(args.out, calibrated.Settings(samples=args.samples, cap=0))
    bases = site_bases(ctx.lora)
    started = time.perf_counter()
    s, g, texts = statistics(ctx, bases, args.samples, args.draws)
    seconds = time.perf_counter() - started
    rows = {}
    for name, (use_input, use_output) in VARIANTS.items():
        adapter = truncated(ctx, bases, s, g, use_input, use_output, args.budget)
        rows[name] = {**calibrated.frontier.score(ctx.job(), adapter, ctx.f), "parameters": adapter.num_parameters()}
    print(
        f"truncation at {args.budget:.0%} of the LoRA, {texts:,} calibration texts, {args.draws} draws; "
        f"statistics (input and output, with a backward pass per draw) {seconds:.1f} s"
    )
    print(f"{'weights':<8}  {'KL to LoRA':>10}  {'agree':>6}  {'acc':>6}  {'params':>7}")
    for name, row in rows.items():
        print(
            f"{name:<8}  {row['kl']:>10.4f}  {row['top1_agreement']:>6.3f}  {row['accuracy']:>6.3f}  "
            f"{row['parameters']:>7,}"
        )
    plain = rows["plain"]["kl"]
    print(
        f"KL relative to plain truncation at {args.budget:.0%}: input {rows['input']['kl'] / plain:.3f}, "
        f"fisher {rows['fisher']['kl'] / plain:.3f}"
    )
    return rows


if __name__ == "__main__":
    main()
