"""torch.ops.allocmoe.experts (CPU kernel) against tests/reference.py and transformers-style expert
code (DeepSeek/Qwen fused layout, GPT-OSS transposed interleaved layout)."""

from __future__ import annotations

import pytest
import torch

import allocmoe_ext.ops as ops
import reference as ref


def make_problem(T, H, I, E, K, dtype, gen, *, biases=False, drop=0.3, transposed=False):
    """Random inputs of experts; `drop` is the fraction of slots with id -1. With `transposed`,
    gate_up/down are transposed views of [E, H, 2I] / [E, I, H] parameters, as GPT-OSS stores them."""
    hidden = torch.randn(T, H, generator=gen).to(dtype)
    if transposed:
        gate_up = (torch.randn(E, H, 2 * I, generator=gen) / H**0.5).to(dtype).transpose(1, 2)
        down = (torch.randn(E, I, H, generator=gen) / I**0.5).to(dtype).transpose(1, 2)
    else:
        gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(dtype)
        down = (torch.randn(E, H, I, generator=gen) / I**0.5).to(dtype)
    weights = torch.rand(T, K, generator=gen)
    ids = torch.randint(0, E, (T, K), generator=gen, dtype=torch.int32)
    ids[torch.rand(T, K, generator=gen) < drop] = -1
    extra = {}
    if biases:
        extra["gate_up_bias"] = (torch.randn(E, 2 * I, generator=gen) * 0.1).to(dtype)
        extra["down_bias"] = (torch.randn(E, H, generator=gen) * 0.1).to(dtype)
    return (hidden, gate_up, down, weights, ids), extra


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("activation", ["silu", "swiglu_oai"])
@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_experts_fp32_matches_reference(activation, biases, transposed):
    gen = torch.Generator().manual_seed(1)
    for T, E, K in ((1, 8, 2), (3, 60, 4), (7, 64, 6), (33, 16, 8)):
        args, extra = make_problem(T, 32, 24, E, K, torch.float32, gen, biases=biases, transposed=transposed)
        got = ops.experts(*args, activation=activation, **extra)
        want = ref.experts(*args, activation=activation, **extra)
        assert got.dtype == torch.float32 and got.shape == (T, 32)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["silu", "swiglu_oai"])
def test_experts_low_precision_matches_reference(dtype, activation):
    gen = torch.Generator().manual_seed(2)
    for T, E, K, biases, transposed in ((5, 8, 2, False, False), (33, 64, 6, True, False), (17, 32, 4, True, True)):
        args, extra = make_problem(T, 64, 48, E, K, dtype, gen, biases=biases, transposed=transposed)
        got = ops.experts(*args, activation=activation, **extra)
        want = ref.experts(*args, activation=activation, **extra)
        assert got.dtype == dtype
        assert rel_err(got, want) < 1e-2


def test_low_precision_rounds_the_intermediate_to_input_dtype():
    # The reference without that rounding differs measurably from the kernel, with it it does not.
    gen = torch.Generator().manual_seed(3)
    args, _ = make_problem(33, 64, 128, 8, 4, torch.bfloat16, gen, drop=0.0)
    got = ops.experts(*args).float()
    fp32_args = [a.float() if a.is_floating_point() else a for a in args]
    unrounded = ref.experts(*fp32_args)
    assert rel_err(got, ref.experts(*args)) < rel_err(got, unrounded)


def test_skipped_slots_ignore_their_weight():
    gen = torch.Generator().manual_seed(4)
    (hidden, gate_up, down, weights, ids), _ = make_problem(7, 16, 8, 8, 4, torch.float32, gen, drop=0.5)
    poisoned = weights.clone()
    poisoned[ids < 0] = float("nan")
    torch.testing.assert_close(ops.experts(hidden, gate_up, down, poisoned, ids),
                               ops.experts(hidden, gate_up, down, weights, ids))
    all_dropped = torch.full_like(ids, -1)
    assert (ops.experts(hidden, gate_up, down, weights, all_dropped) == 0).all()


def test_empty_inputs():
    gen = torch.Generator().manual_seed(5)
    (hidden, gate_up, down, weights, ids), _ = make_problem(0, 16, 8, 8, 4, torch.bfloat16, gen)
    out = ops.experts(hidden, gate_up, down, weights, ids)
    assert out.shape == (0, 16) and out.dtype == torch.bfloat16
    (hidden, gate_up, down, weights, ids), _ = make_problem(3, 16, 8, 8, 0, torch.float32, gen)
    assert (ops.experts(hidden, gate_up, down, weights, ids) == 0).all()


