"""Model-level functions: find the MoE blocks of a transformers model, swap them, set policies, read stats."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..policies import TokenPolicy
from .block import AllocMoE, UnsupportedArchitectureError, adapter_for_model_type, supported_architectures


def _architecture(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if adapter_for_model_type(model_type) is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r} ({type(model).__name__}); "
            f"supported architectures: {supported_architectures()}")
    return model_type


def _layer_index(name: str) -> int:
    """The decoder layer index in a module path such as 'model.layers.3.mlp'."""
    numbers = [int(part) for part in name.split(".") if part.isdigit()]
    if not numbers:
        raise ValueError(f"cannot tell the layer index of MoE block {name!r}")
    return numbers[-1]


def _moe_sites(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, int]]:
    """(parent, attribute, block, layer_index) of every MoE block, patched or not, in depth order."""
    adapter = adapter_for_model_type(_architecture(model))
    sites = []
    for name, module in model.named_modules():
        if isinstance(module, AllocMoE) or type(module).__name__ in adapter.block_class_names:
            parent_name, _, attr = name.rpartition(".")
            sites.append((model.get_submodule(parent_name), attr, module, _layer_index(name)))
    if not sites:
        raise UnsupportedArchitectureError(
            f"no MoE block of a known class ({adapter.block_class_names}) found in {type(model).__name__}")
    # named_modules() visits an AllocMoE's adopted children but never a block inside one, so a
    # site is never listed twice; sort by layer in case a model registers layers out of order.
    return sorted(sites, key=lambda s: s[3])


def moe_layers(model: nn.Module) -> list[AllocMoE]:
    """The model's AllocMoE blocks in depth order (the model must have been ``apply``-ed)."""
    blocks = [s[2] for s in _moe_sites(model)]
    if not all(isinstance(b, AllocMoE) for b in blocks):
        raise ValueError("model is not patched: call allocmoe_ext.integration.apply(model, ...) first")
    return blocks


def _policies_for(model: nn.Module, n_layers: int, plan_or_policies) -> list[TokenPolicy]:
    """Normalise None / one TokenPolicy / a list of them / a Plan into one policy per MoE layer."""
    if plan_or_policies is None:
        return [TokenPolicy() for _ in range(n_layers)]
    if isinstance(plan_or_policies, TokenPolicy):
        return [plan_or_policies] * n_layers
    if hasattr(plan_or_policies, "policies"):  # a Plan: check it belongs to this model first
        if hasattr(plan_or_policies, "check_fits"):
            plan_or_policies.check_fits(model_info(model))
        plan_or_policies = plan_or_policies.policies
    if isinstance(plan_or_policies, Sequence) and not isinstance(plan_or_policies, (str, bytes)):
        policies = list(plan_or_policies)
        if len(policies) != n_layers:
            raise ValueError(f"policies must have one TokenPolicy per MoE layer ({n_layers}), got {len(policies)}")
        return policies
    raise TypeError(
        "plan_or_policies must be None, a TokenPolicy, a list of TokenPolicy (one per MoE layer) or a Plan, "
        f"got {type(plan_or_policies).__name__}")


def apply(model: nn.Module, plan_or_policies=None) -> nn.Module:
    """Swap every MoE block of ``model`` for an ``AllocMoE`` in place and set its policy.

    ``plan_or_policies``: None (the model's own top-k, full budget), one ``TokenPolicy`` for every
    layer, a list with one per MoE layer (depth order), or a Plan (anything with ``.policies``;
    its ``check_fits(model_info)`` runs first). Applying to a patched model only sets policies.
    Returns ``model``.
    """
    sites = _moe_sites(model)
    policies = _policies_for(model, len(sites), plan_or_policies)
    # Build every block first, so that a bad policy leaves the model untouched.
    new_blocks = [
        block if isinstance(block, AllocMoE) else AllocMoE.from_block(block, model.config, layer_index)
        for _, _, block, layer_index in sites
    ]
    for block, policy in zip(new_blocks, policies):
        block.policy = policy  # validates against the layer's top_k
    for (parent, attr, _, _), block in zip(sites, new_blocks):
        setattr(parent, attr, block)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Put the original transformers blocks back (they share every parameter with the AllocMoE)."""
    for parent, attr, block, _ in _moe_sites(model):
        if isinstance(block, AllocMoE):
            original = block.original_block
            original.training = block.training  # its children already follow train()/eval()
            setattr(parent, attr, original)
    return model


def set_policies(model: nn.Module, policies) -> None:
    """Set the per-layer policies of a patched model (same forms as ``apply``)."""
    layers = moe_layers(model)
    checked = _policies_for(model, len(layers), policies)
    for layer, policy in zip(layers, checked):
        layer.policy = policy


def reset_stats(model: nn.Module) -> None:
    """Zero the realised-activation counters of every MoE layer."""
    for layer in moe_layers(model):
        layer.kept_slots.zero_()
        layer.routed_tokens.zero_()


def activation_stats(model: nn.Module) -> list[float]:
    """Realised average routed experts per token of each MoE layer since the last reset.

    One host sync for the whole model (NaN for a layer that has seen no token).
    """
    layers = moe_layers(model)
    counts = torch.stack([torch.stack([l.kept_slots, l.routed_tokens]).cpu() for l in layers]).tolist()
    return [kept / tokens if tokens else float("nan") for kept, tokens in counts]


def model_info(model: nn.Module) -> dict:
    """What a plan needs to know about the model (patched or not)."""
    architecture = _architecture(model)
    sites = _moe_sites(model)
    adapter = adapter_for_model_type(architecture)
    specs = [b.spec if isinstance(b, AllocMoE) else adapter.routing_spec(b) for _, _, b, _ in sites]
    spec = specs[0]
    if any(s != spec for s in specs):
        raise ValueError(f"MoE layers of {type(model).__name__} route differently: {sorted(set(map(str, specs)))}")
    config = model.config
    return dict(
        architecture=architecture,
        model_class=type(model).__name__,
        num_hidden_layers=int(config.num_hidden_layers),
        num_moe_layers=len(sites),
        moe_layer_indices=[s[3] for s in sites],
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        hidden_size=int(config.hidden_size),
        scoring=spec.scoring,
        full_budget=len(sites) * spec.top_k,
    )
