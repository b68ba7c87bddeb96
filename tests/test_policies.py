"""Token policies (topk, alloc_t, top_p, naee_skip) and threshold calibration."""
import math

import pytest
import torch

import allocmoe_ext  # noqa: F401  registers torch.ops.allocmoe
from allocmoe_ext.policies import (RoutingSpec, TokenPolicy, calibrate_threshold, kept_per_token,
                                   realised_average, route_tokens)

SOFTMAX = RoutingSpec(num_experts=16, top_k=6)
RENORM = RoutingSpec(num_experts=16, top_k=6, norm_topk_prob=True, routed_scaling_factor=2.5)


def logits(T=64, E=16, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, E, generator=g) * scale


def check_prefix(ids, weights):
    kept = ids >= 0
    n = kept.sum(1)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    assert torch.equal(kept, positions < n[:, None]), "kept slots must be a prefix of each row"
    assert torch.all(weights[~kept] == 0)


def reference_candidates(x, k):
    p = torch.softmax(x.float(), dim=1)
    vals, idx = torch.sort(p, dim=1, descending=True, stable=True)
    return p, vals[:, :k], idx[:, :k]


def test_topk_integer_budget_is_plain_topk():
    x = logits()
    w, ids = route_tokens(x, SOFTMAX, TokenPolicy("topk", 3))
    _, vals, idx = reference_candidates(x, 6)
    assert torch.equal(ids[:, :3].long(), idx[:, :3]) and torch.all(ids[:, 3:] == -1)
    torch.testing.assert_close(w[:, :3], vals[:, :3])


def test_full_budget_is_the_models_own_routing_with_renormalisation_and_scaling():
    x = logits()
    w, ids = route_tokens(x, RENORM, TokenPolicy("topk", None))
    _, vals, idx = reference_candidates(x, 6)
    assert torch.equal(ids.long(), idx)
    torch.testing.assert_close(w, 2.5 * vals / vals.sum(1, keepdim=True))


@pytest.mark.parametrize("kind,budget,k_base", [("topk", 2.5, None), ("topk", 3.3, None),
                                                ("alloc_t", 2.5, 1), ("alloc_t", 3.0, 2)])
def test_budgeted_selection_spends_round_budget_times_T_on_the_best_scores(kind, budget, k_base):
    T = 50
    x = logits(T)
    policy = TokenPolicy(kind, budget, k_base=k_base or 1)
    w, ids = route_tokens(x, SOFTMAX, policy)
    check_prefix(ids, w)
    n = kept_per_token(ids)
    base = math.floor(budget) if kind == "topk" else k_base
    assert int(n.sum()) == math.floor(budget * T + 0.5)
    assert n.min() >= base and n.max() <= 6
    if kind == "topk":
        assert n.max() <= math.ceil(budget)
    # The extra slots are the globally best of all tokens' remaining candidates: ranks >= k_base
    # for alloc_t, only the next rank (floor(K_l)) for fractional topk.
    _, vals, _ = reference_candidates(x, 6)
    stop = base + 1 if kind == "topk" else 6
    extra = vals[:, base:stop]
    kept_extra = (ids[:, base:stop] >= 0)
    assert extra[kept_extra].min() >= extra[~kept_extra].max()
    torch.testing.assert_close(w[ids >= 0], vals[ids >= 0])


