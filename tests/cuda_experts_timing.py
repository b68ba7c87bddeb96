"""Timing of the CUDA `experts` op at the DeepSeek-V2-Lite layer shape against its floors.

Run on a GPU: `python tests/cuda_experts_timing.py [--json out.json]`. Not a test (pytest does not
collect it); the one-command benchmark of the project lives in bench/. Floors, as in
../shared/ANCHORS.md: bw_floor = distinct experts touched x 3*H*I*2 bytes / copy bandwidth
measured in this run; mm_floor = 6*T*K*H*I / bf16 matmul rate measured in this run. Each time
is the median of CUDA-graph replays timed with events, the routing (random, K distinct experts per
token) rotated among 8 sets between replays so the weights are not served from L2.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from allocmoe_ext import ops

H, I, E = 2048, 1408, 64
EXPERT_BYTES = 3 * H * I * 2


def events_ms(fn, reps):
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return times


def median(v):
    v = sorted(v)
    return v[len(v) // 2]


def copy_bandwidth():
    src = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = median(events_ms(lambda: dst.copy_(src), 10))
    return 2 * src.numel() / (ms * 1e-3)


def matmul_rate():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    ms = median(events_ms(lambda: a @ b, 10))
    return 2 * 8192**3 / (ms * 1e-3)


def routings(T, K, nsets, gen):
    ids = [torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K].to(torch.int32).cuda() for _ in range(nsets)]
    w = [torch.rand(T, K, generator=gen).cuda() for _ in range(nsets)]
    return ids, w


def reference(x, gu, dn, w, ids):
    """fp32 per-expert loop on the GPU (a rounded to bf16, as the contract says)."""
    out = torch.zeros(x.shape[0], H, device="cuda")
    for e in ids.unique().tolist():
        if e < 0:
            continue
        t, k = (ids == e).nonzero(as_tuple=True)
        g = x[t].float() @ gu[e].float().t()
        a = (torch.nn.functional.silu(g[:, :I]) * g[:, I:]).bfloat16().float()
        out.index_add_(0, t, w[t, k, None] * (a @ dn[e].float().t()))
    return out


def time_case(T, K, path, gu, dn, gen, reps=40, nsets=8):
    os.environ["ALLOCMOE_EXPERTS_PATH"] = path
    x = torch.randn(T, H, generator=gen).bfloat16().cuda()
    id_sets, w_sets = routings(T, K, nsets, gen)
    ids, w = id_sets[0].clone(), w_sets[0].clone()
    out = ops.experts(x, gu, dn, w, ids)
    err = float((out.float() - reference(x, gu, dn, w, ids)).norm() / reference(x, gu, dn, w, ids).norm())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.experts(x, gu, dn, w, ids)
    torch.cuda.synchronize()
    times = []
    for r in range(reps + 5):
        ids.copy_(id_sets[r % nsets])
        w.copy_(w_sets[r % nsets])
        t = events_ms(graph.replay, 1)[0]
        if r >= 5:
            times.append(t)
    touched = sum(int((s.unique() >= 0).sum()) for s in id_sets) / nsets
    return median(times) * 1e3, touched, err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    bw, rate = copy_bandwidth(), matmul_rate()
    gu = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).bfloat16().cuda()
    dn = (torch.randn(E, H, I, generator=gen) / I**0.5).bfloat16().cuda()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    cases = [(1, 6), (1, 3), (4, 6), (16, 6), (32, 6), (64, 6), (128, 6), (256, 6), (512, 6), (1024, 6), (4096, 6)]
    forced = {4: ["skinny"], 16: ["skinny"], 32: ["skinny"], 64: ["decode", "prefill"], 256: ["decode", "prefill"],
              512: ["skinny", "prefill"], 1024: ["skinny"]}
    rows = []
    for T, K in cases:
        paths = ["auto"] + forced.get(T, [])
        for path in paths:
            us, touched, err = time_case(T, K, path, gu, dn, gen)
            bw_floor = touched * EXPERT_BYTES / bw * 1e6
            mm_floor = 6 * T * K * H * I / rate * 1e6
            floor = max(bw_floor, mm_floor)
            rows.append(dict(T=T, K=K, path=path, us=us, touched=touched, bw_floor_us=bw_floor, mm_floor_us=mm_floor,
                             x_floor=us / floor, rel_err=err))
    os.environ["ALLOCMOE_EXPERTS_PATH"] = "auto"
    print(f"{'T':>5} {'K':>2} {'path':>8} {'touched':>7} {'time us':>8} {'bw floor':>8} {'mm floor':>8} "
          f"{'x floor':>7} {'% floor':>7} {'rel err':>8}")
    for r in rows:
        print(f"{r['T']:>5} {r['K']:>2} {r['path']:>8} {r['touched']:>7.1f} {r['us']:>8.1f} {r['bw_floor_us']:>8.1f} "
              f"{r['mm_floor_us']:>8.1f} {r['x_floor']:>7.3f} {100 / r['x_floor']:>6.1f}% {r['rel_err']:>8.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bytes_per_s=bw, matmul_flop_per_s=rate, rows=rows),
                      f, indent=1)


if __name__ == "__main__":
    main()
