"""The plan file: which policy every MoE layer of one model runs, and where it came from.

JSON, for example::

    {"kind": "allocmoe-plan", "schema_version": 1,
     "model": {"architecture": "deepseek_v2", "num_moe_layers": 26, "num_experts": 64, "top_k": 6},
     "budget": 78, "allocation": "alloc_l",
     "policies": [{"kind": "alloc_t", "budget": 5.0, "k_base": 1, "threshold": null}, ...],
     "profile": {"method": "alloc_l", "matrix": [[...], ...], "normalisation": "...",
                 "calibration": {"source": "...", "tokens": 65536, ...}, "date": "...", ...},
     "created": "2026-...", "notes": ""}

``budget`` is the global budget B = sum of the layers' K_l; ``profile`` is the full profile
(``profiling.Profile.to_dict()``) the allocation was computed from, or null for profile-free
allocations (uniform, ascending, descending). ``check_fits(model_info)`` refuses a plan made for
another model (architecture, MoE layer count, experts or top_k differ).
"""
from __future__ import annotations

import datetime
import json
import math
import os
from dataclasses import dataclass, field
from typing import Sequence

from .policies import POLICY_KINDS, TokenPolicy

PLAN_SCHEMA_VERSION = 1
IDENTITY_KEYS = ("architecture", "num_moe_layers", "num_experts", "top_k")


class PlanMismatchError(ValueError):
    """A plan applied to a model it was not made for."""


@dataclass
class Plan:
    model: dict  # identity: architecture, num_moe_layers, num_experts, top_k
    policies: list  # one TokenPolicy per MoE layer, in depth order
    budget: float | None = None  # global B = sum of per-layer K_l (None: full budget)
    allocation: str = ""  # how the per-layer K_l were chosen (alloc_l, lexi, uniform, ...)
    profile: dict | None = None  # profiling.Profile.to_dict() the allocation came from
    created: str = ""
    notes: str = ""
    schema_version: int = PLAN_SCHEMA_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        missing = [k for k in IDENTITY_KEYS if k not in self.model]
        if missing:
            raise ValueError(f"plan model identity lacks {missing}")
        self.model = {k: self.model[k] for k in IDENTITY_KEYS}
        self.policies = [p if isinstance(p, TokenPolicy) else TokenPolicy.from_dict(p) for p in self.policies]
        L, K = self.model["num_moe_layers"], self.model["top_k"]
        if len(self.policies) != L:
            raise ValueError(f"plan has {len(self.policies)} policies for a model with {L} MoE layers")
        for i, p in enumerate(self.policies):
            if p.budget is not None and not 0 < p.budget <= K + 1e-9:
                raise ValueError(f"plan policy of layer {i} has budget {p.budget}, outside (0, top_k={K}]")
            if p.kind in ("top_p", "naee_skip") and p.threshold is None:
                raise ValueError(f"plan policy of layer {i} is {p.kind} without a calibrated threshold")
        if not self.created:
            self.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    # ----- content ------------------------------------------------------------------------
    @property
    def layer_budgets(self) -> list[float]:
        """K_l of every layer (None budgets mean the model's top_k)."""
        return [p.effective_budget(self.model["top_k"]) for p in self.policies]

    def check_fits(self, model_info: dict) -> None:
        """Raise ``PlanMismatchError`` naming every field where the plan and the model differ."""
        diffs = [f"{k}: plan {self.model[k]!r} vs model {model_info.get(k)!r}"
                 for k in IDENTITY_KEYS if self.model[k] != model_info.get(k)]
        if diffs:
            raise PlanMismatchError("plan was made for another model (" + "; ".join(diffs) + ")")

    # ----- file ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "kind": "allocmoe-plan",
            "schema_version": self.schema_version,
            "model": dict(self.model),
            "budget": self.budget,
            "allocation": self.allocation,
            "policies": [p.to_dict() for p in self.policies],
            "profile": self.profile,
            "created": self.created,
            "notes": self.notes,
            "extra": self.extra,
        }

    @staticmethod
    def from_dict(d: dict) -> "Plan":
        if not isinstance(d, dict) or d.get("kind") != "allocmoe-plan":
            raise ValueError("not an allocmoe plan (missing kind='allocmoe-plan')")
        if d.get("schema_version") != PLAN_SCHEMA_VERSION:
            raise ValueError(f"plan schema_version {d.get('schema_version')!r} is not supported "
                             f"(this version reads {PLAN_SCHEMA_VERSION})")
        fields = {k: v for k, v in d.items() if k != "kind"}
        try:
            return Plan(**fields)
        except TypeError as e:
            raise ValueError(f"malformed plan: {e}") from None

    def save(self, path) -> None:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)

    @staticmethod
    def load(path) -> "Plan":
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return Plan.from_dict(d)

    def summary(self) -> str:
        ks = " ".join(f"{k:g}" for k in self.layer_budgets)
        kinds = sorted({p.kind for p in self.policies})
        return (f"plan for {self.model['architecture']} ({self.model['num_moe_layers']} MoE layers, "
                f"{self.model['num_experts']} experts, top_k={self.model['top_k']}): "
                f"allocation={self.allocation or '-'} policy={','.join(kinds)} "
                f"B={sum(self.layer_budgets):g} K_l=[{ks}]")


