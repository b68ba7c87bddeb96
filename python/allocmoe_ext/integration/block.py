"""``AllocMoE``: the drop-in replacement of one transformers MoE block.

The block adopts the replaced block's own submodules (router, experts, shared experts) under
the same attribute names, so its ``state_dict`` keys, shapes and the parameter objects themselves
are the ones transformers created. Its forward routes through the layer's ``TokenPolicy`` and
computes the routed experts with ``torch.ops.allocmoe.experts``; shared experts run through the
model's own modules. One subclass per family of transformers blocks says where the router and
experts live, how the router computes its logits and what the block returns.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..policies import RoutingSpec, TokenPolicy, route_op_args, route_tokens


class UnsupportedArchitectureError(ValueError):
    """The model (or block) is of an architecture the drop-in does not know."""


# Budgets such as B/L = 2.9999999999 mean 3 (the same tolerance as policies.route_tokens).
_BUDGET_TOL = 1e-9


def check_policy(policy: TokenPolicy, spec: RoutingSpec, layer_index: int) -> TokenPolicy:
    """Validate ``policy`` against the layer's routing; errors name the layer and the field."""
    if not isinstance(policy, TokenPolicy):
        raise TypeError(f"policy for layer {layer_index} must be a TokenPolicy, got {type(policy).__name__}")
    where = f"layer {layer_index} (top_k={spec.top_k})"
    if policy.budget is not None:
        b = policy.budget
        if not math.isfinite(b) or not 0 < b <= spec.top_k + _BUDGET_TOL:
            raise ValueError(f"policy.budget for {where} must be in (0, {spec.top_k}], got {b!r}")
    if not 0 <= policy.k_base <= spec.top_k:
        raise ValueError(f"policy.k_base for {where} must be in [0, {spec.top_k}], got {policy.k_base!r}")
    if policy.kind == "alloc_t" and policy.budget is not None and policy.budget < policy.k_base - _BUDGET_TOL:
        raise ValueError(
            f"policy.budget for {where} must be >= k_base={policy.k_base} for alloc_t, got {policy.budget!r}")
    if policy.kind in ("top_p", "naee_skip") and policy.threshold is None:
        raise ValueError(f"policy.threshold for {where} must be set (calibrated) for {policy.kind}")
    return policy


FUSED_MODES = ("auto", "always", "never")
# "auto" fuses calls of at most this many tokens on CUDA (decode) before sm_90, where the moe op
# is one launch. From sm_90 on, route + the experts op's stream path is faster than the fused op
# (H100, DeepSeek-V2-Lite layer, T=1: 46.4 us vs 58.0; bench/results/layer_*_2026-11-23_023008.md).
FUSED_MAX_TOKENS = 16
FUSED_BELOW_SM = 9


@functools.lru_cache(maxsize=None)
def _fuse_on_cuda_device(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] < FUSED_BELOW_SM


