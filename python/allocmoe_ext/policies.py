"""Token policies: how one MoE layer turns router logits into kept (weight, expert) slots.

A policy is per layer and says how many routed experts a token gets on average (``budget``,
the paper's K_l) and how they are chosen:

- ``topk``: plain top-K_l. A fractional K_l means every token keeps floor(K_l) experts and the
  remaining round(K_l*T) - floor(K_l)*T slots of the call go to the best-scoring next candidates,
  i.e. the rank-floor(K_l) candidates of the tokens (Alloc-T over the top-ceil(K_l) candidates
  with K_base = floor(K_l)): every token gets floor(K_l) or ceil(K_l) experts and the layer's
  total is round(K_l * T), the same count Alloc-T spends. An integer K_l is exactly top-K_l.
- ``alloc_t``: Alloc-T, every token keeps its top ``k_base``, the rest of round(K_l*T) slots go
  to the highest routing scores among all tokens' remaining top-K candidates.
- ``top_p`` (Dynamic-MoE baseline) and ``naee_skip`` (NAEE baseline): per-token thresholds,
  calibrated to a target average budget (``calibrate_threshold``); ``budget`` is then only the
  calibration target, the realised count follows from ``threshold``.

Both threshold policies start from the model's full top-K candidates (sorted by routing score)
and keep a prefix of them:

- ``top_p`` with threshold p: keep the smallest prefix whose probability mass reaches p (the
  candidate that crosses p is kept), i.e. keep rank r iff the mass of ranks < r is below p.
  The mass is measured on the router's own probabilities of the candidates, *not* renormalised
  over the candidates (as Dynamic-MoE does it over the softmax of all experts): for softmax
  scorings that is the full softmax, for ``topk_softmax`` the softmax over the top-K logits.
  ``sigmoid_group`` probabilities are not a distribution, so there they are normalised to sum 1
  over the top-K candidates first. The count is clamped to [1, top_k] by construction.
- ``naee_skip`` with threshold beta: rank 0 is always kept; rank r >= 1 is kept iff
  w_s >= beta * w_0 for every 1 <= s <= r (for softmax scorings w is sorted, so this is just
  w_r >= beta * w_0; the prefix form keeps the kept slots a prefix for ``sigmoid_group`` too,
  where the selection score and the gate weight can disagree on order).

Gate weights of kept experts are the model's own (docs/OPS.md): renormalised over the kept slots
only where the model renormalises (``norm_topk_prob`` or ``topk_softmax``), then scaled by
``routed_scaling_factor``. Dropped slots have id -1 and weight 0, always at the end of a row.

``RoutingSpec`` is what the model's own router does (scoring function, groups, renormalisation),
filled in by the model integration for each architecture.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, asdict
from typing import Iterable, Sequence

import torch

POLICY_KINDS = ("topk", "alloc_t", "top_p", "naee_skip")
THRESHOLD_KINDS = ("top_p", "naee_skip")
SCORINGS = ("softmax", "softmax_group", "sigmoid_group", "topk_softmax")

# Calibration hits the target average within this relative tolerance (issue 3: within 1%).
CALIBRATION_RTOL = 0.01


@dataclass(frozen=True)
class RoutingSpec:
    """The model's own routing, as the ``route`` op understands it (see docs/OPS.md)."""

    num_experts: int
    top_k: int
    scoring: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")

    @property
    def renormalises(self) -> bool:
        """Whether the model renormalises gate weights over the kept experts."""
        return self.norm_topk_prob or self.scoring == "topk_softmax"


@dataclass(frozen=True)
class TokenPolicy:
    """Per-layer token policy. ``budget`` is K_l, the average routed experts per token."""

    kind: str = "topk"
    budget: float | None = None  # None: the model's own top_k (full budget)
    k_base: int = 1
    threshold: float | None = None  # p for top_p, beta for naee_skip (set by calibration)

    def __post_init__(self):
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"policy kind must be one of {POLICY_KINDS}, got {self.kind!r}")
        if self.budget is not None and not (isinstance(self.budget, (int, float)) and math.isfinite(self.budget)):
            raise ValueError(f"policy budget must be a finite number or None, got {self.budget!r}")
        if self.budget is not None and self.budget < 0:
            raise ValueError(f"policy budget must be >= 0, got {self.budget}")
        if not isinstance(self.k_base, int) or self.k_base < 0:
            raise ValueError(f"policy k_base must be a non-negative int, got {self.k_base!r}")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"policy threshold must be finite or None, got {self.threshold!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "TokenPolicy":
        return TokenPolicy(**d)

    def effective_budget(self, top_k: int) -> float:
        """K_l for a layer whose model top-k is ``top_k`` (None means full budget)."""
        return float(top_k) if self.budget is None else float(self.budget)


