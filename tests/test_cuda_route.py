"""CUDA route vs the CPU op: ids exactly equal, weights close, on fresh random inputs.

The op has three paths (csrc/cuda/route.cu): a warp per token (one block or a thread block
cluster) and one block for small T, three kernels for large T. Besides the automatic choice,
every path is forced on the same inputs through ALLOCMOE_ROUTE_PATH (where it applies: warp
needs top_k <= 32, block a shared scratch that fits; otherwise the op falls back).
Marked `cuda`; skipped without a GPU or without a CUDA build of the extension.
"""

from __future__ import annotations

import math
import random
import zlib

import pytest
import torch

from allocmoe_ext import ops
from cuda_marks import CUDA_ONLY, poison_cache

pytestmark = CUDA_ONLY


def make_logits(T, E, kind, gen):
    if kind == "normal":
        return torch.randn(T, E, generator=gen) * 2.0
    if kind == "skewed":  # a few hot experts, tokens of very different entropy
        hot = torch.randn(E, generator=gen) * 4.0
        return torch.randn(T, E, generator=gen) * torch.rand(T, 1, generator=gen) * 6.0 + hot
    if kind == "ties":  # exact ties within and across rows, identical on any exp/sum order
        x = torch.where(torch.rand(T, E, generator=gen) < 0.3, 0.0, -30.0)
        if T > 2:
            x[T // 2] = x[0]  # duplicate rows: token-index tie-break
        return x
    if kind == "uniform":
        return torch.zeros(T, E)
    raise ValueError(kind)


def random_config(rng, E):
    top_k = rng.randint(1, min(8, E))
    k_base = rng.choice([0, 1, min(2, top_k)]) if top_k > 1 else rng.choice([0, 1])
    budget = rng.choice([float(top_k), float(k_base), rng.uniform(k_base, top_k)])
    scoring = rng.choice(["softmax", "softmax", "topk_softmax", "softmax_group", "sigmoid_group"])
    cfg = dict(top_k=top_k, budget=budget, k_base=k_base, scoring=scoring,
               norm_topk_prob=rng.random() < 0.5, routed_scaling_factor=rng.choice([1.0, 2.5]))
    if scoring in ("softmax_group", "sigmoid_group"):
        n_group = next(g for g in (8, 4, 2, 1) if E % g == 0)
        size = E // n_group
        topk_group = max(1, min(n_group, math.ceil(top_k / size) + rng.randint(0, 1)))
        cfg.update(n_group=n_group, topk_group=topk_group)
    return cfg


def check_against_cpu(logits_cpu, cfg, bias_cpu=None, dtype=torch.float32):
    x = logits_cpu.to(dtype)
    kw = dict(cfg)
    if bias_cpu is not None:
        kw["correction_bias"] = bias_cpu
    w_ref, ids_ref = ops.route(x, **kw)
    if bias_cpu is not None:
        kw["correction_bias"] = bias_cpu.cuda()
    poison_cache()
    w, ids = ops.route(x.cuda(), **kw)
    torch.cuda.synchronize()
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert not torch.isnan(w).any(), "unwritten or NaN weights"
    assert torch.equal(ids.cpu(), ids_ref), f"ids differ for {cfg}"
    torch.testing.assert_close(w.cpu(), w_ref, rtol=2e-5, atol=1e-6)


CASES = [(T, E) for T in (0, 1, 2, 3, 7, 16, 64, 129, 1000, 4096) for E in (8, 60, 64, 128, 256)]


@pytest.mark.parametrize("T,E", CASES)
@pytest.mark.parametrize("kind", ["normal", "skewed", "ties", "uniform"])
def test_route_matches_cpu(T, E, kind):
    seed = zlib.crc32(f"{T}-{E}-{kind}".encode())
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = random_config(rng, E)
    bias = None
    if cfg["scoring"] == "sigmoid_group":
        bias = (torch.randint(0, 3, (E,), generator=gen) * 0.25).float()
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])
    check_against_cpu(make_logits(T, E, kind, gen), cfg, bias, dtype)


@pytest.mark.parametrize("path", ["auto", "warp", "block", "multi"])
@pytest.mark.parametrize("T", [1, 5, 33, 64, 300])
@pytest.mark.parametrize("top_k", [1, 2, 6, 8])
def test_route_budget_sweep(T, top_k, path, monkeypatch):
    monkeypatch.setenv("ALLOCMOE_ROUTE_PATH", path)
    gen = torch.Generator().manual_seed(T * 31 + top_k)
    logits = make_logits(T, 64, "skewed", gen)
    for k_base in sorted({0, 1, top_k}):
        if k_base > top_k:
            continue
        for budget in (k_base, (k_base + top_k) / 2, k_base + 0.37 * (top_k - k_base), top_k):
            check_against_cpu(logits, dict(top_k=top_k, budget=budget, k_base=k_base))