def check_fits(plan: Plan, model_info: dict) -> None:
    """Module-level form of ``Plan.check_fits``."""
    plan.check_fits(model_info)


def make_plan(model_info: dict, layer_budgets: Sequence[float], kind: str = "topk", k_base: int = 1,
              thresholds: Sequence[float] | None = None, allocation: str = "", profile=None,
              notes: str = "") -> Plan:
    """A plan giving layer l the policy ``kind`` with budget K_l = layer_budgets[l]."""
    if kind not in POLICY_KINDS:
        raise ValueError(f"policy kind must be one of {POLICY_KINDS}, got {kind!r}")
    L = model_info["num_moe_layers"]
    if len(layer_budgets) != L:
        raise ValueError(f"layer_budgets has {len(layer_budgets)} entries, the model has {L} MoE layers")
    if thresholds is not None and len(thresholds) != L:
        raise ValueError(f"thresholds has {len(thresholds)} entries, the model has {L} MoE layers")
    policies = []
    for i, b in enumerate(layer_budgets):
        kb = k_base
        if kind == "alloc_t":
            kb = min(k_base, int(math.floor(b + 1e-9)))  # a layer at K_l < k_base keeps K_l each
        policies.append(TokenPolicy(kind, float(b), k_base=kb,
                                    threshold=None if thresholds is None else float(thresholds[i])))
    if profile is not None and hasattr(profile, "to_dict"):
        profile = profile.to_dict()
    return Plan(model={k: model_info[k] for k in IDENTITY_KEYS}, policies=policies,
                budget=float(sum(layer_budgets)), allocation=allocation, profile=profile, notes=notes)


def build_plan(model_info: dict, budget: float | None = None, allocation: str = "uniform",
               policy: str = "topk", k_base: int = 1, profile=None, model=None, calib_batches=None,
               exact_budget: bool = False, notes: str = "") -> Plan:
    """The plan of one (allocation, policy, budget) setting: what ``allocmoe plan`` writes.

    ``allocation``: alloc_l / lexi (need ``profile``, a ``profiling.Profile`` measured with that
    method on this model), uniform, ascending or descending. ``budget``: global B (None: full).
    ``policy``: the token policy of every layer; ``top_p`` / ``naee_skip`` calibrate per-layer
    thresholds on ``calib_batches`` through ``model`` (integrated; its policies are left at
    full budget afterwards). ``exact_budget``: alloc_l spends exactly B.
    """
    from .allocation import allocation_for

    L, K = model_info["num_moe_layers"], model_info["top_k"]
    if profile is not None:
        mine = {k: model_info[k] for k in IDENTITY_KEYS}
        theirs = {k: profile.model.get(k) for k in IDENTITY_KEYS}
        if theirs != mine:
            raise PlanMismatchError(f"profile was measured on another model ({theirs}), this one is {mine}")
    if allocation in ("alloc_l", "lexi"):
        if profile is None:
            raise ValueError(f"allocation {allocation!r} needs a profile (measured with method {allocation!r})")
        if profile.method != allocation:
            raise ValueError(f"allocation {allocation!r} needs a profile measured with method {allocation!r}, "
                             f"got a {profile.method!r} profile")
    B = float(L * K) if budget is None else budget
    matrix = profile.tensor().numpy() if allocation in ("alloc_l", "lexi") else None
    ks = allocation_for(allocation, B, L, K, matrix, exact=exact_budget)
    thresholds = None
    if policy in ("top_p", "naee_skip"):
        if model is None or calib_batches is None:
            raise ValueError(f"policy {policy!r} calibrates its thresholds: give model and calib_batches")
        from . import integration
        from .policies import calibrate_model

        calibrated = calibrate_model(model, calib_batches, policy, ks)
        integration.set_policies(model, None)
        thresholds = [p.threshold for p in calibrated]
    return make_plan(model_info, ks, kind=policy, k_base=k_base, thresholds=thresholds, allocation=allocation,
                     profile=profile, notes=notes or f"budget={B:g} allocation={allocation} policy={policy}")
