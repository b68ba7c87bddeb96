"""Policies on the patched model: budgets change the output and the realised activations are
reported per layer; bad input is a clear error; unsupported architectures are named."""
import math

import pytest
import torch

from allocmoe_ext.integration import (
    UnsupportedArchitectureError,
    AllocMoE,
    activation_stats,
    apply,
    model_info,
    moe_layers,
    reset_stats,
    restore,
    set_policies,
)
from allocmoe_ext.policies import TokenPolicy
from tiny_models import TINY_ARCHITECTURES, tiny_model

# 2 sequences x 9 tokens: T = 18 per forward, so every budget used below times T is an integer
# (or a half, rounded up) and the realised average is known exactly.
BATCH, SEQ = 2, 9
T = BATCH * SEQ


def _input_ids(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 96, (BATCH, SEQ), generator=g)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
@torch.no_grad()
def test_half_budget_changes_output_and_reports_half(arch):
    model = tiny_model(arch)
    ids = _input_ids()
    full = model(ids).logits
    apply(model)
    info = model_info(model)
    half = info["top_k"] / 2
    for kind in ("alloc_t", "topk"):
        apply(model, TokenPolicy(kind, budget=half))
        reset_stats(model)
        out = model(ids).logits
        assert (out - full).abs().max() > 1e-3, kind
        # round(half * T) slots per layer and forward (docs/OPS.md: round half up).
        expected = math.floor(half * T + 0.5) / T
        stats = activation_stats(model)
        assert len(stats) == info["num_moe_layers"]
        assert stats == pytest.approx([expected] * len(stats), abs=1e-12), kind


@torch.no_grad()
def test_full_budget_reports_top_k_and_stats_accumulate_until_reset():
    model = apply(tiny_model("deepseek_v3"))
    ids = _input_ids()
    assert all(math.isnan(s) for s in activation_stats(model))  # nothing seen yet
    model(ids)
    assert activation_stats(model) == [3.0, 3.0]
    set_policies(model, [TokenPolicy("topk", budget=1), TokenPolicy("topk", budget=2)])
    model(ids)  # now averaged over both forwards: (3 + 1) / 2 and (3 + 2) / 2
    assert activation_stats(model) == [2.0, 2.5]
    reset_stats(model)
    model(ids)
    assert activation_stats(model) == [1.0, 2.0]


@torch.no_grad()
def test_per_layer_policies_and_decode_stats():
    model = apply(tiny_model("olmoe"), [TokenPolicy("alloc_t", budget=1.5), TokenPolicy("topk", budget=1)])
    assert [b.policy.budget for b in moe_layers(model)] == [1.5, 1]
    ids = _input_ids()[:1, :4]
    model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    # prefill T=4 -> round(1.5*4)=6 slots, then 2 decode steps of T=1 -> round(1.5)=2 each
    # (the last generated token is not fed back): (6 + 2 + 2) / 6 tokens in layer 0.
    assert activation_stats(model) == pytest.approx([10 / 6, 1.0])


@torch.no_grad()
def test_apply_accepts_a_plan_and_checks_it_fits():
    model = tiny_model("mixtral")
    seen = {}

    class FakePlan:
        policies = [TokenPolicy("topk", budget=1), TokenPolicy("alloc_t", budget=1.5)]

        def check_fits(self, info):
            seen.update(info)

    apply(model, FakePlan())
    assert seen["architecture"] == "mixtral" and seen["num_moe_layers"] == 2 and seen["top_k"] == 2
    assert [b.policy for b in moe_layers(model)] == FakePlan.policies

    class WrongPlan(FakePlan):
        def check_fits(self, info):
            raise ValueError("plan is for another model")

    with pytest.raises(ValueError, match="another model"):
        apply(model, WrongPlan())
    assert [b.policy for b in moe_layers(model)] == FakePlan.policies  # untouched


