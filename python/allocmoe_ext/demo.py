"""The main job: Alloc-MoE against every baseline on the embedded reference model.

    allocmoe demo            # or: python -m allocmoe_ext.demo

Loads the embedded byte-level DeepSeek-V2-architecture model (``reference_model``), takes
calibration and evaluation text from the local standard library (``data``), measures the
Alloc-L sensitivity profile and the LExI profile on the calibration text, allocates every
budget, and evaluates each method on the evaluation text: bits per byte, next-byte accuracy
and the realised average routed experts per token, so that every comparison is at an equal
budget. On a GPU it also times one MoE layer at each budget. Sized to finish within about five
minutes on a 2-core CPU; ``bench/quality.py`` runs the same study on more text.

Methods (budget b = average routed experts per token per MoE layer, global B = b * L):

=============  ==============================  =====================================
row            per-layer K_l                    token policy inside a layer
=============  ==============================  =====================================
Uniform        b everywhere                     top-K_l
Ascending      ramp, fewest in shallow layers   top-K_l
Descending     ramp, most in shallow layers     top-K_l
LExI           DP on the LExI output-error      top-K_l
Top-P          b everywhere (calibrated p)      smallest prefix with mass >= p
NAEE           b everywhere (calibrated beta)   drop w_j < beta * w_1
+Alloc-L       DP on the Alloc-L profile        top-K_l
+Alloc-T       b everywhere                     Alloc-T (K_base = 1)
+Alloc-L+T     DP on the Alloc-L profile        Alloc-T (K_base = 1)
=============  ==============================  =====================================

Alloc-L and LExI spend exactly B (``exact_budget``) so that rows compare at one budget; Top-P and
NAEE thresholds are calibrated per layer on the calibration text, so their realised budget on
the evaluation text is close to, not exactly, b (the table shows it).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Callable, Sequence

import torch

# (row name, allocation, token policy)
METHODS: tuple[tuple[str, str, str], ...] = (
    ("Uniform", "uniform", "topk"),
    ("Ascending", "ascending", "topk"),
    ("Descending", "descending", "topk"),
    ("LExI", "lexi", "topk"),
    ("Top-P", "uniform", "top_p"),
    ("NAEE", "uniform", "naee_skip"),
    ("+Alloc-L", "alloc_l", "topk"),
    ("+Alloc-T", "uniform", "alloc_t"),
    ("+Alloc-L+T", "alloc_l", "alloc_t"),
)
BASELINES = ("Uniform", "Ascending", "Descending", "LExI", "Top-P", "NAEE")
DEFAULT_BUDGETS = (2, 3, 4, 5)

# Sized so that the whole demo takes a few minutes on a 2-core CPU (measured: docs/REFERENCE_MODEL.md).
DEMO_CALIB_SEQS = 8
DEMO_EVAL_SEQS = 8
DEMO_SEQ_LEN = 512


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _method_table(names: Sequence[str] | None):
    if names is None:
        return list(METHODS)
    known = {m[0]: m for m in METHODS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; choose from {list(known)}")
    return [known[n] for n in names]


def _lm_row(result: dict) -> dict:
    return {"nll": result["nll"], "bits_per_byte": result["nll"] / math.log(2),
            "perplexity": result["perplexity"], "accuracy": result["accuracy"],
            "tokens": result["tokens"]}


@torch.no_grad()
def quality_study(model, calib_batches: Sequence[torch.Tensor], eval_batches: Sequence[torch.Tensor],
                  budgets: Sequence[float] = DEFAULT_BUDGETS, methods: Sequence[str] | None = None,
                  progress: bool = False, log: Callable[[str], None] = print) -> dict:
    """Profile, allocate and evaluate every method at every budget on an (un)patched model.

    ``budgets`` are average routed experts per token per MoE layer (b); each method is evaluated
    at global budget B = b * L. Returns a JSON-ready dict: model info, the full-budget
    reference, both profiles, and one row per (method, budget) with the per-layer K_l, the
    realised per-layer averages on the evaluation text, bits per byte and accuracy.
    The model is left patched, at full budget.
    """
    from . import integration
    from .plan import build_plan
    from .profiling import alloc_l_profile, evaluate_lm, lexi_profile

    table = _method_table(methods)
    integration.apply(model)
    info = integration.model_info(model)
    L, K = info["num_moe_layers"], info["top_k"]
    for b in budgets:
        if not 1 <= b <= K:
            raise ValueError(f"budgets: {b} is outside [1, top_k={K}] experts per token per layer")
    timings = {}

    def evaluate(plan) -> dict:
        integration.apply(model, plan)
        integration.reset_stats(model)
        row = _lm_row(evaluate_lm(model, eval_batches))
        realised = integration.activation_stats(model)
        row["realised_per_layer"] = realised
        row["realised"] = sum(realised) / len(realised)
        return row

    t0 = time.perf_counter()
    reference = evaluate(None)
    timings["reference_eval_s"] = time.perf_counter() - t0
    log(f"full budget ({K} of {K} experts): {reference['bits_per_byte']:.4f} bits/byte, "
        f"accuracy {reference['accuracy']:.4f} ({timings['reference_eval_s']:.1f} s per evaluation)")

    profiles = {}
    need = {alloc for _, alloc, _ in table}
    if "alloc_l" in need:
        t0 = time.perf_counter()
        profiles["alloc_l"] = alloc_l_profile(model, calib_batches, progress=progress, source="stdlib calibration split")
        timings["alloc_l_profile_s"] = time.perf_counter() - t0
        log(f"Alloc-L profile: {L * K - (L - 1)} calibration passes, {timings['alloc_l_profile_s']:.1f} s")
    if "lexi" in need:
        t0 = time.perf_counter()
        profiles["lexi"] = lexi_profile(model, calib_batches, progress=progress, source="stdlib calibration split")
        timings["lexi_profile_s"] = time.perf_counter() - t0
        log(f"LExI profile: {timings['lexi_profile_s']:.1f} s")

    rows = []
    t_rows = time.perf_counter()
    for b in budgets:
        B = float(b) * L
        for name, allocation, policy in table:
            t0 = time.perf_counter()
            plan = build_plan(info, budget=B if allocation == "uniform" else int(round(B)),
                              allocation=allocation, policy=policy, k_base=1,
                              profile=profiles.get(allocation), model=model,
                              calib_batches=list(calib_batches), exact_budget=True)
            row = evaluate(plan)
            row.update(method=name, allocation=allocation, policy=policy, budget_per_layer=float(b),
                       budget=B, layer_budgets=plan.layer_budgets,
                       thresholds=[p.threshold for p in plan.policies] if policy in ("top_p", "naee_skip") else None,
                       seconds=time.perf_counter() - t0)
            rows.append(row)
            log(f"  b={b:g} {name:<11} {row['bits_per_byte']:.4f} bits/byte  acc {row['accuracy']:.4f}  "
                f"realised {row['realised']:.3f}  K_l={_fmt_ks(plan.layer_budgets)}")
    timings["rows_s"] = time.perf_counter() - t_rows
    integration.apply(model, None)
    return {
        "model": info,
        "budgets": [float(b) for b in budgets],
        "methods": [m[0] for m in table],
        "calibration_tokens": int(sum(x.numel() for x in calib_batches)),
        "evaluation_tokens": reference["tokens"],
        "reference": reference,
        "profiles": {k: p.to_dict() for k, p in profiles.items()},
        "rows": rows,
        "timings_s": timings,
    }


def _fmt_ks(ks) -> str:
    return "[" + " ".join(f"{k:g}" for k in ks) + "]"


def _row(results: dict, method: str, b: float) -> dict | None:
    for r in results["rows"]:
        if r["method"] == method and r["budget_per_layer"] == b:
            return r
    return None


def verdict(results: dict) -> dict:
    """The issue's bar, per budget: does +Alloc-L+T beat Uniform and the best baseline (lower
    bits per byte)? Only methods present in the results count."""
    out = {}
    for b in results["budgets"]:
        ours = _row(results, "+Alloc-L+T", b)
        uni = _row(results, "Uniform", b)
        base = [r for r in (_row(results, m, b) for m in BASELINES) if r is not None]
        if ours is None or not base:
            continue
        best = min(base, key=lambda r: r["bits_per_byte"])
        out[f"{b:g}"] = {
            "alloc_l_t": ours["bits_per_byte"],
            "uniform": uni["bits_per_byte"] if uni else None,
            "best_baseline": best["method"],
            "best_baseline_bits_per_byte": best["bits_per_byte"],
            "beats_uniform": uni is not None and ours["bits_per_byte"] < uni["bits_per_byte"],
            "beats_best_baseline": ours["bits_per_byte"] < best["bits_per_byte"],
        }
    return out


def format_table(results: dict, markdown: bool = False) -> str:
    """Bits per byte, accuracy and realised experts per token of every method at every budget;
    the best (lowest bits per byte) row of each budget is marked with *."""
    budgets = results["budgets"]
    K = results["model"]["top_k"]
    ref = results["reference"]
    best = {}
    for b in budgets:
        rows = [r for r in results["rows"] if r["budget_per_layer"] == b]
        if rows:
            best[b] = min(rows, key=lambda r: r["bits_per_byte"])["method"]

    def cell(r, b):
        if r is None:
            return "-"
        mark = "*" if best.get(b) == r["method"] else " "
        return f"{r['bits_per_byte']:.4f}{mark} {100 * r['accuracy']:5.2f}% {r['realised']:.2f}"

    head = ["method"] + [f"b={b:g} (B={b * results['model']['num_moe_layers']:g})" for b in budgets]
    lines = []
    ref_cell = f"{ref['bits_per_byte']:.4f}  {100 * ref['accuracy']:5.2f}% {ref['realised']:.2f}"
    body = [[f"full ({K})", ref_cell] + [""] * (len(budgets) - 1)]
    for name in results["methods"]:
        body.append([name] + [cell(_row(results, name, b), b) for b in budgets])
    if markdown:
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] * len(head)) + "|")
        for r in body:
            lines.append("| " + " | ".join(c.strip() for c in r) + " |")
    else:
        widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
        lines += [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body]
    lines.append("cells: bits per byte (lower is better; * = best at that budget), next-byte accuracy, "
                 "realised routed experts per token per layer on the evaluation text")
    return "\n".join(lines)


def format_allocations(results: dict, markdown: bool = False) -> str:
    """Per-layer K_l of the profile-driven allocations at every budget, plus the profile."""
    lines = []
    L = results["model"]["num_moe_layers"]
    head = ["budget", "allocation"] + [f"L{i}" for i in range(L)]
    body = []
    for b in results["budgets"]:
        for name in ("+Alloc-L", "LExI", "Ascending", "Descending"):
            r = _row(results, name, b)
            if r is not None:
                body.append([f"b={b:g}", name.lstrip("+")] + [f"{k:g}" for k in r["layer_budgets"]])
    prof = results["profiles"].get("alloc_l")
    if markdown:
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] * len(head)) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in body]
    else:
        lines += ["  ".join(f"{c:>10}" if i < 2 else f"{c:>3}" for i, c in enumerate(r)) for r in [head] + body]
    if prof is not None:
        K = results["model"]["top_k"]
        lines.append("")
        lines.append(f"Alloc-L sensitivity S[layer, k] = ppl / ppl_full - 1 (calibration text, "
                     f"deeper layers at top-1 while profiling):")
        khead = ["layer"] + [f"k={k}" for k in range(1, K + 1)]
        rows = [[f"L{i}"] + [f"{v:.4f}" for v in row] for i, row in enumerate(prof["matrix"])]
        if markdown:
            lines.append("")
            lines.append("| " + " | ".join(khead) + " |")
            lines.append("|" + "|".join(["---"] * len(khead)) + "|")
            lines += ["| " + " | ".join(r) + " |" for r in rows]
        else:
            lines += ["  ".join(f"{c:>8}" for c in r) for r in [khead] + rows]
    return "\n".join(lines)


@torch.no_grad()
def layer_speed(model, budgets: Sequence[float], tokens: Sequence[int] = (1, 16, 256),
                repeats: int = 50) -> list[dict]:
    """Median time of one MoE layer (the first) under Alloc-T at every budget and the full
    budget, for a few token counts. Device events on CUDA, a host clock elsewhere."""
    from . import integration
    from .policies import TokenPolicy

    integration.apply(model)
    layer = integration.moe_layers(model)[0]
    K = layer.spec.top_k
    param = next(model.parameters())
    out = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for T in tokens:
        hidden = torch.randn(1, T, model.config.hidden_size, generator=gen).to(param.device, param.dtype)
        for b in [float(K)] + [float(x) for x in budgets]:
            layer.policy = TokenPolicy("alloc_t", b, k_base=1)
            for _ in range(3):
                layer(hidden)
            times = []
            for _ in range(repeats):
                if param.is_cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    layer(hidden)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) * 1e3)
                else:
                    t0 = time.perf_counter()
                    layer(hidden)
                    times.append((time.perf_counter() - t0) * 1e6)
            times.sort()
            out.append({"tokens": T, "budget_per_layer": b, "median_us": times[len(times) // 2]})
    layer.policy = TokenPolicy()
    return out


def run(calib_seqs: int = DEMO_CALIB_SEQS, eval_seqs: int = DEMO_EVAL_SEQS, seq_len: int = DEMO_SEQ_LEN,
        budgets: Sequence[float] = DEFAULT_BUDGETS, methods: Sequence[str] | None = None,
        device: str = "auto", json_path: str | None = None, progress: bool = False) -> dict:
    """The main job on the embedded model: profile, allocate, evaluate, print the table.

    Returns the results dict (see ``quality_study``), with ``verdict`` and, on CUDA,
    ``layer_speed`` added; ``json_path`` also writes it as JSON.
    """
    import json

    from . import data
    from .reference_model import load_reference_model

    t_start = time.perf_counter()
    dev = _device(device)
    print(f"allocmoe demo: embedded reference model on {dev}"
          f"{'' if dev.type == 'cuda' else f' ({torch.get_num_threads()} threads)'}")
    model = load_reference_model(device=str(dev))
    calib = [x.to(dev) for x in data.calibration_batches(calib_seqs, seq_len, batch_size=max(1, calib_seqs))]
    evals = [x.to(dev) for x in data.evaluation_batches(eval_seqs, seq_len, batch_size=8)]
    print(f"calibration: {sum(x.numel() for x in calib)} bytes, evaluation: {sum(x.numel() for x in evals)} "
          f"bytes of local standard-library source (disjoint files)")
    results = quality_study(model, calib, evals, budgets=budgets, methods=methods, progress=progress)
    results["verdict"] = verdict(results)
    results["data"] = {"calib_seqs": calib_seqs, "eval_seqs": eval_seqs, "seq_len": seq_len,
                       "stdlib": str(data.stdlib_root()), "python": sys.version.split()[0]}
    print()
    print(format_table(results))
    print()
    print(format_allocations(results))
    if dev.type == "cuda":
        results["layer_speed"] = layer_speed(model, budgets)
        print()
        print("one MoE layer under Alloc-T (median us):")
        for r in results["layer_speed"]:
            print(f"  T={r['tokens']:<5} b={r['budget_per_layer']:g}: {r['median_us']:.1f}")
    print()
    for b, v in results["verdict"].items():
        uniform = "" if v["uniform"] is None else (
            f" vs Uniform {v['uniform']:.4f} ({'better' if v['beats_uniform'] else 'not better'}),")
        print(f"b={b}: +Alloc-L+T {v['alloc_l_t']:.4f}{uniform} best baseline run {v['best_baseline']} "
              f"{v['best_baseline_bits_per_byte']:.4f} ({'better' if v['beats_best_baseline'] else 'not better'})")
    results["timings_s"]["total_s"] = time.perf_counter() - t_start
    print(f"done in {results['timings_s']['total_s']:.0f} s")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {json_path}")
    return results


def _add_args(p: argparse.ArgumentParser):
    p.add_argument("--calib-seqs", type=int, default=DEMO_CALIB_SEQS, help="calibration sequences")
    p.add_argument("--eval-seqs", type=int, default=DEMO_EVAL_SEQS, help="evaluation sequences")
    p.add_argument("--seq-len", type=int, default=DEMO_SEQ_LEN, help="bytes per sequence (<= 512)")
    p.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS),
                   help="average experts per token per layer (of 6)")
    p.add_argument("--methods", nargs="+", default=None, help=f"subset of {[m[0] for m in METHODS]}")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--progress", action="store_true", help="progress bars while profiling")


def _cli(args) -> int:
    if args.seq_len < 2 or args.seq_len > 512:
        raise ValueError(f"--seq-len must be in [2, 512] (the model's context), got {args.seq_len}")
    if args.calib_seqs < 1 or args.eval_seqs < 1:
        raise ValueError("--calib-seqs and --eval-seqs must be >= 1")
    run(calib_seqs=args.calib_seqs, eval_seqs=args.eval_seqs, seq_len=args.seq_len, budgets=args.budgets,
        methods=args.methods, device=args.device, json_path=args.json, progress=args.progress)
    return 0


def register_cli(subparsers) -> None:
    """Adds ``allocmoe demo`` (called by ``allocmoe_ext.cli``)."""
    p = subparsers.add_parser("demo", help="the main job: Alloc-MoE vs baselines on the embedded model")
    _add_args(p)
    p.set_defaults(func=_cli)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m allocmoe_ext.demo", description=__doc__.split("\n\n")[0])
    _add_args(p)
    try:
        return _cli(p.parse_args(argv))
    except ValueError as e:
        print(f"allocmoe demo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
