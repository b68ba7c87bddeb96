"""Pure-PyTorch reference of the torch.ops.allocmoe operators: the executable form of docs/OPS.md.

Written independently of the C++ kernels and for clarity, not speed: tensor sorts with explicit
tie-break keys instead of partial sorts, one gathered matmul per slot instead of expert buckets.
"""

from __future__ import annotations

import math

import torch

SCORINGS = ("softmax", "softmax_group", "sigmoid_group", "topk_softmax")


def _sort_desc_ties_to_lower_index(score: torch.Tensor) -> torch.Tensor:
    """Indices ordering the last dim by the key (-score, index): score descending, ties to the
    lower index. A stable sort keeps equal scores in index order, which is that tie-break."""
    return torch.argsort(score, dim=-1, descending=True, stable=True)


def alloc_total_slots(budget: float, T: int, k_base: int, top_k: int) -> int:
    """round-half-up(budget * T) (Python floats are doubles), clamped to [k_base*T, top_k*T]."""
    return min(max(math.floor(budget * T + 0.5), k_base * T), top_k * T)


def scores(logits: torch.Tensor, scoring: str, correction_bias: torch.Tensor | None = None):
    """(p, c) in fp32: p becomes the gate weight, c is the selection score (docs/OPS.md step 1)."""
    x = logits.float()
    if scoring == "sigmoid_group":
        p = torch.sigmoid(x)
        c = p + correction_bias if correction_bias is not None else p
        return p, c
    p = _softmax(x)
    return p, p


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """fp32 softmax over the last dim whose denominator does not depend on the order of the
    experts (docs/OPS.md step 1): each exp(x - max), in [0, 1], cut at 2^-20 and 2^-40 and the
    pieces summed exactly, then rounded once to fp32. The exps are taken in float64 and rounded,
    so that equal inputs give equal exps wherever they sit in the tensor."""
    e = torch.exp((x - x.max(dim=-1, keepdim=True).values).double()).float()
    scaled = e * 2.0**20
    hi = torch.trunc(scaled)
    lo = torch.trunc((scaled - hi) * 2.0**20)
    total = (hi.double().sum(dim=-1, keepdim=True) * 2.0**-20 + lo.double().sum(dim=-1, keepdim=True) * 2.0**-40)
    return e / total.float()


def eligible_mask(c: torch.Tensor, scoring: str, n_group: int, topk_group: int) -> torch.Tensor:
    """[T, E] bool: experts in each token's topk_group best groups (all True for non-group scorings)."""
    T, E = c.shape
    if scoring not in ("softmax_group", "sigmoid_group"):
        return torch.ones_like(c, dtype=torch.bool)
    grouped = c.view(T, n_group, E // n_group)
    if scoring == "softmax_group":
        group_score = grouped.max(dim=-1).values
    else:
        group_score = grouped.topk(min(2, E // n_group), dim=-1).values.sum(dim=-1)
    best_groups = _sort_desc_ties_to_lower_index(group_score)[:, :topk_group]
    group_ok = torch.zeros(T, n_group, dtype=torch.bool, device=c.device)
    group_ok.scatter_(1, best_groups, True)
    return group_ok.repeat_interleave(E // n_group, dim=1)


def candidates(logits, top_k, scoring="softmax", correction_bias=None, n_group=1, topk_group=1):
    """Each token's top_k eligible experts sorted by c (ties to lower id): (ids, p, c), each [T, top_k]."""
    p, c = scores(logits, scoring, correction_bias)
    masked = c.masked_fill(~eligible_mask(c, scoring, n_group, topk_group), float("-inf"))
    ids = _sort_desc_ties_to_lower_index(masked)[:, :top_k]
    return ids, p.gather(1, ids), c.gather(1, ids)


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
):
    """Reference of torch.ops.allocmoe.route: (weights [T, top_k] fp32, ids [T, top_k] int32)."""
    T = router_logits.shape[0]
    ids, p, c = candidates(router_logits, top_k, scoring, correction_bias, n_group, topk_group)

    # Alloc-T: ranks < k_base always kept; the rest compete globally. Flattening the pool in
    # (token, rank) order makes the flat position the (token, rank) tie-break key.
    keep = torch.zeros(T, top_k, dtype=torch.bool)
    keep[:, :k_base] = True
    extra = alloc_total_slots(budget, T, k_base, top_k) - k_base * T
    pool = c[:, k_base:].reshape(-1)
    order = _sort_desc_ties_to_lower_index(pool)
    chosen = torch.zeros(pool.numel(), dtype=torch.bool)
    chosen[order[:extra]] = True
    keep[:, k_base:] = chosen.view(T, top_k - k_base)

    w = torch.where(keep, p, torch.zeros_like(p))
    if norm_topk_prob or scoring == "topk_softmax":
        total = w.sum(dim=-1, keepdim=True)
        w = torch.where(total > 0, w / torch.where(total > 0, total, torch.ones_like(total)), w)
    w = w * routed_scaling_factor
    ids = torch.where(keep, ids, torch.full_like(ids, -1))
    return w.float(), ids.to(torch.int32)


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
    """Reference of torch.ops.allocmoe.experts: [T, H] in hidden's dtype."""
    T, H = hidden.shape
    I = gate_up.shape[1] // 2
    dtype = hidden.dtype
    x = hidden.float()
    out = torch.zeros(T, H, dtype=torch.float32)
    for k in range(ids.shape[1]):
        e = ids[:, k].long()
        valid = e >= 0
        e = e.clamp(min=0)  # any expert for skipped slots; their result is masked out below
        g = torch.einsum("th,tjh->tj", x, gate_up[e].float())
        if gate_up_bias is not None:
            g = g + gate_up_bias[e].float()
        if activation == "silu":
            gate, up = g[:, :I], g[:, I:]
            a = torch.nn.functional.silu(gate) * up
        else:
            gate, up = g[:, 0::2], g[:, 1::2]
            gate = gate.clamp(max=swiglu_limit)
            up = up.clamp(min=-swiglu_limit, max=swiglu_limit)
            a = (up + 1) * gate * torch.sigmoid(swiglu_alpha * gate)
        a = a.to(dtype).float()  # the intermediate is stored in the input dtype
        y = torch.einsum("thi,ti->th", down[e].float(), a)
        if down_bias is not None:
            y = y + down_bias[e].float()
        out += torch.where(valid[:, None], weights[:, k, None] * y, torch.zeros_like(y))
    return out.to(dtype)