# Every values-per-lane variant (E <= 32, 64, 128, 256), every scoring, every path on the same
# inputs; warp path: one block (T <= 16), clusters of 3..8 blocks of 8 warps (T <= 64) and of
# up to 32 warps (T > 64), a last block with idle warps.
@pytest.mark.parametrize("path", ["warp", "block", "multi"])
@pytest.mark.parametrize("E", [20, 32, 60, 64, 100, 128, 256])
@pytest.mark.parametrize("T", [1, 2, 8, 9, 16, 17, 31, 64, 65, 200, 256])
def test_route_paths_match_cpu(T, E, path, monkeypatch):
    monkeypatch.setenv("ALLOCMOE_ROUTE_PATH", path)
    seed = zlib.crc32(f"paths-{T}-{E}".encode())
    gen = torch.Generator().manual_seed(seed)
    logits = make_logits(T, E, "skewed", gen)
    n_group = 4 if E % 4 == 0 else 2
    bias = (torch.randint(0, 3, (E,), generator=gen) * 0.25).float()
    top_k = min(8, E // 4)
    for scoring in ("softmax", "topk_softmax", "softmax_group", "sigmoid_group"):
        cfg = dict(top_k=top_k, budget=top_k * 0.45 + 0.3, k_base=1, scoring=scoring,
                   norm_topk_prob=scoring != "softmax", routed_scaling_factor=2.5)
        if scoring.endswith("_group"):
            cfg.update(n_group=n_group, topk_group=2)
        check_against_cpu(logits, cfg, bias if scoring == "sigmoid_group" else None)
    for kind in ("ties", "uniform"):
        check_against_cpu(make_logits(T, E, kind, gen), dict(top_k=top_k, budget=top_k / 2, k_base=1))


def test_route_bad_path_variable(monkeypatch):
    monkeypatch.setenv("ALLOCMOE_ROUTE_PATH", "fast")
    with pytest.raises(RuntimeError, match="ALLOCMOE_ROUTE_PATH"):
        ops.route(torch.randn(4, 64, device="cuda"), 6, 3.0)


@pytest.mark.parametrize("path", ["auto", "block", "multi"])
def test_route_large_topk(path, monkeypatch):
    monkeypatch.setenv("ALLOCMOE_ROUTE_PATH", path)
    gen = torch.Generator().manual_seed(7)
    for T, E, K in ((3, 256, 200), (40, 100, 100), (300, 256, 32), (9, 64, 17), (70, 128, 33), (5, 64, 20),
                    (40, 128, 24)):
        check_against_cpu(make_logits(T, E, "normal", gen), dict(top_k=K, budget=K / 2, k_base=1))


def test_route_nonfinite_no_crash_and_validation():
    x = torch.randn(8, 64, device="cuda")
    x[3, 5] = float("nan")
    w, ids = ops.route(x, 6, 4.0)
    torch.cuda.synchronize()
    assert torch.isnan(w[3]).any()
    assert torch.isfinite(w[torch.arange(8) != 3]).all()
    assert ((ids >= -1) & (ids < 64)).all()
    ops.set_validation(True)
    try:
        with pytest.raises(RuntimeError, match="router_logits"):
            ops.route(x, 6, 4.0)
    finally:
        ops.set_validation(False)


def test_route_errors_name_argument():
    x = torch.randn(4, 300, device="cuda")
    with pytest.raises(RuntimeError, match="E=300"):
        ops.route(x, 6, 6.0)
    with pytest.raises(RuntimeError, match="top_k"):
        ops.route(torch.randn(4, 8, device="cuda"), 9, 6.0)


@pytest.mark.parametrize("budget", [6.0, 3.0])
def test_route_graph_capture_and_determinism(budget):
    x = torch.randn(64, 64, device="cuda")
    big = torch.randn(2000, 64, device="cuda")
    ref_small = ops.route(x, 6, budget)
    ref_big = ops.route(big, 6, budget)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.route(x, 6, budget)  # warm-up outside capture
        ops.route(big, 6, budget)
        with torch.cuda.graph(g, stream=s):
            out_small = ops.route(x, 6, budget)
            out_big = ops.route(big, 6, budget)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        big.copy_(torch.randn_like(big))
        g.replay()
        torch.cuda.synchronize()
        for got, want in ((out_small, ops.route(x, 6, budget)), (out_big, ops.route(big, 6, budget))):
            assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert all(torch.equal(a, b) for a, b in zip(ops.route(x, 6, budget), ops.route(x, 6, budget)))
    del ref_small, ref_big


def test_route_opcheck():
    x = torch.randn(5, 64, device="cuda")
    torch.library.opcheck(torch.ops.allocmoe.route.default, (x, 6, 3.5, 1, "softmax", None, 1, 1, True, 1.0))
    big = torch.randn(300, 64, device="cuda")
    torch.library.opcheck(torch.ops.allocmoe.route.default, (big, 6, 3.5))


@pytest.mark.parametrize("path", ["auto", "warp", "block", "multi"])
def test_permuted_rows_are_ties(path, monkeypatch):
    """Rows that permute the same logits get the same probabilities on every path (the softmax
    denominator is summed exactly, docs/OPS.md step 1), so Alloc-T's extra slots go to the lower
    tokens first, as on the CPU."""
    monkeypatch.setenv("ALLOCMOE_ROUTE_PATH", path)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, generator=gen) * 3
    logits = torch.stack([base] + [base[torch.randperm(64, generator=gen)] for _ in range(7)])
    w, ids = ops.route(logits.cuda(), top_k=6, budget=1.5, k_base=1)
    assert (ids >= 0).sum(dim=1).tolist() == [2, 2, 2, 2, 1, 1, 1, 1]
    w_cpu, ids_cpu = ops.route(logits, top_k=6, budget=1.5, k_base=1)
    assert torch.equal(ids.cpu(), ids_cpu)
    torch.testing.assert_close(w.cpu(), w_cpu, rtol=2e-5, atol=1e-6)
