"""CUDA `moe` vs the CPU op, on every path: the split kernel (sm_90, T <= 4, T*K <= 32) and the
stream kernel (sm_90, T <= 16), both bf16/fp16 and elsewhere falling back to the composition, the
older one-launch decode kernel (T <= 16) and the composition (router matmul + route + experts),
forced through ALLOCMOE_MOE_PATH, and auto.

Marked `cuda`; skipped without a GPU or without a CUDA build of the extension.
"""

from __future__ import annotations

import pytest
import torch

from allocmoe_ext import ops
from cuda_marks import CUDA_ONLY, poison_cache

pytestmark = CUDA_ONLY


@pytest.fixture(autouse=True, params=["auto", "split", "stream", "fused", "composite"])
def moe_path(request, monkeypatch):
    """Every test runs on every path of the CUDA moe op (csrc/cuda/moe_decode.cu)."""
    monkeypatch.setenv("ALLOCMOE_MOE_PATH", request.param)
    return request.param


def make_layer(T, H, I, E, S, Is, dtype, seed, shared_gate=False):
    g = torch.Generator().manual_seed(seed)
    t = dict(
        hidden=torch.randn(T, H, generator=g),
        router_weight=torch.randn(E, H, generator=g) / H**0.5 * 3.0,
        gate_up=torch.randn(E, 2 * I, H, generator=g) / H**0.5,
        down=torch.randn(E, H, I, generator=g) / I**0.5,
    )
    if S:
        t["shared_gate_up"] = torch.randn(S, 2 * Is, H, generator=g) / H**0.5
        t["shared_down"] = torch.randn(S, H, Is, generator=g) / Is**0.5
        if shared_gate:
            t["shared_gate"] = torch.randn(H, generator=g) / H**0.5
    return {k: v.to(dtype) for k, v in t.items()}


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


CASES = [
    # T, H, I, E, S, Is, top_k, budget, k_base, extra routing args
    (1, 256, 128, 64, 0, 0, 6, 6.0, 1, {}),
    (1, 256, 128, 64, 0, 0, 6, 3.0, 1, {}),
    (1, 512, 96, 8, 2, 64, 2, 2.0, 1, {"norm_topk_prob": True}),
    (2, 256, 128, 60, 1, 256, 4, 2.5, 1, {}),
    (3, 256, 64, 64, 0, 0, 8, 5.0, 0, {"scoring": "softmax_group", "n_group": 8, "topk_group": 3}),
    (7, 256, 128, 128, 1, 128, 6, 3.3, 1, {"routed_scaling_factor": 2.5}),
    (16, 256, 128, 64, 2, 128, 6, 4.0, 1, {}),
    (16, 128, 64, 256, 1, 64, 8, 5.5, 2, {"scoring": "sigmoid_group", "n_group": 8, "topk_group": 4}),
    (17, 256, 128, 64, 1, 128, 6, 3.0, 1, {}),  # above 16 tokens: route + experts composition
    (64, 256, 128, 64, 0, 0, 6, 3.0, 1, {}),
]


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-E{c[3]}-S{c[4]}-k{c[6]}-b{c[7]}")
def test_moe_matches_cpu(case, dtype, tol):
    T, H, I, E, S, Is, top_k, budget, k_base, extra = case
    layer = make_layer(T, H, I, E, S, Is, dtype, seed=T * 1000 + E + S, shared_gate=(T % 2 == 1 and S > 0))
    if extra.get("scoring") == "sigmoid_group":
        extra = dict(extra, correction_bias=(torch.arange(E) % 3 * 0.01).float())
    kw = dict(top_k=top_k, budget=budget, k_base=k_base, **extra)
    ref = ops.moe(**layer, **kw)
    gpu = {k: v.cuda() for k, v in layer.items()}
    kwg = dict(kw)
    if "correction_bias" in kwg:
        kwg["correction_bias"] = kwg["correction_bias"].cuda()
    poison_cache()
    out = ops.moe(**gpu, **kwg)
    torch.cuda.synchronize()
    assert out.shape == (T, H) and out.dtype == dtype
    assert torch.isfinite(out).all(), "NaN/Inf in output (unwritten?)"
    assert rel_err(out.cpu(), ref) < tol


def test_moe_zero_tokens():
    layer = {k: v.cuda() for k, v in make_layer(0, 256, 128, 64, 1, 128, torch.bfloat16, 0).items()}
    out = ops.moe(**layer, top_k=6, budget=3.0)
    assert out.shape == (0, 256)


def test_moe_strided_weights_fall_back():
    layer = make_layer(2, 256, 128, 16, 0, 0, torch.float32, 5)
    ref = ops.moe(**layer, top_k=4, budget=3.0)
    gpu = {k: v.cuda() for k, v in layer.items()}
    gpu["gate_up"] = gpu["gate_up"].transpose(1, 2).contiguous().transpose(1, 2)  # same values, strided
    out = ops.moe(**gpu, top_k=4, budget=3.0)
    assert rel_err(out.cpu(), ref) < 1e-5


def test_moe_deterministic_and_graph_capture():
    layer = {k: v.cuda() for k, v in make_layer(4, 512, 256, 64, 1, 256, torch.bfloat16, 11, True).items()}
    kw = dict(top_k=6, budget=3.5)
    a = ops.moe(**layer, **kw)
    b = ops.moe(**layer, **kw)
    assert torch.equal(a, b)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        ops.moe(**layer, **kw)
        with torch.cuda.graph(g, stream=s):
            out = ops.moe(**layer, **kw)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        layer["hidden"].copy_(torch.randn_like(layer["hidden"]))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ops.moe(**layer, **kw))


