"""The fused ``moe`` op path of AllocMoE (router + route + routed experts in one call) selects
and computes what the unfused path does, for full, integer and fractional budgets."""
import pytest
import torch

from allocmoe_ext.integration import activation_stats, apply, moe_layers, reset_stats
from allocmoe_ext.integration.block import kept_slot_count
from allocmoe_ext.policies import RoutingSpec, TokenPolicy, route_op_args, route_tokens
from tiny_models import tiny_model

if not hasattr(torch.ops.allocmoe, "moe"):
    pytest.skip("the fused moe op is not built", allow_module_level=True)

POLICIES = [None, TokenPolicy("topk", budget=1), TokenPolicy("topk", budget=1.5),
            TokenPolicy("alloc_t", budget=1.5), TokenPolicy("alloc_t", budget=2.25, k_base=2)]


def _run(model, ids, mode):
    for layer in moe_layers(model):
        layer.fused = mode
    reset_stats(model)
    return model(ids).logits, activation_stats(model)


@pytest.mark.parametrize("arch", ["deepseek_v2_group", "deepseek_v3", "qwen2_moe", "mixtral", "gpt_oss"])
@torch.no_grad()
def test_fused_equals_unfused(arch):
    model = apply(tiny_model(arch))
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    for policy in POLICIES:
        if policy is not None and policy.budget > moe_layers(model)[0].spec.top_k:
            continue
        apply(model, policy)
        unfused, unfused_stats = _run(model, ids, "never")
        fused, fused_stats = _run(model, ids, "always")
        torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=0, msg=f"{policy}")
        assert fused_stats == unfused_stats, policy


def test_route_op_args_match_route_tokens():
    """The fused op gets no ids back, so its arguments must select what route_tokens selects."""
    spec = RoutingSpec(num_experts=8, top_k=4, norm_topk_prob=True)
    logits = torch.randn(13, 8, generator=torch.Generator().manual_seed(0))
    for policy in [TokenPolicy("topk", b) for b in (0.5, 1, 1.25, 2.5, 3.999999999999, 4)] + \
                  [TokenPolicy("alloc_t", b, k_base=k) for b, k in ((1.5, 1), (2.0, 0), (3.5, 2), (4, 1))]:
        top_k, budget, k_base = route_op_args(spec, policy)
        w, ids = torch.ops.allocmoe.route(logits, top_k, budget, k_base, "softmax", None, 1, 1, True, 1.0)
        w_ref, ids_ref = route_tokens(logits, spec, policy)
        torch.testing.assert_close(w, w_ref[:, :top_k], atol=0, rtol=0)
        assert torch.equal(ids, ids_ref[:, :top_k]) and (ids_ref[:, top_k:] == -1).all(), policy
        assert kept_slot_count(13, top_k, budget, k_base) == int((ids_ref >= 0).sum()), policy


def test_auto_mode_does_not_fuse_on_cpu_and_bad_mode_is_an_error():
    model = apply(tiny_model("olmoe"))
    layer = moe_layers(model)[0]
    hidden = torch.randn(3, model.config.hidden_size)
    assert layer.fused == "auto" and not layer._use_fused(hidden)
    layer.fused = "sometimes"
    with pytest.raises(ValueError, match="fused must be one of"):
        layer(hidden)
