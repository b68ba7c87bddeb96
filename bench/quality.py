"""The quality table: Alloc-MoE against every baseline at every budget on the embedded model.

    python bench/quality.py                       # CPU or GPU, writes bench/results/quality.*
    python bench/quality.py --calib-seqs 4 --eval-seqs 8 --budgets 3   # quick look

Runs ``allocmoe_ext.demo.quality_study`` (profile on the stdlib calibration split, allocate,
evaluate on the stdlib evaluation split) with more text than the demo, then writes:

- ``quality.json``: everything (per-layer K_l and realised activations of every row, both
  profiles, thresholds, timings, machine and versions);
- ``quality.md``: the summary table, the per-layer allocations and the sensitivity matrix
  (the same text goes into docs/REFERENCE_MODEL.md);
- ``quality.png``: the Alloc-L sensitivity matrix and the per-layer allocations, when
  matplotlib is installed (it is optional; without it the PNG is skipped with a message).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def plot(results: dict, path: str) -> bool:
    """Sensitivity heatmap + per-layer K_l per budget. Returns False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG (pip install matplotlib to get it)")
        return False
    prof = results["profiles"].get("alloc_l")
    L, K = results["model"]["num_moe_layers"], results["model"]["top_k"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    if prof is not None:
        ax = axes[0]
        # Each layer contributes exactly one entry of its row to the DP objective, so a constant
        # per row does not change the allocation; the raw rows are dominated by such offsets (row i
        # at k=1 equals row i-1 at k=K by construction). Show what the DP compares: S[i,k]-S[i,K].
        rel = [[v - row[-1] for v in row] for row in prof["matrix"]]
        im = ax.imshow(rel, aspect="auto", cmap="viridis")
        ax.set_xticks(range(K), [str(k) for k in range(1, K + 1)])
        ax.set_yticks(range(L), [f"L{i}" for i in range(L)])
        ax.set_xlabel("experts per token k")
        ax.set_ylabel("MoE layer")
        ax.set_title("Alloc-L sensitivity S[i,k] - S[i,K]\n(S = ppl/ppl_full - 1, isolated profile)", fontsize=10)
        fig.colorbar(im, ax=ax)
    ax = axes[1]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, b in enumerate(results["budgets"]):
        for name, style in (("+Alloc-L", "-o"), ("LExI", ":x")):
            row = next((r for r in results["rows"] if r["method"] == name and r["budget_per_layer"] == b), None)
            if row is not None:
                ax.plot(range(L), row["layer_budgets"], style, color=colors[j % len(colors)],
                        label=f"{name.lstrip('+')} b={b:g}")
    ax.set_xticks(range(L), [f"L{i}" for i in range(L)])
    ax.set_ylim(0.5, K + 0.5)
    ax.set_xlabel("MoE layer (shallow to deep)")
    ax.set_ylabel("K_l (experts per token)")
    ax.set_title("chosen per-layer allocation")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(results: dict) -> str:
    from allocmoe_ext.demo import format_allocations, format_table

    v = results["verdict"]
    lines = [
        f"Reference model, {results['evaluation_tokens']} evaluation bytes, "
        f"{results['calibration_tokens']} calibration bytes (stdlib of Python {results['env']['python']}), "
        f"{results['env']['device']}.",
        "",
        format_table(results, markdown=True),
        "",
        "| budget | +Alloc-L+T | Uniform | best baseline | beats Uniform | beats best baseline |",
        "|---|---|---|---|---|---|",
    ]
    for b, r in v.items():
        lines.append(f"| b={b} | {r['alloc_l_t']:.4f} | {r['uniform']:.4f} | {r['best_baseline']} "
                     f"{r['best_baseline_bits_per_byte']:.4f} | {'yes' if r['beats_uniform'] else 'no'} | "
                     f"{'yes' if r['beats_best_baseline'] else 'no'} |")
    lines += ["", format_allocations(results, markdown=True), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-seqs", type=int, default=16, help="calibration sequences of --seq-len bytes")
    ap.add_argument("--eval-seqs", type=int, default=64, help="evaluation sequences of --seq-len bytes")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-batch", type=int, default=8, help="calibration sequences per forward")
    ap.add_argument("--eval-batch", type=int, default=8, help="evaluation sequences per forward")
    ap.add_argument("--budgets", type=float, nargs="+", default=[2, 3, 4, 5])
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quality"),
                    help="output path prefix (.json, .md, .png are appended)")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if not 2 <= args.seq_len <= 512:
        ap.error(f"--seq-len must be in [2, 512] (the model's context), got {args.seq_len}")

    import transformers

    from allocmoe_ext import data
    from allocmoe_ext.demo import _device, format_allocations, format_table, quality_study, verdict
    from allocmoe_ext.reference_model import load_reference_model

    t0 = time.perf_counter()
    dev = _device(args.device)
    model = load_reference_model(device=str(dev))
    calib = [x.to(dev) for x in data.calibration_batches(args.calib_seqs, args.seq_len, args.calib_batch)]
    evals = [x.to(dev) for x in data.evaluation_batches(args.eval_seqs, args.seq_len, args.eval_batch)]
    results = quality_study(model, calib, evals, budgets=args.budgets, methods=args.methods,
                            progress=args.progress)
    results["verdict"] = verdict(results)
    results["env"] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "stdlib": str(data.stdlib_root()),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads",
        "seq_len": args.seq_len, "calib_batch": args.calib_batch, "eval_batch": args.eval_batch,
    }
    results["timings_s"]["total_s"] = time.perf_counter() - t0

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(results))
    plotted = plot(results, args.out + ".png")
    print()
    print(format_table(results))
    print()
    print(format_allocations(results))
    print()
    for b, v in results["verdict"].items():
        print(f"b={b}: beats Uniform: {v['beats_uniform']}, beats best baseline ({v['best_baseline']}): "
              f"{v['beats_best_baseline']}")
    print(f"wrote {args.out}.json, {args.out}.md" + (f", {args.out}.png" if plotted else "")
          + f" in {results['timings_s']['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
