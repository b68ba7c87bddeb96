"""Token policies: how one MoE layer turns router logits into kept (weight, expert) slots.

A policy is per layer and says how many routed experts a token gets on average (``budget``,
the paper's K_l) and how they are chosen:

- ``topk``: plain top-K_l. A fractional K_l means every token keeps floor(K_l) experts and the
  remaining round(K_l*T) - floor(K_l)*T slots of the call go to the best-scoring next candidates
  (Alloc-T with K_base = floor(K_l)); an integer K_l is exactly top-K_l.
- ``alloc_t``: Alloc-T, every token keeps its top ``k_base``, the rest of round(K_l*T) slots go
  to the highest routing scores among all tokens' remaining top-K candidates.
- ``top_p`` (Dynamic-MoE baseline) and ``naee_skip`` (NAEE baseline): per-token thresholds,
  calibrated to a target average budget.

``RoutingSpec`` is what the model's own router does (scoring function, groups, renormalisation),
filled in by the model integration for each architecture.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, asdict

import torch

POLICY_KINDS = ("topk", "alloc_t", "top_p", "naee_skip")
SCORINGS = ("softmax", "softmax_group", "sigmoid_group", "topk_softmax")


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

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "TokenPolicy":
        return TokenPolicy(**d)
