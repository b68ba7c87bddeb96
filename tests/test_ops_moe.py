"""The `moe` op on the CPU: router weight or router logits in (exactly one), the same layer out.

The CPU kernel is the composition of route and experts (csrc/cpu/moe.cpp); these tests pin the
two ways of giving the router and the argument errors. The CUDA kernels are compared with it in
tests/test_cuda_moe.py.
"""

from __future__ import annotations

import pytest
import torch

from allocmoe_ext import ops


def layer(T=3, H=64, I=32, E=12, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden=torch.randn(T, H, generator=g).to(dtype),
        router_weight=(torch.randn(E, H, generator=g) / H**0.5 * 3).to(dtype),
        gate_up=(torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype),
        down=(torch.randn(E, H, I, generator=g) / I**0.5).to(dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("budget", [4.0, 2.5, 1.0])
def test_logits_in_equals_router_weight_in(dtype, budget):
    t = layer(dtype=dtype)
    out_w = ops.moe(**t, top_k=4, budget=budget)
    logits = t["hidden"].float() @ t["router_weight"].float().T
    out_l = ops.moe(t["hidden"], None, t["gate_up"], t["down"], 4, budget, router_logits=logits)
    assert torch.equal(out_w, out_l)


def test_logits_in_matches_route_then_experts():
    t = layer(T=5, seed=3)
    logits = torch.randn(5, 12) * 2
    out = ops.moe(t["hidden"], None, t["gate_up"], t["down"], 6, 3.4, router_logits=logits)
    w, ids = ops.route(logits, 6, 3.4)
    assert (ids >= 0).sum().item() == round(3.4 * 5)  # Alloc-T kept 17 of 30 slots
    assert torch.equal(out, ops.experts(t["hidden"], t["gate_up"], t["down"], w, ids))


def test_bf16_logits_are_routed_as_fp32():
    t = layer(T=2, seed=5)
    logits = (torch.randn(2, 12) * 2).bfloat16()
    a = ops.moe(t["hidden"], None, t["gate_up"], t["down"], 3, 2.0, router_logits=logits)
    b = ops.moe(t["hidden"], None, t["gate_up"], t["down"], 3, 2.0, router_logits=logits.float())
    assert torch.equal(a, b)


def test_router_arguments_are_checked():
    t = layer()
    logits = torch.randn(3, 12)
    with pytest.raises(RuntimeError, match="exactly one of router_weight and router_logits"):
        ops.moe(**t, top_k=2, budget=2.0, router_logits=logits)
    with pytest.raises(RuntimeError, match="exactly one of router_weight and router_logits"):
        ops.moe(t["hidden"], None, t["gate_up"], t["down"], 2, 2.0)
    with pytest.raises(RuntimeError, match=r"router_logits must have shape \[T=3, E\]"):
        ops.moe(t["hidden"], None, t["gate_up"], t["down"], 2, 2.0, router_logits=torch.randn(4, 12))
    with pytest.raises(RuntimeError, match=r"gate_up must have shape \[E=11"):
        ops.moe(t["hidden"], None, t["gate_up"], t["down"], 2, 2.0, router_logits=torch.randn(3, 11))
    with pytest.raises(RuntimeError, match="router_logits must be float32, bfloat16 or float16"):
        ops.moe(t["hidden"], None, t["gate_up"], t["down"], 2, 2.0, router_logits=torch.ones(3, 12, dtype=torch.int32))


def test_nan_logits_are_an_error():
    t = layer()
    logits = torch.randn(3, 12)
    logits[1, 4] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        ops.moe(t["hidden"], None, t["gate_up"], t["down"], 2, 2.0, router_logits=logits)


def test_fake_kernel_shapes_with_logits():
    t = layer()
    with torch._subclasses.fake_tensor.FakeTensorMode():
        h = torch.empty(3, 64)
        out = torch.ops.allocmoe.moe(h, None, torch.empty(12, 64, 64), torch.empty(12, 64, 32), 2, 2.0,
                                     router_logits=torch.empty(3, 12))
        assert out.shape == (3, 64)
    torch.library.opcheck(torch.ops.allocmoe.moe.default, (t["hidden"], None, t["gate_up"], t["down"], 2, 2.0),
                          dict(router_logits=torch.randn(3, 12)))
