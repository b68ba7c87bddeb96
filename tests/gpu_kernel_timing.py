"""Times the CUDA route and the fused decode moe on the GPU (run by tests/run_gpu_checks.sh).

    python3 tests/gpu_kernel_timing.py OUT_DIR [all|route|moe]

route: latency of one call per CUDA graph (as bench/bench_layer.py measures it), every path
and budget, next to the floor of any single kernel timed the same way.
moe ceiling: device-to-device copy bandwidth (bytes read + written), measured in the same run.
Floor of a decode MoE layer: distinct experts touched x bytes per expert / copy bandwidth.
Every moe timing rotates over NL layers with their own weights (NL x 64 experts, far beyond L2)
and runs from a CUDA graph; the figure is the median over replays / calls per replay.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import torch

from allocmoe_ext import ops


def graph_time_us(fn, calls_per_graph, replays=30):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls_per_graph)
    return statistics.median(times)


def graph_latency_us(fn, inputs, reps=60):
    """Median device time of one fn(x) per CUDA graph replay, with a sleep kernel queued first
    (as bench/timing.py does) so the start event fires after the graph is already queued."""
    graphs = []
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for x in inputs:
            fn(x)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=s):
                fn(x)
            graphs.append(g)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(100_000)
        a.record()
        graphs[i % len(graphs)].replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def copy_bandwidth():
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda").normal_()  # 1 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del x, y
    return 2 * (1 << 30) / statistics.median(times)


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
    parts = sys.argv[2] if len(sys.argv) > 2 else "all"
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name()}
    bw = copy_bandwidth()
    results["copy_bw_TBps"] = bw / 1e12
    print(f"device {results['device']}, copy bandwidth {bw / 1e12:.3f} TB/s (read + write)")

    if parts in ("all", "route"):
        route_timings(results)
    if parts in ("all", "moe"):
        moe_timings(results, bw)
    with open(os.path.join(out_dir, "kernel_timing.json"), "w") as f:
        json.dump(results, f, indent=1)


def route_timings(results):
    # route alone: DeepSeek-V2-Lite routing (E=64, top_k=6, k_base=1), Alloc-T at every budget of
    # the issue-4 bar, timed like bench/bench_layer.py --only route: one call per CUDA graph, a
    # sleep kernel before it (the graph launch is not counted), median over rotating inputs. The
    # same for a one-element fill: the floor any single kernel pays when timed this way.
    floor = graph_latency_us(lambda x: x.fill_(0.0), [torch.empty(1, device="cuda") for _ in range(4)])
    results["single_kernel_floor_us"] = floor
    print(f"single-kernel floor (1-element fill): {floor:6.2f} us")
    rows = []
    for path in ("auto", "warp", "block", "multi"):
        os.environ["ALLOCMOE_ROUTE_PATH"] = path
        for T in (1, 4, 16, 64, 128, 256, 1024, 4096):
            if path != "auto" and T not in (16, 64, 128, 256):
                continue
            logits = [torch.randn(T, 64, device="cuda") * 2.0 for _ in range(4)]
            for budget in (6.0, 4.5, 3.0, 2.0):
                us = graph_latency_us(lambda x: ops.route(x, 6, budget, 1), logits)
                rows.append({"path": path, "T": T, "budget": budget, "route_us": us})
                print(f"route {path:5s} T={T:5d} E=64 top_k=6 budget={budget}: {us:7.2f} us")
    os.environ["ALLOCMOE_ROUTE_PATH"] = "auto"
    results["route"] = rows


def moe_timings(results, bw):
    # fused moe: DeepSeek-V2-Lite shape, bf16, routed experts only
    H, I, E, NL = 2048, 1408, 64, 8
    bytes_per_expert = 3 * H * I * 2
    layers = []
    for _ in range(NL):
        layers.append(dict(
            router_weight=(torch.randn(E, H, device="cuda") / H**0.5).bfloat16(),
            gate_up=(torch.randn(E, 2 * I, H, device="cuda") / H**0.5).bfloat16(),
            down=(torch.randn(E, H, I, device="cuda") / I**0.5).bfloat16(),
        ))
    rows = []
    for T, budget in ((1, 6.0), (1, 3.0), (4, 6.0), (4, 3.0), (16, 6.0), (16, 3.0)):
        hs = [torch.randn(T, H, device="cuda").bfloat16() for _ in range(NL)]
        distinct = []
        for h, l in zip(hs, layers):
            logits = h.float() @ l["router_weight"].float().t()
            _, ids = ops.route(logits, 6, budget)
            distinct.append(len(set(ids[ids >= 0].tolist())))
        mean_distinct = sum(distinct) / len(distinct)
        floor_us = mean_distinct * bytes_per_expert / bw * 1e6
        us = graph_time_us(lambda: [ops.moe(h, top_k=6, budget=budget, **l) for h, l in zip(hs, layers)], NL)
        # reference path on the same GPU: route + experts ops (two launches + router matmul)
        us_unfused = None
        if T == 1:
            def unfused():
                for h, l in zip(hs, layers):
                    w, ids = ops.route(h.float() @ l["router_weight"].float().t(), 6, budget)
                    ops.experts(h, l["gate_up"], l["down"], w, ids)
            try:
                us_unfused = graph_time_us(unfused, NL)
            except Exception as exc:  # experts op may be unavailable; the fused figure stands alone
                print("unfused path failed:", exc)
        row = {"T": T, "budget": budget, "distinct_experts": mean_distinct, "floor_us": floor_us,
               "moe_us": us, "x_floor": us / floor_us, "route_experts_us": us_unfused}
        rows.append(row)
        extra = f", route+experts ops {us_unfused:.1f} us" if us_unfused else ""
        print(f"moe T={T:2d} budget={budget}: {us:7.2f} us, floor {floor_us:6.2f} us "
              f"({mean_distinct:.1f} experts), {us / floor_us:.3f}x floor{extra}")
    results["moe"] = rows


if __name__ == "__main__":
    main()