def test_moe_opcheck():
    layer = {k: v.cuda() for k, v in make_layer(3, 256, 128, 64, 1, 128, torch.bfloat16, 3).items()}
    args = (layer["hidden"], layer["router_weight"], layer["gate_up"], layer["down"], 6, 3.0)
    torch.library.opcheck(
        torch.ops.allocmoe.moe.default, args,
        dict(shared_gate_up=layer["shared_gate_up"], shared_down=layer["shared_down"]),
    )


def test_moe_bad_path_env_names_it(monkeypatch):
    monkeypatch.setenv("ALLOCMOE_MOE_PATH", "fastest")
    layer = {k: v.cuda() for k, v in make_layer(1, 256, 128, 8, 0, 0, torch.bfloat16, seed=1).items()}
    with pytest.raises(RuntimeError, match="ALLOCMOE_MOE_PATH"):
        ops.moe(**layer, top_k=2, budget=2.0)


@pytest.mark.parametrize("T,E,K,budget", [(1, 64, 6, 6.0), (1, 64, 6, 3.0), (4, 60, 4, 2.5), (9, 64, 8, 5.5),
                                          (16, 64, 6, 3.0), (16, 256, 8, 8.0)])
@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
def test_moe_from_logits_matches_cpu(T, E, K, budget, logits_dtype):
    """router_logits in (the stream kernel's input on sm_90), skewed routing: a few hot experts."""
    t = make_layer(T, 256, 96, E, 0, 0, torch.bfloat16, seed=T * 7 + E)
    g = torch.Generator().manual_seed(T)
    logits = (torch.randn(T, E, generator=g) + 4.0 * (torch.arange(E) % 7 == 0)).to(logits_dtype)
    args = (t["hidden"], None, t["gate_up"], t["down"], K, budget)
    ref = ops.moe(*args, router_logits=logits)
    poison_cache()
    out = ops.moe(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args), router_logits=logits.cuda())
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert rel_err(out.cpu(), ref) < 1e-2


def test_moe_dsv2_layer_shape_matches_cpu():
    """DeepSeek-V2-Lite layer (H=2048, I=1408, E=64, top-6): every CTA of the grid has work."""
    t = make_layer(2, 2048, 1408, 64, 1, 2816, torch.bfloat16, seed=2)
    ref = ops.moe(**t, top_k=6, budget=4.5)
    out = ops.moe(**{k: v.cuda() for k, v in t.items()}, top_k=6, budget=4.5)
    assert rel_err(out.cpu(), ref) < 1e-2


def test_auto_takes_stream_kernel_on_sm90(moe_path):
    if moe_path != "auto" or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("auto on sm_90 only")
    t = {k: v.cuda() for k, v in make_layer(1, 256, 128, 64, 0, 0, torch.bfloat16, 4).items()}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.moe(**t, top_k=6, budget=3.0)
        torch.cuda.synchronize()
    names = " ".join(e.name for e in prof.events())
    assert "stream_moe_kernel" in names, names[:2000]


@pytest.mark.parametrize("T,H,I,E,K,budget", [(1, 2048, 1408, 64, 6, 6.0), (1, 2048, 1408, 64, 6, 3.0),
                                               (3, 2080, 96, 60, 4, 2.5), (4, 288, 160, 8, 8, 8.0),
                                               (2, 256, 32, 256, 16, 9.0)])
def test_split_kernel_shapes(moe_path, T, H, I, E, K, budget):
    """The split kernel's edges: CTAs without units (E=8 top-8: 40 units; I=32: one unit per
    expert), H not a multiple of the 256-row down box (2080, 288), every expert of a token used
    (E=8, K=8), many experts per token (top-16), fp16; poisoned output; bitwise run to run."""
    if moe_path != "split":
        pytest.skip("split path only")
    for dtype in (torch.bfloat16, torch.float16):
        t = make_layer(T, H, I, E, 0, 0, dtype, seed=T * 31 + E + I)
        g = torch.Generator().manual_seed(H)
        logits = torch.randn(T, E, generator=g) * 2.0
        args = (t["hidden"], None, t["gate_up"], t["down"], K, budget)
        ref = ops.moe(*args, router_logits=logits)
        cargs = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        poison_cache()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = ops.moe(*cargs, router_logits=logits.cuda())
            torch.cuda.synchronize()
        assert "split_moe_kernel" in " ".join(e.name for e in prof.events())
        again = ops.moe(*cargs, router_logits=logits.cuda())
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
        assert rel_err(out.cpu(), ref) < 1e-2
        assert torch.equal(out, again)


def test_moe_from_logits_graph_capture_and_deterministic():
    t = {k: v.cuda() for k, v in make_layer(3, 512, 256, 64, 0, 0, torch.bfloat16, 9).items()}
    logits = torch.randn(3, 64, device="cuda")
    args = (t["hidden"], None, t["gate_up"], t["down"], 6, 4.0)
    a = ops.moe(*args, router_logits=logits)
    assert torch.equal(a, ops.moe(*args, router_logits=logits))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        ops.moe(*args, router_logits=logits)
        with torch.cuda.graph(g, stream=s):
            out = ops.moe(*args, router_logits=logits)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        logits.copy_(torch.randn_like(logits))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ops.moe(*args, router_logits=logits))
