"""Steady-state decode of one MoE layer shape: N calls, each on its own layer's weights and its own
inputs, captured in ONE CUDA graph, timed per call (median over replays).

This is what a decode step through many MoE layers sees: each call's launch overlaps the previous
call's tail, and no call finds its weights in L2 (L distinct layers, L * touched bytes >> L2).
bench_layer.py times single calls after an L2 flush instead; there every call also pays the
launch gap between its start event and its first kernel (~2.5-3 us on an H100, see
docs/KERNELS.md), which a floor computed from bytes alone does not contain. Both are reported.

Paths (routing included; router logits in, routed experts only): the moe op on each of its
sm_90 paths (split, stream; ALLOCMOE_MOE_PATH), and the composition route + experts ("ours" in
bench_layer.py). The floor and the copy ceiling are bench_layer.py's, measured in this run.

    python3 bench/decode_seq.py [--shape dsv2] [--tokens 1,4] [--budgets full,50%] [--layers 4]
                                [--calls 16] [--out bench/results/decode_seq]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_layer import BUDGETS, SHAPES, Layer, alloc_t_torch, device_name, load_extension  # noqa: E402
from timing import Timer, capture_graph, measure_ceilings  # noqa: E402

PATHS = {  # name -> ALLOCMOE_MOE_PATH value (None: route + experts)
    "moe_split": "split",
    "moe_stream": "stream",
    "route+experts": None,
}


def make_call(path, layer, x, logits, top_k, budget):
    if PATHS[path] is None:
        def run():
            w, ids = torch.ops.allocmoe.route(logits, top_k, budget, 1)
            return torch.ops.allocmoe.experts(x, layer.gate_up, layer.down, w, ids)
    else:
        def run():
            return torch.ops.allocmoe.moe(x, None, layer.gate_up, layer.down, top_k, budget, router_logits=logits)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="dsv2", choices=sorted(SHAPES))
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--budgets", default="full,50%")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "decode_seq"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_seq.py needs a CUDA device")
        return 1
    err, _ = load_extension()
    if err:
        print(err)
        return 1
    dev = torch.device("cuda")
    shape = SHAPES[args.shape]
    timer = Timer(dev, reps=args.reps, warmup=3)
    ceil = measure_ceilings(timer, quick=False)
    bw = ceil["copy_bw_Bps"]
    expert_bytes = 3 * shape.hidden * shape.inter * 2
    layers = [Layer(shape, dev, seed=100 + i) for i in range(args.layers)]
    g = torch.Generator(device=dev).manual_seed(1)
    rows = []
    saved = os.environ.get("ALLOCMOE_MOE_PATH")
    for T in [int(t) for t in args.tokens.split(",")]:
        for bname in args.budgets.split(","):
            budget = BUDGETS[bname] * shape.top_k
            xs, lgs, touched = [], [], []
            for c in range(args.calls):
                x = torch.randn(T, shape.hidden, generator=g, device=dev).to(torch.bfloat16)
                lg = layers[c % args.layers].logits(x)
                _, ids = alloc_t_torch(lg, shape.top_k, budget)
                xs.append(x)
                lgs.append(lg)
                touched.append(float(torch.unique(ids[ids >= 0]).numel()))
            floor_us = sum(touched) / len(touched) * expert_bytes / bw * 1e6
            row = {"T": T, "budget": bname, "k": budget, "touched": sum(touched) / len(touched), "floor_us": floor_us,
                   "paths": {}}
            for name, env in PATHS.items():
                if env is None:
                    os.environ.pop("ALLOCMOE_MOE_PATH", None)
                else:
                    os.environ["ALLOCMOE_MOE_PATH"] = env
                calls = [make_call(name, layers[c % args.layers], xs[c], lgs[c], shape.top_k, budget)
                         for c in range(args.calls)]
                try:
                    graph, _ = capture_graph(lambda: [c() for c in calls])
                    t = timer.median_us([graph.replay], flush_l2=False)
                    per = t["median_us"] / args.calls
                    row["paths"][name] = {"us": per, "x_floor": per / floor_us,
                                          "p10_us": t["p10_us"] / args.calls, "p90_us": t["p90_us"] / args.calls}
                    del graph
                except Exception as e:  # a path that cannot run here is reported, not fatal
                    row["paths"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            rows.append(row)
    if saved is None:
        os.environ.pop("ALLOCMOE_MOE_PATH", None)
    else:
        os.environ["ALLOCMOE_MOE_PATH"] = saved

    lines = [f"# decode_seq: {shape.model}, {args.calls} calls over {args.layers} layers in one CUDA graph, "
             f"us per call (x floor)",
             f"device {device_name(dev)}; copy {ceil['copy_bw_Bps'] / 1e9:.0f} GB/s, "
             f"read {ceil['read_bw_Bps'] / 1e9:.0f} GB/s, matmul {ceil['matmul_flops'] / 1e12:.0f} TFLOP/s", "",
             "| T | budget | touched | floor us | " + " | ".join(PATHS) + " |",
             "|---|---|---|---|" + "---|" * len(PATHS)]
    for r in rows:
        cells = []
        for name in PATHS:
            p = r["paths"][name]
            cells.append(f"{p['us']:.1f} ({p['x_floor']:.3f}x)" if "us" in p else "error")
        lines.append(f"| {r['T']} | {r['budget']} ({r['k']:g}) | {r['touched']:.1f} | {r['floor_us']:.1f} | "
                     + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    for r in rows:
        for name, p in r["paths"].items():
            if "error" in p:
                print(f"T={r['T']} {r['budget']} {name}: {p['error']}")
    stamp = time.strftime("%Y-%m-%d_%H%M%S")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(f"{args.out}_{stamp}.json", "w") as f:
        json.dump({"shape": shape.model, "device": device_name(dev), "ceilings": ceil, "layers": args.layers,
                   "calls": args.calls, "rows": rows}, f, indent=1)
    with open(f"{args.out}_{stamp}.md", "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
