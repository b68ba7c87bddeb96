"""Every bad input of docs/OPS.md gets a RuntimeError naming the argument.

Checks that need no data (shapes, dtypes, devices, scalars) run twice: on CPU tensors (the C++
kernel, csrc/common/arg_checks.h) and on meta tensors (the fake kernel in ops.py, what
torch.compile traces), so the two stay in step. Data checks (non-finite logits, ids out of range)
run on CPU only.
"""

from __future__ import annotations

import pytest
import torch

import allocmoe_ext.ops as ops

T, E, H, I, K = 5, 8, 16, 6, 3


def route_args(dev, **over):
    args = dict(router_logits=torch.randn(T, E, device=dev), top_k=K, budget=2.0, k_base=1, scoring="softmax")
    args.update(over)
    return args


def group_args(dev, **over):
    args = dict(scoring="sigmoid_group", n_group=4, topk_group=2, correction_bias=torch.zeros(E, device=dev))
    args.update(over)
    return route_args(dev, **args)


# (name, builder of route kwargs for a device, regex the message must match)
ROUTE_CASES = [
    ("logits_1d", lambda d: route_args(d, router_logits=torch.randn(E, device=d)), "router_logits must be 2-D"),
    ("logits_3d", lambda d: route_args(d, router_logits=torch.randn(2, T, E, device=d)), "router_logits must be 2-D"),
    ("logits_int", lambda d: route_args(d, router_logits=torch.ones(T, E, dtype=torch.int32, device=d)), "router_logits must be float32"),
    ("logits_fp64", lambda d: route_args(d, router_logits=torch.randn(T, E, dtype=torch.float64, device=d)), "router_logits must be float32"),
    ("top_k_zero", lambda d: route_args(d, top_k=0, k_base=0, budget=0.0), "top_k must be in"),
    ("top_k_above_E", lambda d: route_args(d, top_k=E + 1, budget=2.0), "top_k must be in"),
    ("k_base_negative", lambda d: route_args(d, k_base=-1), "k_base must be in"),
    ("k_base_above_top_k", lambda d: route_args(d, k_base=K + 1, budget=float(K)), "k_base must be in"),
    ("budget_below_k_base", lambda d: route_args(d, k_base=2, budget=1.5), "budget must be in"),
    ("budget_above_top_k", lambda d: route_args(d, budget=K + 0.5), "budget must be in"),
    ("budget_nan", lambda d: route_args(d, budget=float("nan")), "budget must be finite"),
    ("budget_inf", lambda d: route_args(d, budget=float("inf")), "budget must be finite"),
    ("scoring_unknown", lambda d: route_args(d, scoring="sparsemax"), "unknown scoring"),
    ("n_group_not_dividing_E", lambda d: group_args(d, n_group=3), "n_group must be"),
    ("n_group_zero", lambda d: group_args(d, n_group=0), "n_group must be"),
    ("topk_group_above_n_group", lambda d: group_args(d, topk_group=5), "topk_group must be in"),
    ("topk_group_zero", lambda d: group_args(d, topk_group=0), "topk_group must be in"),
    ("groups_too_small_for_top_k", lambda d: group_args(d, topk_group=1), "topk_group=1 groups of 2 experts hold fewer than top_k"),
    ("bias_wrong_E", lambda d: group_args(d, correction_bias=torch.zeros(E + 1, device=d)), "correction_bias must have shape"),
    ("bias_2d", lambda d: group_args(d, correction_bias=torch.zeros(1, E, device=d)), "correction_bias must have shape"),
    ("bias_bf16", lambda d: group_args(d, correction_bias=torch.zeros(E, dtype=torch.bfloat16, device=d)), "correction_bias must be float32"),
    ("bias_without_sigmoid_group", lambda d: route_args(d, correction_bias=torch.zeros(E, device=d)), "correction_bias is only used"),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("name,build,match", ROUTE_CASES, ids=[c[0] for c in ROUTE_CASES])
def test_route_rejects(device, name, build, match):
    with pytest.raises(RuntimeError, match=match):
        ops.route(**build(device))


def test_route_rejects_bias_on_another_device():
    with pytest.raises(RuntimeError, match="correction_bias is on meta but router_logits is on cpu"):
        ops.route(**group_args("cpu", correction_bias=torch.zeros(E, device="meta")))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_rejects_non_finite_logits(bad, dtype):
    logits = torch.randn(T, E)
    logits[3, 5] = bad
    with pytest.raises(RuntimeError, match="router_logits contains NaN or Inf"):
        ops.route(logits.to(dtype), K, 2.0)


def test_route_rejects_non_finite_bias():
    bias = torch.zeros(E)
    bias[2] = float("nan")
    with pytest.raises(RuntimeError, match="correction_bias contains NaN or Inf"):
        ops.route(**group_args("cpu", correction_bias=bias))


def test_group_arguments_are_ignored_by_non_group_scorings():
    # A config's n_group/topk_group can be passed through unchanged for plain softmax routing.
    w, ids = ops.route(torch.randn(T, E), K, 2.0, n_group=3, topk_group=7)
    assert (ids >= 0).sum().item() == 10


def experts_args(dev, dtype=torch.float32, **over):
    args = dict(
        hidden=torch.randn(T, H, dtype=dtype, device=dev),
        gate_up=torch.randn(E, 2 * I, H, dtype=dtype, device=dev),
        down=torch.randn(E, H, I, dtype=dtype, device=dev),
        weights=torch.rand(T, K, device=dev),
        ids=torch.randint(0, E, (T, K), dtype=torch.int32, device=dev),
    )
    args.update(over)
    return args


def _t(*shape, dtype=torch.float32):
    return lambda d: torch.randn(*shape, device=d).to(dtype)


EXPERTS_CASES = [
    ("hidden_3d", dict(hidden=_t(1, T, H)), "hidden must be 2-D"),
    ("gate_up_2d", dict(gate_up=_t(2 * I, H)), "gate_up must be 3-D"),
    ("down_2d", dict(down=_t(H, I)), "down must be 3-D"),
    ("weights_1d", dict(weights=_t(T)), "weights must be 2-D"),
    ("ids_1d", dict(ids=lambda d: torch.zeros(T, dtype=torch.int32, device=d)), "ids must be 2-D"),
    ("hidden_int", dict(hidden=lambda d: torch.ones(T, H, dtype=torch.int32, device=d)), "hidden must be float32"),
    ("gate_up_dtype", dict(gate_up=_t(E, 2 * I, H, dtype=torch.bfloat16)), "gate_up dtype"),
    ("down_dtype", dict(down=_t(E, H, I, dtype=torch.float16)), "down dtype"),
    ("weights_not_fp32", dict(weights=_t(T, K, dtype=torch.bfloat16)), "weights must be float32"),
    ("ids_not_int32", dict(ids=lambda d: torch.zeros(T, K, dtype=torch.int64, device=d)), "ids must be int32"),
    ("gate_up_wrong_H", dict(gate_up=_t(E, 2 * I, H + 1)), "gate_up must have shape"),
    ("gate_up_odd_rows", dict(gate_up=_t(E, 2 * I + 1, H)), r"gate_up dim 1 \(2I\) must be even"),
    ("down_wrong_E", dict(down=_t(E + 1, H, I)), "down must have shape"),
    ("down_wrong_H", dict(down=_t(E, H + 1, I)), "down must have shape"),
    ("down_wrong_I", dict(down=_t(E, H, I + 1)), "down must have shape"),
    ("weights_wrong_T", dict(weights=_t(T + 1, K)), "weights must have T="),
    ("ids_wrong_K", dict(ids=lambda d: torch.zeros(T, K + 1, dtype=torch.int32, device=d)), "ids shape"),
    ("gate_up_bias_shape", dict(gate_up_bias=_t(E, I)), "gate_up_bias must have shape"),
    ("gate_up_bias_dtype", dict(gate_up_bias=_t(E, 2 * I, dtype=torch.bfloat16)), "gate_up_bias dtype"),
    ("down_bias_shape", dict(down_bias=_t(E + 1, H)), "down_bias must have shape"),
    ("down_bias_dtype", dict(down_bias=_t(E, H, dtype=torch.float16)), "down_bias dtype"),
    ("activation_unknown", dict(activation=lambda d: "gelu"), "unknown activation"),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("name,over,match", EXPERTS_CASES, ids=[c[0] for c in EXPERTS_CASES])
def test_experts_rejects(device, name, over, match):
    args = experts_args(device, **{k: make(device) for k, make in over.items()})
    with pytest.raises(RuntimeError, match=match):
        ops.experts(**args)


@pytest.mark.parametrize("name", ["gate_up", "down", "weights", "ids", "gate_up_bias", "down_bias"])
def test_experts_rejects_argument_on_another_device(name):
    args = experts_args("cpu", gate_up_bias=torch.zeros(E, 2 * I), down_bias=torch.zeros(E, H))
    args[name] = args[name].to("meta")
    with pytest.raises(RuntimeError, match=f"{name} is on meta but hidden is on cpu"):
        ops.experts(**args)


@pytest.mark.parametrize("bad", [E, E + 5, -2])
def test_experts_rejects_ids_out_of_range(bad):
    args = experts_args("cpu")
    args["ids"][2, 1] = bad
    with pytest.raises(RuntimeError, match=rf"ids\[2, 1\] = {bad} is out of range \[-1, E=8\)"):
        ops.experts(**args)
