"""Layer-level budget allocation: how many routed experts K_l each MoE layer gets under a
global budget B = sum_l K_l.

Profiles are matrices ``S[L, K]`` with ``S[i, k-1]`` the cost (sensitivity) of running layer i
with k experts per token, k = 1..K (K = the model's top_k); lower is better.

- ``allocate(S, B)``: Alloc-L, the exact grouped-knapsack DP
  min sum_i S[i, K_i]  s.t.  sum_i K_i <= B,  k_min <= K_i <= K  (integers), O(L * B * K).
  Ties between optimal schedules go to the lexicographically largest (K_0, K_1, ...): the
  shallower layer gets more experts (the direction the paper observes), so the answer is
  deterministic.
- ``lexi(D, B)``: the same DP on a LExI profile (the paper's evolutionary search made exact),
  spending exactly B as LExI does (``allocate(..., exact=True)``).
- ``uniform(L, K, B)``: every layer K_l = B / L, a real number; the ``topk`` policy spends a
  fractional K_l as floor(K_l) experts per token plus the best-scoring next candidates up to
  round(K_l * T) slots per call (see policies.py), so the total is the budget's.
- ``ascending`` / ``descending``: monotone integer schedules summing exactly to B, a linear
  ramp around the mean B / L as steep as [k_min, K] allows (from k_min to 2B/L - k_min, or from
  2B/L - K to K), rounded by largest remainders (ties to the deeper layer for ascending,
  the shallower one for descending), which keeps it monotone.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _check_counts(num_layers, top_k, k_min):
    if not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if not isinstance(k_min, (int, np.integer)) or not 1 <= k_min <= top_k:
        raise ValueError(f"k_min must be an int in [1, top_k={top_k}], got {k_min!r}")


def _check_budget(budget, num_layers, top_k, k_min, integer: bool) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)) \
            or not math.isfinite(budget):
        raise ValueError(f"budget must be a finite number, got {budget!r}")
    lo, hi = num_layers * k_min, num_layers * top_k
    if not lo <= budget <= hi:
        raise ValueError(f"budget={budget} is outside [L*k_min, L*top_k] = [{lo}, {hi}] "
                         f"(L={num_layers} MoE layers, k_min={k_min}, top_k={top_k})")
    if integer and budget != int(budget):
        raise ValueError(f"budget must be an integer number of activations here, got {budget}")
    return budget


def check_profile(S) -> np.ndarray:
    """A profile as a float64 array [L, K]; clear errors for a wrong shape or non-finite entries."""
    try:
        S = np.asarray(S, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"profile S must be a numeric [L, K] matrix: {e}") from None
    if S.ndim != 2 or S.shape[0] < 1 or S.shape[1] < 1:
        raise ValueError(f"profile S must be a 2-D [num_layers, top_k] matrix, got shape {S.shape}")
    bad = ~np.isfinite(S)
    if bad.any():
        i, k = np.argwhere(bad)[0]
        raise ValueError(f"profile S has {int(bad.sum())} non-finite entries (NaN/inf), "
                         f"first at layer {i}, k={k + 1}")
    return S


def allocate(S, budget, k_min: int = 1, expect_shape: tuple[int, int] | None = None,
             exact: bool = False) -> list[int]:
    """Alloc-L: the exact minimiser of sum_i S[i, K_i - 1] with sum_i K_i <= budget
    (``exact=True``: sum_i K_i == budget, for comparisons at an equal budget even where a noisy
    profile says fewer experts would be better).

    ``S`` is [L, K] (``S[i, k-1]`` = cost of layer i at k experts). ``expect_shape`` (L, K)
    checks the profile against the model it is meant for. Returns K_i per layer.
    """
    S = check_profile(S)
    if expect_shape is not None and tuple(S.shape) != tuple(expect_shape):
        raise ValueError(f"profile S has shape {tuple(S.shape)}, the model needs "
                         f"{tuple(expect_shape)} (num_moe_layers, top_k)")
    L, K = S.shape
    _check_counts(L, K, k_min)
    B = int(_check_budget(budget, L, K, k_min, integer=True))

    # Suffix DP: F[i, b] = min cost of layers i..L-1 with at most b activations in total;
    # F[L, b] = 0 for every b >= 0 (unused budget is allowed; exact: only F[L, 0]). Computed from the deepest layer
    # up so that the reconstruction can walk from the shallowest layer down and prefer, at each
    # layer, the largest k that stays optimal.
    F = np.full((L + 1, B + 1), np.inf)
    if exact:
        F[L, 0] = 0.0
    else:
        F[L, :] = 0.0
    for i in range(L - 1, -1, -1):
        for k in range(k_min, min(K, B) + 1):
            # F[i, b] <- S[i, k-1] + F[i+1, b-k] for every b >= k
            cand = S[i, k - 1] + F[i + 1, : B + 1 - k]
            np.minimum(F[i, k:], cand, out=F[i, k:])
    if not np.isfinite(F[0, B]):  # unreachable after the budget check, kept as a guard
        raise ValueError(f"no schedule fits budget={B}")

    ks, b = [], B
    for i in range(L):
        chosen = None
        for k in range(min(K, b), k_min - 1, -1):
            # Same float expression as in the DP, so an optimal choice compares exactly equal.
            if S[i, k - 1] + F[i + 1, b - k] == F[i, b]:
                chosen = k
                break
        assert chosen is not None, "DP reconstruction failed"
        ks.append(chosen)
        b -= chosen
    return ks


def schedule_cost(S, ks: Sequence[int]) -> float:
    """sum_i S[i, K_i - 1] of a schedule."""
    S = check_profile(S)
    return float(sum(S[i, k - 1] for i, k in enumerate(ks)))


def lexi(D, budget, k_min: int = 1, expect_shape: tuple[int, int] | None = None) -> list[int]:
    """LExI allocation: the exact DP on the LExI layer-output-error profile ``D[L, K]``, with
    sum k_j = budget exactly as LExI states its search."""
    return allocate(D, budget, k_min=k_min, expect_shape=expect_shape, exact=True)


def uniform(num_layers: int, top_k: int, budget, k_min: int = 1) -> list[float]:
    """Uniform: every layer gets the real K_l = budget / L (fractional where B is not a
    multiple of L; the ``topk`` policy spends it exactly, see the module docstring)."""
    _check_counts(num_layers, top_k, k_min)
    b = float(_check_budget(budget, num_layers, top_k, k_min, integer=False))
    return [b / num_layers] * num_layers


def ascending(num_layers: int, top_k: int, budget, k_min: int = 1) -> list[int]:
    """Integer schedule non-decreasing with depth, summing to ``budget`` (shallow layers fewest)."""
    _check_counts(num_layers, top_k, k_min)
    B = int(_check_budget(budget, num_layers, top_k, k_min, integer=True))
    L = num_layers
    mean = B / L
    half = min(mean - k_min, top_k - mean)  # steepest ramp that stays inside [k_min, top_k]
    if L == 1:
        ramp = np.array([mean])
    else:
        ramp = mean - half + 2.0 * half * np.arange(L) / (L - 1)
    base = np.floor(ramp + 1e-9).astype(np.int64)
    base = np.clip(base, k_min, top_k)
    extra = B - int(base.sum())
    remainder = ramp - base
    # Largest remainder first; equal remainders: the deeper layer first (keeps it non-decreasing).
    order = sorted(range(L), key=lambda i: (-round(remainder[i], 12), -i))
    for i in order[:extra]:
        base[i] += 1
    ks = [int(k) for k in base]
    assert sum(ks) == B and all(k_min <= k <= top_k for k in ks), (ks, B)
    assert all(a <= b for a, b in zip(ks, ks[1:])), ks
    return ks


def descending(num_layers: int, top_k: int, budget, k_min: int = 1) -> list[int]:
    """Integer schedule non-increasing with depth, summing to ``budget`` (shallow layers most)."""
    return ascending(num_layers, top_k, budget, k_min)[::-1]


ALLOCATIONS = ("alloc_l", "lexi", "uniform", "ascending", "descending")


def allocation_for(method: str, budget, num_layers: int, top_k: int, profile=None,
                   k_min: int = 1, exact: bool = False) -> list[float]:
    """Per-layer K_l of a named allocation method (profile needed for alloc_l / lexi;
    ``exact``: alloc_l spends the whole budget, see ``allocate``)."""
    if method in ("alloc_l", "lexi"):
        if profile is None:
            raise ValueError(f"allocation {method!r} needs a profile")
        return [float(k) for k in allocate(profile, budget, k_min, expect_shape=(num_layers, top_k),
                                           exact=exact or method == "lexi")]
    if method == "uniform":
        return uniform(num_layers, top_k, budget, k_min)
    if method == "ascending":
        return [float(k) for k in ascending(num_layers, top_k, budget, k_min)]
    if method == "descending":
        return [float(k) for k in descending(num_layers, top_k, budget, k_min)]
    raise ValueError(f"allocation method must be one of {ALLOCATIONS}, got {method!r}")
