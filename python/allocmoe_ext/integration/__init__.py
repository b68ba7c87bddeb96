"""Drop-in Alloc-MoE routing for transformers 5.x MoE models.

    from allocmoe_ext.integration import apply, restore, activation_stats
    apply(model, plan)              # or a TokenPolicy, a list of them, or None (full top-k)
    model.generate(...)             # every MoE block routes through torch.ops.allocmoe
    activation_stats(model)         # realised experts per token, per MoE layer
    restore(model)                  # the original transformers blocks again

Supported: DeepSeek-V2 (greedy, group_limited_greedy), DeepSeek-V3, Qwen2-MoE, Qwen3-MoE,
OLMoE, Mixtral, GPT-OSS. Anything else is an ``UnsupportedArchitectureError`` naming it.

Design: a drop-in block class, not a registered experts backend.
transformers 5.x lets one register an "experts implementation" (``ExpertsInterface``) that
replaces only the experts' forward; it receives the router's top-k ids and weights. Alloc-MoE
changes the routing itself: the number of experts per token varies, the budget is spread across
all tokens of the call, dropped slots are id -1, and the gate weights of the kept experts must
be renormalised exactly where the model renormalises. That lives in each model's router, whose
code differs per architecture, so a backend alone cannot do it. ``AllocMoE`` therefore replaces
the whole MoE block (router + experts + shared experts):
- it adopts the block's own submodules (``gate``/``router``, ``experts``, ``shared_experts`` or
  ``shared_expert`` + ``shared_expert_gate``) under the same names, so ``state_dict`` keys,
  shapes and parameter objects are transformers' own and checkpoints load unchanged, before or
  after ``apply``; ``restore`` puts the original block (sharing those parameters) back;
- the router logits are computed from the router's own weights exactly as the model does; the
  policy turns them into kept slots (``policies.route_tokens`` -> ``ops.route``), the routed
  experts run in ``ops.experts`` (fp32 gate weights), shared experts through the model's modules;
- forward has the replaced block's signature and returns (GPT-OSS: ``(hidden, router_scores)``).
- realised activations are counted on device into two buffers per block (no host sync).
- for topk/alloc_t policies and SiLU experts, router + route + routed experts can run as the one
  fused ``ops.moe`` call (``block.fused``: "auto" = on CUDA GPUs before sm_90 for decode-sized
  calls of <= 16 tokens, where the op is one launch; "always", "never"); it selects exactly what
  the unfused path selects.
The decoder layers, attention and caches are untouched, so ``generate`` works as before.
Limitation: the model's router modules are no longer called, so ``output_router_logits``
(the training-time load-balancing loss) records nothing for patched blocks.
"""
from .block import AllocMoE, UnsupportedArchitectureError, supported_architectures
from .patch import (
    activation_stats,
    apply,
    model_info,
    moe_layers,
    reset_stats,
    restore,
    set_policies,
)

__all__ = [
    "AllocMoE",
    "UnsupportedArchitectureError",
    "activation_stats",
    "apply",
    "model_info",
    "moe_layers",
    "reset_stats",
    "restore",
    "set_policies",
    "supported_architectures",
]