@functools.lru_cache(maxsize=None)
def _has_moe_kernel(device_type: str) -> bool:
    """Whether the fused ``moe`` op exists and has a kernel for this device type."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return (getattr(ops, "moe", None) is not None and key is not None
            and torch._C._dispatch_has_kernel_for_dispatch_key("allocmoe::moe", key))


def kept_slot_count(tokens: int, top_k: int, budget: float, k_base: int) -> int:
    """Slots the route op keeps for ``tokens`` tokens (docs/OPS.md: round half up, clamped)."""
    return min(max(math.floor(budget * tokens + 0.5), k_base * tokens), top_k * tokens)


class AllocMoE(nn.Module):
    """A transformers MoE block routed by a per-layer ``TokenPolicy`` through ``torch.ops.allocmoe``.

    Inference only: no gradient flows through the routing and the routed experts.

    Attributes: ``spec`` (the model's own routing), ``policy`` (how many experts, chosen how),
    ``layer_index`` (the decoder layer's index in the model), and two non-persistent counters,
    ``kept_slots`` and ``routed_tokens``, accumulated on the block's device at every forward.
    """

    # Set by each subclass: the transformers block classes it replaces (by class name, so that
    # nothing has to import every model module) and the model_types they belong to.
    block_class_names: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()

    def __init__(self, block: nn.Module, spec: RoutingSpec, layer_index: int, policy: TokenPolicy | None = None):
        super().__init__()
        self.spec = spec
        self.layer_index = int(layer_index)
        # Adopt the block's children, parameters and buffers under their own names: the state_dict
        # keys stay transformers' keys and the tensors stay the very same objects.
        for name, child in block.named_children():
            self.add_module(name, child)
        for name, param in block.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in block.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in block._non_persistent_buffers_set)
        # Kept outside the module tree (no duplicate state_dict keys) so that restore() can put it back.
        object.__setattr__(self, "_original_block", block)
        device = next(block.parameters()).device
        self.register_buffer("kept_slots", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("routed_tokens", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.policy = policy if policy is not None else TokenPolicy()
        # When router + route + routed experts run as the one fused ``moe`` op (topk/alloc_t
        # policies, SiLU experts, router without bias): "auto" = on CUDA for calls of at most
        # FUSED_MAX_TOKENS tokens before sm_90, "always", "never". Same selection as the unfused path.
        self.fused = "auto"

    # ----- construction -------------------------------------------------------------------
    @staticmethod
    def from_block(block: nn.Module, config, layer_index: int, policy: TokenPolicy | None = None) -> "AllocMoE":
        """Build the drop-in for ``block`` (a transformers MoE block of ``config``'s architecture)."""
        model_type = getattr(config, "model_type", None)
        cls = block_adapter(type(block).__name__)
        if cls is None or model_type not in cls.model_types:
            raise UnsupportedArchitectureError(
                f"unsupported MoE block {type(block).__name__} of architecture {model_type!r}; "
                f"supported architectures: {supported_architectures()}")
        cls.check_block(block, config)
        return cls(block, cls.routing_spec(block), layer_index, policy)

    @classmethod
    def routing_spec(cls, block: nn.Module) -> RoutingSpec:
        raise NotImplementedError

    @classmethod
    def check_block(cls, block: nn.Module, config) -> None:
        """Reject blocks whose experts the op cannot compute (e.g. another activation)."""
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedArchitectureError(
                f"config.hidden_act={act!r} of {type(block).__name__}: the experts op implements silu only")

    @property
    def original_block(self) -> nn.Module:
        return self._original_block

    # ----- policy -------------------------------------------------------------------------
    @property
    def policy(self) -> TokenPolicy:
        return self._policy

    @policy.setter
    def policy(self, policy: TokenPolicy) -> None:
        self._policy = check_policy(policy, self.spec, self.layer_index)

    # ----- per-architecture pieces ----------------------------------------------------------
    def router_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E] of hidden states [T, H], computed as the model's router does."""
        raise NotImplementedError

    @property
    def correction_bias(self) -> torch.Tensor | None:
        """The router's selection-score bias (DeepSeek-V3), fp32 [E], or None."""
        return None

    def _fusable_router_weight(self) -> torch.Tensor | None:
        """The router weight [E, H] if the fused op computes this router's logits, else None."""
        return None

    def _use_fused(self, hidden: torch.Tensor) -> bool:
        if self.fused not in FUSED_MODES:
            raise ValueError(f"fused must be one of {FUSED_MODES}, got {self.fused!r}")
        if (self.fused == "never" or self.policy.kind not in ("topk", "alloc_t")
                or self._fusable_router_weight() is None or not _has_moe_kernel(hidden.device.type)):
            return False
        return self.fused == "always" or (hidden.is_cuda and hidden.shape[0] <= FUSED_MAX_TOKENS
                                          and _fuse_on_cuda_device(hidden.device.index or 0))

    def _expert_operands(self) -> dict:
        """Keyword arguments of ops.experts besides hidden/weights/ids (silu experts by default)."""
        return dict(gate_up=self.experts.gate_up_proj, down=self.experts.down_proj)

    def _shared_output(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return None

    def _outputs(self, out: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor):
        return out

    # ----- forward ------------------------------------------------------------------------
    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [T,E], weights fp32 [T,top_k], ids int32 [T,top_k]) of hidden [T, H] under the policy."""
        logits = self.router_logits(hidden)
        weights, ids = route_tokens(logits, self.spec, self.policy, correction_bias=self.correction_bias)
        return logits, weights, ids

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        hidden = hidden_states.reshape(-1, shape[-1])
        # Inference only: the ops have no backward, so route and experts run without autograd
        # (a forward under grad mode works; no gradient flows through the routed experts).
        with torch.no_grad():
            if self._use_fused(hidden):
                out = self._fused_routed_experts(hidden)
                weights = logits = None  # only GPT-OSS returns them, and it is never fused
            else:
                logits, weights, ids = self.route(hidden)
                # Realised activations, counted on device: no host sync per forward.
                self.kept_slots.add_((ids >= 0).sum())
                out = ops.experts(hidden, weights=weights, ids=ids, **self._expert_operands())
            self.routed_tokens.add_(hidden.shape[0])
        shared = self._shared_output(hidden)
        if shared is not None:
            out = out + shared
        return self._outputs(out.reshape(shape), weights, logits)

    def _fused_routed_experts(self, hidden: torch.Tensor) -> torch.Tensor:
        """Router, route and routed experts in one ``moe`` op call. Shared experts stay with the
        model's modules (stacking them for the op would copy their weights)."""
        spec = self.spec
        top_k, budget, k_base = route_op_args(spec, self.policy)
        # The kept count is known from the arguments alone (docs/OPS.md): add it without a sync.
        self.kept_slots.add_(kept_slot_count(hidden.shape[0], top_k, budget, k_base))
        operands = self._expert_operands()
        return ops.moe(
            hidden, self._fusable_router_weight(), operands["gate_up"], operands["down"], top_k, budget,
            k_base=k_base, scoring=spec.scoring, correction_bias=self.correction_bias, n_group=spec.n_group,
            topk_group=spec.topk_group, norm_topk_prob=spec.norm_topk_prob,
            routed_scaling_factor=spec.routed_scaling_factor)

    def extra_repr(self) -> str:
        return f"layer_index={self.layer_index}, spec={self.spec}, policy={self.policy}"


class DeepseekAllocMoE(AllocMoE):
    """DeepSeek-V2 (greedy / group_limited_greedy) and DeepSeek-V3 (sigmoid + correction bias)."""

    block_class_names = ("DeepseekV2Moe", "DeepseekV3MoE")
    model_types = ("deepseek_v2", "deepseek_v3")

    @classmethod
    def routing_spec(cls, block):
        gate = block.gate
        if hasattr(gate, "e_score_correction_bias"):  # DeepSeek-V3: noaux_tc
            scoring, norm = "sigmoid_group", bool(gate.norm_topk_prob)
        elif gate.topk_method == "greedy":
            scoring, norm = "softmax", False
        elif gate.topk_method == "group_limited_greedy":
            scoring, norm = "softmax_group", False
        else:
            raise UnsupportedArchitectureError(f"DeepSeek-V2 topk_method={gate.topk_method!r} is not supported")
        grouped = scoring != "softmax"
        return RoutingSpec(
            num_experts=gate.num_experts, top_k=gate.top_k, scoring=scoring,
            n_group=int(gate.num_group) if grouped else 1, topk_group=int(gate.topk_group) if grouped else 1,
            norm_topk_prob=norm, routed_scaling_factor=float(gate.routed_scaling_factor))

    def router_logits(self, hidden):
        # As the model's router: logits in fp32 whatever the model dtype.
        return F.linear(hidden.float(), self.gate.weight.float())

    def _fusable_router_weight(self):
        return self.gate.weight  # the fused op computes fp32 logits, as this router does

    @property
    def correction_bias(self):
        bias = getattr(self.gate, "e_score_correction_bias", None)
        # The op takes it in fp32 (transformers keeps it fp32 at load; a later .to(dtype) may not).
        return None if bias is None else bias.float()

    def _shared_output(self, hidden):
        return self.shared_experts(hidden)


class SoftmaxTopkAllocMoE(AllocMoE):
    """Qwen2-MoE (gated shared expert), Qwen3-MoE, OLMoE and Mixtral: softmax top-k routers."""

    block_class_names = ("Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "OlmoeSparseMoeBlock",
                         "MixtralSparseMoeBlock")
    model_types = ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral")

    @classmethod
    def routing_spec(cls, block):
        gate = block.gate
        # Mixtral's router always renormalises over the kept experts; the others follow the config.
        norm = bool(getattr(gate, "norm_topk_prob", type(block).__name__ == "MixtralSparseMoeBlock"))
        return RoutingSpec(num_experts=gate.num_experts, top_k=gate.top_k, scoring="softmax", norm_topk_prob=norm)

    def router_logits(self, hidden):
        return F.linear(hidden, self.gate.weight)

    def _fusable_router_weight(self):
        # The fused op computes the logits in fp32; this router computes them in the model dtype,
        # so in bf16/fp16 the two paths may differ by the logits' rounding.
        return self.gate.weight

    def forward(self, hidden_states):
        # Mixtral's training-time router jitter, as the original block applies it.
        jitter = getattr(self._original_block, "jitter_noise", 0.0)
        if self.training and jitter > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(1.0 - jitter, 1.0 + jitter)
        return super().forward(hidden_states)

    def _shared_output(self, hidden):
        if not hasattr(self, "shared_expert"):
            return None
        # Qwen2-MoE: the shared expert scaled by its own sigmoid gate.
        return torch.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)


class GptOssAllocMoE(AllocMoE):
    """GPT-OSS: router with bias, top-k of logits then softmax, interleaved clamped-SwiGLU experts."""

    block_class_names = ("GptOssMLP",)
    model_types = ("gpt_oss",)

    @classmethod
    def routing_spec(cls, block):
        router = block.router
        return RoutingSpec(num_experts=router.num_experts, top_k=router.top_k, scoring="topk_softmax",
                           norm_topk_prob=True)

    @classmethod
    def check_block(cls, block, config):
        pass  # the experts' activation is the clamped SwiGLU, read from the experts module

    def router_logits(self, hidden):
        return F.linear(hidden, self.router.weight, self.router.bias)

    def _expert_operands(self):
        e = self.experts
        # GPT-OSS stores [E, H, 2I] / [E, I, H]; the op takes [E, 2I, H] / [E, H, I] views.
        return dict(gate_up=e.gate_up_proj.transpose(1, 2), down=e.down_proj.transpose(1, 2),
                    gate_up_bias=e.gate_up_proj_bias, down_bias=e.down_proj_bias, activation="swiglu_oai",
                    swiglu_alpha=float(e.alpha), swiglu_limit=float(e.limit))

    def _outputs(self, out, weights, logits):
        # The original block returns (hidden, router_scores [T, top_k] in the logits' dtype).
        return out, weights.to(logits.dtype)


_ADAPTERS: tuple[type[AllocMoE], ...] = (DeepseekAllocMoE, SoftmaxTopkAllocMoE, GptOssAllocMoE)


def block_adapter(block_class_name: str) -> type[AllocMoE] | None:
    for cls in _ADAPTERS:
        if block_class_name in cls.block_class_names:
            return cls
    return None


def adapter_for_model_type(model_type: str | None) -> type[AllocMoE] | None:
    for cls in _ADAPTERS:
        if model_type in cls.model_types:
            return cls
    return None


def supported_architectures() -> tuple[str, ...]:
    return tuple(t for cls in _ADAPTERS for t in cls.model_types)
