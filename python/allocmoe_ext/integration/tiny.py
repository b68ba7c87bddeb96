"""Tiny random-weight transformers MoE models of every supported architecture.

For tests and for the CLI's named random-weight configs: a few layers, hidden size 32, a small
vocabulary, fp32, seeded, eval mode. Each config keeps what makes its architecture distinct
(DeepSeek's dense first layer, groups, scaling factor and correction bias; Qwen2-MoE's 60 experts
and gated shared expert; Qwen layers made dense through ``mlp_only_layers``; GPT-OSS's router
bias and clamped SwiGLU), so a drop-in that gets one of them wrong shows it.

    from allocmoe_ext.integration.tiny import tiny_model, TINY_ARCHITECTURES
    model = tiny_model("deepseek_v3", num_hidden_layers=4)
"""
from __future__ import annotations

import torch

# Variant name -> (transformers model_type, config fields). Values chosen so that every MoE
# feature of the architecture is exercised; the DeepSeek-V2 variants differ in topk_method.
_COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.1,  # larger than the default 0.02 so that routing and experts matter
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

_DEEPSEEK_ATTENTION = dict(
    num_key_value_heads=4,  # MLA expands keys to every head: no grouped-query sharing
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
)

_VARIANTS: dict[str, tuple[str, dict]] = {
    "deepseek_v2": ("deepseek_v2", dict(
        _DEEPSEEK_ATTENTION, num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=16,
        first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.5,
    )),
    "deepseek_v2_group": ("deepseek_v2", dict(
        _DEEPSEEK_ATTENTION, num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=16,
        first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.0,
    )),
    "deepseek_v3": ("deepseek_v3", dict(
        _DEEPSEEK_ATTENTION, num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=16,
        first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
    )),
    "qwen2_moe": ("qwen2_moe", dict(
        num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_experts=60, num_experts_per_tok=4,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1],
    )),
    "qwen3_moe": ("qwen3_moe", dict(
        num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=16, head_dim=8,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[0],
    )),
    "olmoe": ("olmoe", dict(
        num_hidden_layers=2, intermediate_size=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False,
    )),
    "mixtral": ("mixtral", dict(
        num_hidden_layers=2, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
    )),
    "gpt_oss": ("gpt_oss", dict(
        num_hidden_layers=2, intermediate_size=16, head_dim=8, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},  # not YaRN: no 4096-context warning
    )),
}

TINY_ARCHITECTURES: tuple[str, ...] = tuple(_VARIANTS)


def tiny_config(arch: str, **overrides):
    """The transformers config of the tiny ``arch`` variant, with ``overrides`` applied."""
    from transformers import AutoConfig

    if arch not in _VARIANTS:
        raise ValueError(f"arch must be one of {TINY_ARCHITECTURES}, got {arch!r}")
    model_type, fields = _VARIANTS[arch]
    kwargs = dict(_COMMON, **fields)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A seeded fp32 causal LM of the tiny ``arch`` variant, in eval mode.

    Weights are the model's own random init under ``seed``; DeepSeek-V3's e_score_correction_bias
    (zero at init) is filled with random values so that the biased selection is exercised.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.1)
    return model.eval()