def test_matches_deepseek_style_experts_and_route_output():
    """transformers' fused-layout experts loop (gate rows first), fed by allocmoe.route."""
    gen = torch.Generator().manual_seed(6)
    T, H, I, E, top_k = 33, 32, 16, 64, 6
    hidden = torch.randn(T, H, generator=gen)
    gate_up = torch.randn(E, 2 * I, H, generator=gen) / H**0.5
    down = torch.randn(E, H, I, generator=gen) / I**0.5
    w, ids = ops.route(torch.randn(T, E, generator=gen), top_k, 2.5, k_base=1)
    want = torch.zeros_like(hidden)
    top_k_index = torch.where(ids >= 0, ids.long(), E)  # dropped slots -> the "no expert" class
    mask = torch.nn.functional.one_hot(top_k_index, num_classes=E + 1).permute(2, 1, 0)
    for e in range(E):
        pos, tok = torch.where(mask[e])
        if tok.numel() == 0:
            continue
        gate, up = torch.nn.functional.linear(hidden[tok], gate_up[e]).chunk(2, dim=-1)
        y = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down[e]) * w[tok, pos, None]
        want.index_add_(0, tok, y)
    torch.testing.assert_close(ops.experts(hidden, gate_up, down, w, ids), want, rtol=1e-5, atol=1e-5)


def test_matches_gpt_oss_style_experts():
    """GPT-OSS stores gate_up [E, H, 2I] (interleaved) and down [E, I, H] with biases; the op takes
    transposed views of them."""
    gen = torch.Generator().manual_seed(7)
    T, H, I, E, top_k = 9, 32, 16, 32, 4
    alpha, limit = 1.702, 7.0
    hidden = torch.randn(T, H, generator=gen) * 3  # large enough that the clamps engage
    gate_up_proj = torch.randn(E, H, 2 * I, generator=gen)
    gate_up_bias = torch.randn(E, 2 * I, generator=gen)
    down_proj = torch.randn(E, I, H, generator=gen) / I**0.5
    down_bias = torch.randn(E, H, generator=gen)
    w, ids = ops.route(torch.randn(T, E, generator=gen), top_k, top_k, scoring="topk_softmax")
    want = torch.zeros_like(hidden)
    for t in range(T):
        for k in range(top_k):
            e = int(ids[t, k])
            g = hidden[t] @ gate_up_proj[e] + gate_up_bias[e]
            gate, up = g[::2].clamp(max=limit), g[1::2].clamp(min=-limit, max=limit)
            want[t] += w[t, k] * (((up + 1) * gate * torch.sigmoid(gate * alpha)) @ down_proj[e] + down_bias[e])
    assert (hidden @ gate_up_proj[0]).abs().max() > limit
    got = ops.experts(hidden, gate_up_proj.transpose(1, 2), down_proj.transpose(1, 2), w, ids,
                      gate_up_bias=gate_up_bias, down_bias=down_bias, activation="swiglu_oai",
                      swiglu_alpha=alpha, swiglu_limit=limit)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _experts_samples():
    gen = torch.Generator().manual_seed(8)
    args, extra = make_problem(7, 16, 8, 8, 4, torch.float32, gen)
    yield args, extra
    args, extra = make_problem(5, 16, 8, 8, 2, torch.bfloat16, gen, biases=True, transposed=True)
    yield args, dict(extra, activation="swiglu_oai")
    args, extra = make_problem(0, 16, 8, 8, 4, torch.float32, gen)
    yield args, extra


@pytest.mark.parametrize("sample", list(_experts_samples()), ids=lambda s: f"T{s[0][0].shape[0]}-{s[0][0].dtype}")
def test_experts_opcheck(sample):
    args, kwargs = sample
    torch.library.opcheck(torch.ops.allocmoe.experts.default, args, kwargs)


def test_parameters_requiring_grad_are_accepted():
    """Model weights are nn.Parameters (requires_grad) even at inference; the op must run on them
    (it has no autograd formula: its outputs are for inference)."""
    gen = torch.Generator().manual_seed(9)
    (hidden, gate_up, down, weights, ids), extra = make_problem(33, 16, 8, 64, 6, torch.float32, gen, biases=True)
    params = [t.clone().requires_grad_() for t in (hidden, gate_up, down, extra["gate_up_bias"], extra["down_bias"])]
    got = ops.experts(params[0], params[1], params[2], weights, ids, gate_up_bias=params[3], down_bias=params[4])
    want = ops.experts(hidden, gate_up, down, weights, ids, **extra)
    torch.testing.assert_close(got.detach(), want)
    w, i = ops.route(torch.randn(33, 64, generator=gen).requires_grad_(), 6, 3.0)
    assert i.dtype == torch.int32 and w.shape == (33, 6)