def reference_top_p(x, spec, p):
    """Per-token loop: smallest prefix of the sorted candidates with mass >= p."""
    full, vals, idx = reference_candidates(x, spec.top_k)
    counts = []
    for t in range(x.shape[0]):
        mass, n = 0.0, 0
        while n < spec.top_k:
            mass += float(vals[t, n])
            n += 1
            if mass >= p:
                break
        counts.append(n)
    return torch.tensor(counts), vals, idx


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("spec", [SOFTMAX, RENORM])
def test_top_p_matches_a_per_token_reference(p, spec):
    x = logits(40, seed=3, scale=1.5)
    w, ids = route_tokens(x, spec, TokenPolicy("top_p", 3.0, threshold=p))
    check_prefix(ids, w)
    counts, vals, idx = reference_top_p(x, spec, p)
    # Float cumsum vs Python sum can differ only for a mass within rounding of p.
    assert torch.equal(kept_per_token(ids), counts)
    kept = ids >= 0
    assert torch.equal(ids.long()[kept], idx[kept])
    expect = torch.where(kept, vals, torch.zeros_like(vals))
    if spec.norm_topk_prob:
        expect = expect / expect.sum(1, keepdim=True)
    torch.testing.assert_close(w, expect * spec.routed_scaling_factor)


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.5, 0.9, 1.5])
@pytest.mark.parametrize("spec", [SOFTMAX, RENORM])
def test_naee_skip_matches_a_per_token_reference(beta, spec):
    x = logits(40, seed=4, scale=1.5)
    w, ids = route_tokens(x, spec, TokenPolicy("naee_skip", 3.0, threshold=beta))
    check_prefix(ids, w)
    _, vals, idx = reference_candidates(x, spec.top_k)
    expect_counts = torch.tensor([1 + sum(1 for j in range(1, spec.top_k) if vals[t, j] >= beta * vals[t, 0])
                                  for t in range(x.shape[0])])
    assert torch.equal(kept_per_token(ids), expect_counts)
    kept = ids >= 0
    expect = torch.where(kept, vals, torch.zeros_like(vals))
    if spec.norm_topk_prob:
        expect = expect / expect.sum(1, keepdim=True)
    torch.testing.assert_close(w, expect * spec.routed_scaling_factor)


def test_threshold_policies_on_grouped_sigmoid_routing_keep_a_prefix():
    spec = RoutingSpec(num_experts=16, top_k=4, scoring="sigmoid_group", n_group=4, topk_group=2,
                       norm_topk_prob=True, routed_scaling_factor=2.5)
    bias = torch.randn(16, generator=torch.Generator().manual_seed(1)) * 0.5
    x = logits(60, seed=5)
    full_w, full_ids = route_tokens(x, spec, TokenPolicy("topk", None), correction_bias=bias)
    for policy in (TokenPolicy("top_p", 2.0, threshold=0.5), TokenPolicy("naee_skip", 2.0, threshold=0.7),
                   TokenPolicy("topk", 2.5), TokenPolicy("alloc_t", 2.5)):
        w, ids = route_tokens(x, spec, policy, correction_bias=bias)
        check_prefix(ids, w)
        kept = ids >= 0
        assert torch.equal(ids[kept], full_ids[kept])
        assert 1 <= kept_per_token(ids).min() and kept_per_token(ids).max() <= 4
        torch.testing.assert_close(w.sum(1), torch.full((60,), 2.5))


@pytest.mark.parametrize("kind", ["top_p", "naee_skip"])
@pytest.mark.parametrize("target", [1.5, 2.0, 3.7, 5.0])
def test_calibration_hits_the_target_within_one_percent(kind, target):
    calib = [logits(500, seed=10), logits(700, seed=11)]
    threshold = calibrate_threshold(kind, calib, SOFTMAX, target)
    realised = realised_average(kind, threshold, calib, SOFTMAX)
    assert abs(realised - target) <= 0.01 * target
    # route_tokens counts exactly as the calibration does.
    _, ids = route_tokens(torch.cat(calib), SOFTMAX, TokenPolicy(kind, target, threshold=threshold))
    assert kept_per_token(ids).float().mean().item() == pytest.approx(realised)
    # And it generalises to fresh tokens from the same distribution (loosely).
    _, ids = route_tokens(logits(2000, seed=12), SOFTMAX, TokenPolicy(kind, target, threshold=threshold))
    assert abs(kept_per_token(ids).float().mean().item() - target) < 0.1 * target