def _route_op(router_logits, spec: RoutingSpec, budget: float, k_base: int, correction_bias,
              renormalise: bool, scale: float):
    return torch.ops.allocmoe.route(
        router_logits, spec.top_k, float(budget), int(k_base), spec.scoring, correction_bias,
        spec.n_group, spec.topk_group, bool(renormalise), float(scale))


def _check_logits(router_logits, spec: RoutingSpec):
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        raise ValueError("router_logits must be a 2-D tensor [T, num_experts], got "
                         f"{getattr(router_logits, 'shape', type(router_logits))}")
    if router_logits.shape[1] != spec.num_experts:
        raise ValueError(f"router_logits has {router_logits.shape[1]} experts, the spec says "
                         f"num_experts={spec.num_experts}")


def candidate_probs(router_logits: torch.Tensor, spec: RoutingSpec, correction_bias=None):
    """The model's full top-K candidates: (raw probabilities p [T, K] fp32, ids [T, K] int32),
    sorted by routing score, before any renormalisation or scaling."""
    _check_logits(router_logits, spec)
    return _route_op(router_logits, spec, spec.top_k, spec.top_k, correction_bias, False, 1.0)


def threshold_keys(kind: str, probs: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """Per-slot key that decides keeping under a threshold policy, shared by routing and
    calibration so that both count exactly the same way.

    ``top_p``: slot kept iff key < p (key = probability mass of the higher-ranked candidates).
    ``naee_skip``: slot kept iff key >= beta (key = running min of w_s / w_0, +inf at rank 0).
    """
    if kind == "top_p":
        mass = probs
        if spec.scoring == "sigmoid_group":
            mass = probs / probs.sum(dim=1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
        return torch.cumsum(mass, dim=1) - mass  # exclusive prefix mass
    if kind == "naee_skip":
        first = probs[:, :1].clamp_min(torch.finfo(probs.dtype).tiny)
        ratio = probs / first
        ratio[:, 0] = math.inf
        return torch.cummin(ratio, dim=1).values
    raise ValueError(f"threshold kind must be one of {THRESHOLD_KINDS}, got {kind!r}")


def _keep_mask(kind: str, keys: torch.Tensor, threshold: float) -> torch.Tensor:
    return keys < threshold if kind == "top_p" else keys >= threshold


def _apply_mask(probs, ids, keep, spec: RoutingSpec):
    weights = torch.where(keep, probs, torch.zeros_like(probs))
    if spec.renormalises:
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    ids = torch.where(keep, ids, torch.full_like(ids, -1))
    return weights, ids


def _check_threshold(kind: str, threshold):
    if threshold is None:
        raise ValueError(f"policy.threshold is None for a {kind} policy: calibrate it first "
                         "(policies.calibrate_threshold)")
    if kind == "top_p" and not 0.0 < threshold <= 1.0:
        raise ValueError(f"policy.threshold (p) of a top_p policy must be in (0, 1], got {threshold}")
    if kind == "naee_skip" and threshold < 0.0:
        raise ValueError(f"policy.threshold (beta) of a naee_skip policy must be >= 0, got {threshold}")


def route_op_args(spec: RoutingSpec, policy: TokenPolicy) -> tuple[int, float, int]:
    """``(top_k, budget, k_base)`` of the one ``route`` op call that realises a topk/alloc_t policy.

    The single place that maps a policy onto the op: ``route_tokens`` and the fused ``moe`` path
    of the model integration (which gets no ids back, so it must pass the same arguments) both
    use it. Fractional top-k (floor(K_l) each, the next candidate for the best-scoring tokens) is
    Alloc-T over the first ceil(K_l) candidates of the model's top-K list, groups included.
    """
    top_k = spec.top_k
    budget = policy.effective_budget(top_k)
    if policy.kind == "alloc_t":
        k_base = policy.k_base
    elif policy.kind == "topk":
        # Tolerance: B/L style budgets like 2.9999999999 mean 3, not "2 plus 99.99%".
        k_base = min(int(math.floor(budget + 1e-9)), top_k)
    else:
        raise ValueError(f"route_op_args needs a topk or alloc_t policy, got {policy.kind!r}")
    if k_base > top_k:
        raise ValueError(f"policy.k_base={k_base} exceeds the model top_k={top_k}")
    if not k_base <= budget + 1e-9 or budget > top_k + 1e-9:
        raise ValueError(f"policy.budget={budget} must be in [k_base={k_base}, top_k={top_k}]")
    budget = min(max(budget, float(k_base)), float(top_k))
    if policy.kind == "alloc_t":
        return top_k, budget, k_base
    k_ceil = min(max(int(math.ceil(budget - 1e-9)), 1), top_k)
    return k_ceil, budget, min(k_base, k_ceil)


def route_tokens(router_logits: torch.Tensor, spec: RoutingSpec, policy: TokenPolicy,
                 correction_bias: torch.Tensor | None = None):
    """Route T tokens of one layer under ``policy``.

    Returns (weights fp32 [T, top_k], ids int32 [T, top_k]); kept slots are a prefix of each
    row, dropped slots have id -1 and weight 0. ``correction_bias`` is the DeepSeek-V3 router
    bias (``sigmoid_group`` only).
    """
    _check_logits(router_logits, spec)
    if policy.kind in ("topk", "alloc_t"):
        k, budget, k_base = route_op_args(spec, policy)
        sub = spec if k == spec.top_k else dataclasses.replace(spec, top_k=k)
        weights, ids = _route_op(router_logits, sub, budget, k_base, correction_bias,
                                 spec.norm_topk_prob, spec.routed_scaling_factor)
        if k < spec.top_k:  # pad the row back to the model's top_k slots
            pad = spec.top_k - k
            weights = torch.nn.functional.pad(weights, (0, pad), value=0.0)
            ids = torch.nn.functional.pad(ids, (0, pad), value=-1)
        return weights, ids
    _check_threshold(policy.kind, policy.threshold)
    probs, ids = candidate_probs(router_logits, spec, correction_bias)
    keep = _keep_mask(policy.kind, threshold_keys(policy.kind, probs, spec), policy.threshold)
    return _apply_mask(probs, ids, keep, spec)


def kept_per_token(ids: torch.Tensor) -> torch.Tensor:
    """Number of kept experts of every token (int64 [T])."""
    return (ids >= 0).sum(dim=1)


# ----------------------------------------------------------------------------- calibration

def _as_logit_list(router_logits_samples) -> list[torch.Tensor]:
    if isinstance(router_logits_samples, torch.Tensor):
        samples = [router_logits_samples]
    else:
        samples = list(router_logits_samples)
    if not samples:
        raise ValueError("router_logits_samples is empty: calibration needs tokens")
    return samples


def _keys_for_samples(kind, router_logits_samples, spec, correction_bias) -> torch.Tensor:
    keys = []
    for logits in _as_logit_list(router_logits_samples):
        probs, _ = candidate_probs(logits.reshape(-1, logits.shape[-1]), spec, correction_bias)
        keys.append(threshold_keys(kind, probs, spec))
    keys = torch.cat(keys)
    if keys.shape[0] == 0:
        raise ValueError("router_logits_samples hold no tokens: calibration needs tokens")
    return keys


def calibrate_threshold(kind: str, router_logits_samples, spec: RoutingSpec, target_budget: float,
                        correction_bias: torch.Tensor | None = None, rtol: float = CALIBRATION_RTOL,
                        iterations: int = 64) -> float:
    """Threshold (p for ``top_p``, beta for ``naee_skip``) whose realised average experts per
    token on the calibration logits is ``target_budget`` within ``rtol`` (relative).

    Bisection on the threshold: the realised average is monotone in it (non-decreasing in p,
    non-increasing in beta). Raises ValueError when the target cannot be hit (outside
    [1, top_k], or too few calibration tokens to resolve it).
    """
    if kind not in THRESHOLD_KINDS:
        raise ValueError(f"kind must be one of {THRESHOLD_KINDS}, got {kind!r}")
    if not (isinstance(target_budget, (int, float)) and math.isfinite(target_budget)) \
            or not 1.0 <= target_budget <= spec.top_k:
        raise ValueError(f"target_budget must be in [1, top_k={spec.top_k}], got {target_budget!r}")
    keys = _keys_for_samples(kind, router_logits_samples, spec, correction_bias).double()
    n_tokens = keys.shape[0]

    def realised(threshold: float) -> float:
        return _keep_mask(kind, keys, threshold).sum().item() / n_tokens

    if kind == "top_p":
        lo, hi = 0.0, 1.0  # realised(lo+) = 1 expert, realised(1) = (almost) all top_k
        increasing = True
    else:
        finite = keys[torch.isfinite(keys)]
        lo, hi = 0.0, (finite.max().item() * 2.0 + 1.0) if finite.numel() else 1.0
        increasing = False
    best, best_err = None, math.inf
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if kind == "top_p" and mid <= 0.0:
            break
        value = realised(mid)
        err = abs(value - target_budget)
        if err < best_err:
            best, best_err = mid, err
        if value == target_budget:
            break
        if (value < target_budget) == increasing:
            lo = mid
        else:
            hi = mid
    # The ends of the range are thresholds too (p = 1 keeps all candidates, beta = 0 as well).
    for end in ((hi,) if kind == "top_p" else (lo,)):
        err = abs(realised(end) - target_budget)
        if err < best_err:
            best, best_err = end, err
    if best_err > rtol * target_budget:
        raise ValueError(
            f"cannot calibrate {kind} to target_budget={target_budget} within {rtol:.0%} on "
            f"{n_tokens} calibration tokens (closest realised average "
            f"{realised(best):.4f} at threshold {best:.6g}); use more calibration tokens")
    return float(best)


def realised_average(kind: str, threshold: float, router_logits_samples, spec: RoutingSpec,
                     correction_bias: torch.Tensor | None = None) -> float:
    """Average kept experts per token of a threshold policy on the given logits."""
    _check_threshold(kind, threshold)
    keys = _keys_for_samples(kind, router_logits_samples, spec, correction_bias).double()
    return _keep_mask(kind, keys, threshold).sum().item() / keys.shape[0]


# ----------------------------------------------------------------- per-layer model calibration

class _StopForward(Exception):
    """Raised from a hook once the layer being calibrated has seen its input: the rest of the
    model's forward is not needed."""


def _hidden_from_call(args, kwargs):
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise RuntimeError("cannot find the hidden states in the MoE block's call arguments")


def module_correction_bias(layer) -> torch.Tensor | None:
    """The DeepSeek-V3 router bias of an AllocMoE block, if it has one."""
    bias = getattr(layer, "correction_bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


@torch.no_grad()
def capture_router_logits(model, batches: Sequence[torch.Tensor], layer_index: int,
                          stop_after: bool = True) -> list[torch.Tensor]:
    """Router logits [T, E] of MoE layer ``layer_index`` for every batch, under the policies
    currently set on the model. With ``stop_after`` the forward is cut right after the layer's
    input is seen (the deeper layers do not run)."""
    from . import integration

    layers = integration.moe_layers(model)
    if not 0 <= layer_index < len(layers):
        raise ValueError(f"layer_index must be in [0, {len(layers)}), got {layer_index}")
    layer = layers[layer_index]
    captured: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        hidden = _hidden_from_call(args, kwargs)
        captured.append(module.router_logits(hidden.reshape(-1, hidden.shape[-1])).float())
        if stop_after:
            raise _StopForward

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for input_ids in batches:
            try:
                model(input_ids=input_ids, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def calibrate_model(model, batches: Iterable[torch.Tensor], kind: str,
                    budgets: float | Sequence[float], rtol: float = CALIBRATION_RTOL) -> list[TokenPolicy]:
    """Calibrate a per-layer ``top_p`` / ``naee_skip`` threshold for every MoE layer of an
    integrated model so that each layer's realised average on ``batches`` is its budget.

    Layers are calibrated in depth order, each with the earlier layers already under their
    calibrated policies, so every layer is calibrated on the inputs it will really see. The
    policies are left set on the model and returned.
    """
    from . import integration

    if kind not in THRESHOLD_KINDS:
        raise ValueError(f"kind must be one of {THRESHOLD_KINDS}, got {kind!r}")
    batches = list(batches)
    layers = integration.moe_layers(model)
    n_layers = len(layers)
    if isinstance(budgets, (int, float)):
        budgets = [float(budgets)] * n_layers
    budgets = [float(b) for b in budgets]
    if len(budgets) != n_layers:
        raise ValueError(f"budgets has {len(budgets)} entries, the model has {n_layers} MoE layers")
    policies = [TokenPolicy("topk", None) for _ in range(n_layers)]
    for i, layer in enumerate(layers):
        integration.set_policies(model, policies)
        logits = capture_router_logits(model, batches, i)
        beta = calibrate_threshold(kind, logits, layer.spec, budgets[i],
                                   correction_bias=module_correction_bias(layer), rtol=rtol)
        policies[i] = TokenPolicy(kind, budgets[i], threshold=beta)
    integration.set_policies(model, policies)
    return policies
