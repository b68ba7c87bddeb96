"""Typed Python wrappers and fake (meta) kernels of the ``torch.ops.allocmoe`` operators.

The schemas are defined once in ``csrc/ops.cpp``; the semantics are in ``docs/OPS.md``; the
pure-PyTorch reference is ``tests/reference.py``. The fake kernels let ``torch.compile`` trace
through the ops: they check what the native kernels check without looking at data (shapes,
dtypes, devices, scalar arguments) and return empty outputs of the right shape.
"""

from __future__ import annotations

import math

import torch

from . import _C

__all__ = ["route", "experts", "set_validation", "validation_enabled"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SCORINGS = ("softmax", "softmax_group", "sigmoid_group", "topk_softmax")
_ACTIVATIONS = ("silu", "swiglu_oai")


def route(
    router_logits: torch.Tensor,
    top_k: int,
    budget: float,
    k_base: int = 1,
    scoring: str = "softmax",
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score, pick each token's ``top_k`` candidates and keep ``round(budget * T)`` slots (Alloc-T).

    Returns ``(weights [T, top_k] fp32, ids [T, top_k] int32)``; the kept slots of a row are a
    prefix, dropped slots have id -1 and weight 0. See docs/OPS.md for the exact rules.
    """
    return torch.ops.allocmoe.route(
        router_logits,
        top_k,
        float(budget),
        k_base=k_base,
        scoring=scoring,
        correction_bias=correction_bias,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=float(routed_scaling_factor),
    )


def experts(
    hidden: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    activation: str = "silu",
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> torch.Tensor:
    """Weighted sum over the kept slots of each token's expert MLPs: ``[T, H]`` in hidden's dtype.

    ``gate_up [E, 2I, H]``, ``down [E, H, I]`` (any strides), ``weights [T, K]`` fp32,
    ``ids [T, K]`` int32 with -1 for skipped slots. See docs/OPS.md.
    """
    return torch.ops.allocmoe.experts(
        hidden,
        gate_up,
        down,
        weights,
        ids,
        gate_up_bias=gate_up_bias,
        down_bias=down_bias,
        activation=activation,
        swiglu_alpha=float(swiglu_alpha),
        swiglu_limit=float(swiglu_limit),
    )


def set_validation(on: bool) -> None:
    """Turn on/off the data-dependent input checks of the CUDA kernels (they sync; CPU always checks)."""
    _C.set_validation(bool(on))


def validation_enabled() -> bool:
    return bool(_C.validation_enabled())


# --- fake kernels --------------------------------------------------------------------------------
# Mirror the host-side checks of csrc/common/arg_checks.h (same conditions, same argument names in
# the messages) so that a traced program fails the way the eager one does.


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(msg)


@torch.library.register_fake("allocmoe::route")
def _route_fake(
    router_logits,
    top_k,
    budget,
    k_base=1,
    scoring="softmax",
    correction_bias=None,
    n_group=1,
    topk_group=1,
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
):
    _check(scoring in _SCORINGS, f"allocmoe.route: unknown scoring '{scoring}'")
    _check(router_logits.dim() == 2, f"allocmoe.route: router_logits must be 2-D [T, E], got {router_logits.dim()}-D")
    _check(
        router_logits.dtype in _FLOAT_DTYPES,
        f"allocmoe.route: router_logits must be float32, bfloat16 or float16, got {router_logits.dtype}",
    )
    T, E = router_logits.shape
    _check(1 <= top_k <= E, f"allocmoe.route: top_k must be in [1, E={E}], got {top_k}")
    _check(0 <= k_base <= top_k, f"allocmoe.route: k_base must be in [0, top_k={top_k}], got {k_base}")
    _check(math.isfinite(budget), f"allocmoe.route: budget must be finite, got {budget}")
    _check(k_base <= budget <= top_k, f"allocmoe.route: budget must be in [k_base={k_base}, top_k={top_k}], got {budget}")
    if scoring in ("softmax_group", "sigmoid_group"):
        _check(n_group >= 1 and E % n_group == 0, f"allocmoe.route: n_group must be >= 1 and divide E={E}, got {n_group}")
        _check(1 <= topk_group <= n_group, f"allocmoe.route: topk_group must be in [1, n_group={n_group}], got {topk_group}")
        _check(
            topk_group * (E // n_group) >= top_k,
            f"allocmoe.route: topk_group={topk_group} groups of {E // n_group} experts hold fewer than top_k={top_k} experts",
        )
    if correction_bias is not None:
        _check(
            scoring == "sigmoid_group",
            f"allocmoe.route: correction_bias is only used by scoring='sigmoid_group', got scoring='{scoring}'",
        )
        _check(
            correction_bias.dim() == 1 and correction_bias.shape[0] == E,
            f"allocmoe.route: correction_bias must have shape [E={E}], got {tuple(correction_bias.shape)}",
        )
        _check(
            correction_bias.dtype == torch.float32,
            f"allocmoe.route: correction_bias must be float32, got {correction_bias.dtype}",
        )
        _check(
            correction_bias.device == router_logits.device,
            f"allocmoe.route: correction_bias is on {correction_bias.device} but router_logits is on {router_logits.device}",
        )
    weights = router_logits.new_empty((T, top_k), dtype=torch.float32)
    ids = router_logits.new_empty((T, top_k), dtype=torch.int32)
    return weights, ids


@torch.library.register_fake("allocmoe::experts")
def _experts_fake(
    hidden,
    gate_up,
    down,
    weights,
    ids,
    gate_up_bias=None,
    down_bias=None,
    activation="silu",
    swiglu_alpha=1.702,
    swiglu_limit=7.0,
):
    _check(activation in _ACTIVATIONS, f"allocmoe.experts: unknown activation '{activation}'")
    for name, t, nd, shape in (
        ("hidden", hidden, 2, "[T, H]"),
        ("gate_up", gate_up, 3, "[E, 2I, H]"),
        ("down", down, 3, "[E, H, I]"),
        ("weights", weights, 2, "[T, K]"),
        ("ids", ids, 2, "[T, K]"),
    ):
        _check(t.dim() == nd, f"allocmoe.experts: {name} must be {nd}-D {shape}, got {t.dim()}-D")
    T, H = hidden.shape
    E, two_i = gate_up.shape[0], gate_up.shape[1]
    _check(hidden.dtype in _FLOAT_DTYPES, f"allocmoe.experts: hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    _check(gate_up.dtype == hidden.dtype, f"allocmoe.experts: gate_up dtype {gate_up.dtype} differs from hidden dtype {hidden.dtype}")
    _check(down.dtype == hidden.dtype, f"allocmoe.experts: down dtype {down.dtype} differs from hidden dtype {hidden.dtype}")
    _check(weights.dtype == torch.float32, f"allocmoe.experts: weights must be float32, got {weights.dtype}")
    _check(ids.dtype == torch.int32, f"allocmoe.experts: ids must be int32, got {ids.dtype}")
    _check(E >= 1, f"allocmoe.experts: gate_up must hold at least one expert, got shape {tuple(gate_up.shape)}")
    _check(two_i >= 2 and two_i % 2 == 0, f"allocmoe.experts: gate_up dim 1 (2I) must be even and >= 2, got {tuple(gate_up.shape)}")
    _check(gate_up.shape[2] == H, f"allocmoe.experts: gate_up must have shape [E, 2I, H={H}], got {tuple(gate_up.shape)}")
    _check(
        tuple(down.shape) == (E, H, two_i // 2),
        f"allocmoe.experts: down must have shape [E={E}, H={H}, I={two_i // 2}], got {tuple(down.shape)}",
    )
    _check(weights.shape[0] == T, f"allocmoe.experts: weights must have T={T} rows, got {tuple(weights.shape)}")
    _check(
        ids.shape == weights.shape,
        f"allocmoe.experts: ids shape {tuple(ids.shape)} differs from weights shape {tuple(weights.shape)}",
    )
    others = [("gate_up", gate_up), ("down", down), ("weights", weights), ("ids", ids)]
    for name, bias, shape in (("gate_up_bias", gate_up_bias, (E, two_i)), ("down_bias", down_bias, (E, H))):
        if bias is None:
            continue
        _check(tuple(bias.shape) == shape, f"allocmoe.experts: {name} must have shape {list(shape)}, got {tuple(bias.shape)}")
        _check(bias.dtype == hidden.dtype, f"allocmoe.experts: {name} dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
        others.append((name, bias))
    for name, t in others:
        _check(t.device == hidden.device, f"allocmoe.experts: {name} is on {t.device} but hidden is on {hidden.device}")
    return hidden.new_empty((T, H))


# =================================================================================================
# moe: one MoE layer (router GEMV or given logits, route with Alloc-T, routed experts, shared
# experts). CPU kernel: csrc/cpu/moe.cpp (composition of route and experts); CUDA:
# csrc/cuda/moe_decode.cu (one launch for T <= 16: moe_stream.cuh on sm_90, the older one-launch
# kernel below; the composition otherwise).
# =================================================================================================


def moe(
    hidden: torch.Tensor,
    router_weight: torch.Tensor | None,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    budget: float,
    k_base: int = 1,
    scoring: str = "softmax",
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
    shared_gate_up: torch.Tensor | None = None,
    shared_down: torch.Tensor | None = None,
    shared_gate: torch.Tensor | None = None,
    router_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """One MoE layer: ``[T, H]`` in hidden's dtype.

    ``logits = fp32(hidden) @ fp32(router_weight).T`` (or ``router_logits [T, E]`` when the caller
    has them; give exactly one of the two) is routed as :func:`route` does, the kept
    slots go through :func:`experts` (SiLU gate/up), and the optional shared experts
    ``shared_gate_up [S, 2I_s, H]`` / ``shared_down [S, H, I_s]`` are added as always-on experts
    with weight 1, or ``sigmoid(hidden . shared_gate)`` per token (Qwen2-MoE) when ``shared_gate [H]``
    is given. On CUDA, T <= 16 runs as one fused launch.
    """
    return torch.ops.allocmoe.moe(
        hidden,
        router_weight,
        gate_up,
        down,
        top_k,
        float(budget),
        k_base=k_base,
        scoring=scoring,
        correction_bias=correction_bias,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=float(routed_scaling_factor),
        shared_gate_up=shared_gate_up,
        shared_down=shared_down,
        shared_gate=shared_gate,
        router_logits=router_logits,
    )


__all__.append("moe")


@torch.library.register_fake("allocmoe::moe")
def _moe_fake(
    hidden,
    router_weight,
    gate_up,
    down,
    top_k,
    budget,
    k_base=1,
    scoring="softmax",
    correction_bias=None,
    n_group=1,
    topk_group=1,
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
    shared_gate_up=None,
    shared_down=None,
    shared_gate=None,
    router_logits=None,
):
    _check(hidden.dim() == 2, f"allocmoe.moe: hidden must be 2-D [T, H], got {hidden.dim()}-D")
    T, H = hidden.shape
    _check((router_weight is None) != (router_logits is None),
           "allocmoe.moe: give exactly one of router_weight and router_logits")
    if router_weight is not None:
        _check(
            router_weight.dim() == 2 and router_weight.shape[1] == H,
            f"allocmoe.moe: router_weight must have shape [E, H={H}], got {tuple(router_weight.shape)}",
        )
        _check(
            router_weight.dtype == hidden.dtype,
            f"allocmoe.moe: router_weight dtype {router_weight.dtype} differs from hidden dtype {hidden.dtype}",
        )
        E = router_weight.shape[0]
    else:
        _check(
            router_logits.dim() == 2 and router_logits.shape[0] == T,
            f"allocmoe.moe: router_logits must have shape [T={T}, E], got {tuple(router_logits.shape)}",
        )
        _check(
            router_logits.dtype in _FLOAT_DTYPES,
            f"allocmoe.moe: router_logits must be float32, bfloat16 or float16, got {router_logits.dtype}",
        )
        E = router_logits.shape[1]
    _check(
        (shared_gate_up is None) == (shared_down is None),
        "allocmoe.moe: shared_gate_up and shared_down must be given together",
    )
    _check(shared_gate is None or shared_gate_up is not None, "allocmoe.moe: shared_gate needs shared_gate_up and shared_down")
    # Routing and expert arguments: the same checks as the route and experts fakes.
    logits = hidden.new_empty((T, E), dtype=torch.float32)
    w, ids = _route_fake(logits, top_k, budget, k_base, scoring, correction_bias, n_group, topk_group)
    _experts_fake(hidden, gate_up, down, w, ids)
    return hidden.new_empty((T, H))