def test_calibration_extremes():
    calib = logits(400, seed=13)
    assert realised_average("top_p", calibrate_threshold("top_p", calib, SOFTMAX, 1.0), calib, SOFTMAX) == 1.0
    assert realised_average("naee_skip", calibrate_threshold("naee_skip", calib, SOFTMAX, 6.0), calib, SOFTMAX) == 6.0


def test_calibration_bad_input():
    calib = logits(100)
    with pytest.raises(ValueError, match="target_budget"):
        calibrate_threshold("top_p", calib, SOFTMAX, 7.0)
    with pytest.raises(ValueError, match="target_budget"):
        calibrate_threshold("top_p", calib, SOFTMAX, 0.5)
    with pytest.raises(ValueError, match="kind"):
        calibrate_threshold("topk", calib, SOFTMAX, 2.0)
    with pytest.raises(ValueError, match="empty"):
        calibrate_threshold("top_p", [], SOFTMAX, 2.0)
    with pytest.raises(ValueError, match="more calibration tokens"):
        calibrate_threshold("top_p", logits(3), SOFTMAX, 2.5)  # 3 tokens cannot average 2.5 within 1%


def test_route_tokens_bad_input():
    x = logits()
    with pytest.raises(ValueError, match="calibrate"):
        route_tokens(x, SOFTMAX, TokenPolicy("top_p", 2.0))
    with pytest.raises(ValueError, match="threshold"):
        route_tokens(x, SOFTMAX, TokenPolicy("top_p", 2.0, threshold=1.5))
    with pytest.raises(ValueError, match="budget"):
        route_tokens(x, SOFTMAX, TokenPolicy("topk", 7.0))
    with pytest.raises(ValueError, match="budget"):
        route_tokens(x, SOFTMAX, TokenPolicy("alloc_t", 1.5, k_base=2))
    with pytest.raises(ValueError, match="experts"):
        route_tokens(x[:, :8], SOFTMAX, TokenPolicy("topk", 2.0))
    with pytest.raises(ValueError, match="2-D"):
        route_tokens(x[0], SOFTMAX, TokenPolicy("topk", 2.0))
    with pytest.raises(ValueError, match="policy kind"):
        TokenPolicy("random")
    with pytest.raises(ValueError, match="budget"):
        TokenPolicy("topk", float("nan"))
    with pytest.raises(ValueError, match="top_k"):
        RoutingSpec(num_experts=4, top_k=5)


def test_policy_dict_round_trip():
    p = TokenPolicy("naee_skip", 2.5, k_base=1, threshold=0.25)
    assert TokenPolicy.from_dict(p.to_dict()) == p


@pytest.mark.parametrize("arch,kind", [("deepseek_v2", "top_p"), ("deepseek_v2_group", "naee_skip"),
                                       ("deepseek_v3", "naee_skip"), ("deepseek_v3", "top_p"),
                                       ("qwen2_moe", "top_p"), ("qwen3_moe", "naee_skip"),
                                       ("olmoe", "top_p"), ("mixtral", "naee_skip"), ("gpt_oss", "top_p")])
def test_calibrate_model_hits_each_layers_budget_on_the_calibration_tokens(arch, kind):
    from allocmoe_ext import integration
    from allocmoe_ext.integration.tiny import tiny_model
    from allocmoe_ext.policies import calibrate_model

    model = integration.apply(tiny_model(arch, num_hidden_layers=2 if arch == "gpt_oss" else 4))
    info = integration.model_info(model)
    L, K = info["num_moe_layers"], info["top_k"]
    budgets = [1 + (K - 1) * (i + 1) / (L + 1) for i in range(L)]  # a different target per layer
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 96, (4, 32), generator=g) for _ in range(2)]
    policies = calibrate_model(model, batches, kind, budgets)
    assert [p.kind for p in policies] == [kind] * L
    integration.reset_stats(model)
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    realised = integration.activation_stats(model)
    for r, b in zip(realised, budgets):
        assert abs(r - b) <= 0.01 * b
