"""What the layer bench's L2 flush costs each of our decode paths, and why.

The layer bench (bench_layer.py) flushes L2 with a torch.sum over 200 MB before every timed call.
That evicts the weights (as a real decode step does), but also the kernels' code, constants and
device counters and the call's small inputs. This probe times one DeepSeek-V2-Lite layer (H=2048,
I=1408, E=64, bf16, routed only, routing from logits) at T=1 (budgets 6 and 3) and T=4 after four
different device states, each path in its own process (paths are picked by environment):

  sum       the bench's flush (torch.sum over 200 MB)
  sum+warm  the flush, then one call of the same op on a tiny layer (E=8, H=256, I=128): warms
            the code, constants and device counters, not the timed call's data
  sleep     no flush, a sleep kernel (the small inputs and the code stay in L2; the weights are
            loaded evict-first, so they mostly do not)

Paths: `ours` (route op + experts op, two stream launches), `ours_one` (the experts op's one
launch, ALLOCMOE_STREAM_LAUNCHES=one), `moe` (the fused moe op's stream kernel). Timing as in
the bench: CUDA events around one call, replayed from a CUDA graph or eager, median of 40.
`--profile` adds per-kernel device times after the flush (torch.profiler: start after the
flush's end, duration).

    python bench/cold_start_probe.py [--out bench/results/cold_start_<date>.json] [--profile]
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import capture_graph  # noqa: E402  (bench/timing.py, the layer bench's helpers)

PATHS = {
    "ours": {},
    "ours_one": {"ALLOCMOE_STREAM_LAUNCHES": "one"},
    "moe": {"ALLOCMOE_MOE_PATH": "stream"},
}
CASES = ((1, 6.0), (1, 3.0), (4, 6.0))
STATES = ("sum", "sum+warm", "sleep")
E, H, I, TOP_K = 64, 2048, 1408, 6


def layer_call(path, x, logits, gate_up, down, budget):
    from allocmoe_ext import ops  # the ops' Python wrappers own their schemas

    if path.startswith("ours"):
        w, ids = ops.route(logits, TOP_K, budget, k_base=1)
        return ops.experts(x, gate_up, down, w, ids)
    return ops.moe(x, None, gate_up, down, TOP_K, budget, k_base=1, router_logits=logits)


def measure(path, reps, profile):
    """One path, in this process: {case: {state: {mode: median us}}} (+ per-kernel profile)."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev)
    g.manual_seed(0)

    def randn(*size, std):
        return (torch.randn(*size, generator=g, device=dev) * std).to(torch.bfloat16)

    gate_up, down = randn(E, 2 * I, H, std=H**-0.5), randn(E, H, I, std=I**-0.5)
    flush_buf = torch.rand(50 * 2**20, device=dev)  # 200 MB, 4x the H100's L2
    flush_out = torch.empty((), device=dev)
    tiny = (randn(1, 256, std=1.0), torch.randn(1, 8, device=dev), randn(8, 256, 256, std=0.06),
            randn(8, 256, 128, std=0.09))
    states = {
        "sum": lambda: torch.sum(flush_buf, dim=0, out=flush_out),
        "sum+warm": lambda: (torch.sum(flush_buf, dim=0, out=flush_out), layer_call(path, *tiny, 6.0)),
        "sleep": lambda: torch.cuda._sleep(100_000),
    }
    result = {}
    for T, budget in CASES:
        inputs = [(randn(T, H, std=1.0), torch.randn(T, E, generator=g, device=dev) * 2) for _ in range(4)]
        calls = [lambda x=x, lg=lg: layer_call(path, x, lg, gate_up, down, budget) for x, lg in inputs]
        graphs = [capture_graph(call)[0] for call in calls]
        runs = {"graph": [gr.replay for gr in graphs], "eager": calls}
        row = {}
        for state, before in states.items():
            for mode, fns in runs.items():
                times = []
                for r in range(reps + 5):
                    before()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fns[r % 4]()
                    end.record()
                    torch.cuda.synchronize()
                    if r >= 5:
                        times.append(start.elapsed_time(end) * 1e3)
                row[f"{state} {mode}"] = statistics.median(times)
        if profile:
            row["profile"] = kernel_profile(states["sum"], runs["graph"])
        result[f"T={T} budget={budget:g}"] = row
    return result


def kernel_profile(flush, replays):
    """Per call after the flush: [(kernel, start after the flush's end us, duration us)]."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for r in range(8):
            flush()
            replays[r % 4]()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    calls, cur = [], None
    for e in events:
        if "reduce" in e.name.lower():  # the flush's kernel
            cur = {"end": e.time_range.end, "kernels": []}
            calls.append(cur)
        elif cur is not None and "memset" not in e.name.lower():
            cur["kernels"].append((e.name.split("(")[0][-48:], e.time_range.start - cur["end"],
                                   e.time_range.end - e.time_range.start))
    return [c["kernels"] for c in calls[4:]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="JSON file to write (default: bench/results/cold_start_<date>.json)")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--profile", action="store_true", help="also per-kernel device times after the flush")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("cold_start_probe: needs a CUDA GPU (nothing measured)")
        return 0
    if args.child:
        print("PROBE_JSON " + json.dumps(measure(args.child, args.reps, args.profile)))
        return 0
    out = {}
    for path, env in PATHS.items():
        cmd = [sys.executable, __file__, "--child", path, "--reps", str(args.reps)] + (["--profile"] if args.profile else [])
        done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("PROBE_JSON ")]
        if not lines:
            print(f"{path}: FAILED\n{done.stderr[-3000:]}")
            continue
        out[path] = json.loads(lines[0][len("PROBE_JSON "):])
    if not out:
        return 1
    print(f"{torch.cuda.get_device_name()}: median us of one call (events), by state before the call")
    print(f"{'case':18s} {'state':9s} {'mode':6s} " + " ".join(f"{p:>9s}" for p in out))
    first = next(iter(out.values()))
    for case in first:
        for key in (k for k in first[case] if k != "profile"):
            state, mode = key.split()
            print(f"{case:18s} {state:9s} {mode:6s} " + " ".join(f"{out[p][case][key]:9.1f}" for p in out))
    if args.profile:
        for case in first:
            for p in out:
                for call in out[p][case].get("profile", []):
                    print(f"{case} {p}: " + " | ".join(f"{n} +{s:.1f} for {d:.1f}" for n, s, d in call))
    date = datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"cold_start_{date}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": date, "paths": out}, f,
                  indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