def test_model_info_on_unpatched_and_patched_models():
    model = tiny_model("qwen2_moe")
    info = model_info(model)
    assert info == dict(
        architecture="qwen2_moe", model_class="Qwen2MoeForCausalLM", num_hidden_layers=3, num_moe_layers=2,
        moe_layer_indices=[0, 2], num_experts=60, top_k=4, hidden_size=32, scoring="softmax", full_budget=8)
    assert model_info(apply(model)) == info


def test_routing_specs_follow_the_configs():
    specs = {arch: moe_layers(apply(tiny_model(arch)))[0].spec for arch in
             ("deepseek_v2", "deepseek_v2_group", "deepseek_v3", "mixtral", "gpt_oss")}
    assert specs["deepseek_v2"].scoring == "softmax" and specs["deepseek_v2"].routed_scaling_factor == 1.5
    g = specs["deepseek_v2_group"]
    assert (g.scoring, g.n_group, g.topk_group, g.norm_topk_prob) == ("softmax_group", 4, 2, False)
    v3 = specs["deepseek_v3"]
    assert (v3.scoring, v3.n_group, v3.topk_group, v3.norm_topk_prob, v3.routed_scaling_factor) == (
        "sigmoid_group", 4, 2, True, 2.5)
    assert specs["mixtral"].norm_topk_prob
    assert specs["gpt_oss"].scoring == "topk_softmax"


def test_bad_policies_are_clear_errors():
    model = apply(tiny_model("qwen3_moe"))
    with pytest.raises(ValueError, match=r"policy\.budget for layer 1 \(top_k=2\)"):
        set_policies(model, TokenPolicy("topk", budget=3))
    with pytest.raises(ValueError, match="k_base"):
        set_policies(model, TokenPolicy("alloc_t", budget=1.5, k_base=2))
    with pytest.raises(ValueError, match="threshold"):
        set_policies(model, TokenPolicy("top_p", budget=1.5))
    with pytest.raises(ValueError, match=r"one TokenPolicy per MoE layer \(2\), got 3"):
        set_policies(model, [TokenPolicy()] * 3)
    with pytest.raises(TypeError, match="plan_or_policies"):
        apply(model, 1.5)
    # A failed apply leaves the previous policies in place.
    assert all(b.policy == TokenPolicy() for b in moe_layers(model))


def test_unpatched_model_has_no_moe_layers_to_report():
    model = tiny_model("olmoe")
    with pytest.raises(ValueError, match="not patched"):
        activation_stats(model)
    restore(model)  # restoring an unpatched model is a no-op
    assert not any(isinstance(m, AllocMoE) for m in model.modules())


def test_unsupported_architecture_is_named():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    llama = LlamaForCausalLM(config)
    for fn in (apply, model_info):
        with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'llama'.*LlamaForCausalLM"):
            fn(llama)
    # A block of another architecture handed to from_block is named too.
    mixtral = tiny_model("mixtral")
    with pytest.raises(UnsupportedArchitectureError, match="MixtralSparseMoeBlock.*'llama'"):
        AllocMoE.from_block(mixtral.model.layers[0].mlp, config, 0)


def test_non_silu_experts_are_rejected():
    model = tiny_model("olmoe", hidden_act="gelu")
    with pytest.raises(UnsupportedArchitectureError, match="hidden_act='gelu'"):
        apply(model)


@pytest.mark.parametrize("arch", ["deepseek_v3", "gpt_oss"])
@torch.no_grad()
def test_bf16_model_runs_and_follows_fp32_closely(arch):
    model = tiny_model(arch)
    ids = _input_ids()
    expected = model(ids).logits
    apply(model.to(torch.bfloat16))
    got = model(ids).logits
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() < 0.1
    assert activation_stats(model) == [2.0 if arch == "gpt_oss" else 3.0] * 2


def test_forward_under_grad_mode_runs():
    """Evaluation code often forgets no_grad: the patched model must still run (inference only)."""
    model = tiny_model("olmoe")
    ids = _input_ids()
    with torch.no_grad():
        expected = model(ids).logits
    apply(model)
    torch.testing.assert_close(model(ids).logits.detach(), expected, atol=1e-5, rtol=0)
