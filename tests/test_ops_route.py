"""torch.ops.allocmoe.route (CPU kernel) against tests/reference.py, the Alloc-T contract, and
transformers-style routing code of the target models at full budget."""

from __future__ import annotations

import math
import random

import pytest
import torch

import allocmoe_ext.ops as ops
import reference as ref

TS = (0, 1, 2, 3, 7, 33)
ES = (8, 60, 64, 128)
GROUPS_FOR_E = {8: (2, 4), 60: (4, 6), 64: (4, 8), 128: (8, 16)}


def make_logits(T: int, E: int, kind: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Router logits: 'normal'; 'skewed' (a few experts dominate, per-token temperature varies);
    'ties' (values from a small set, so equal scores within a row, and repeated rows, so equal
    scores across tokens)."""
    if kind == "normal":
        x = torch.randn(T, E, generator=gen)
    elif kind == "skewed":
        popularity = torch.randn(E, generator=gen) * 3
        temperature = torch.rand(T, 1, generator=gen) * 4 + 0.2
        x = (torch.randn(T, E, generator=gen) + popularity) * temperature
    else:
        x = torch.randint(-2, 3, (T, E), generator=gen).float()
        if T > 1:
            half = T // 2
            x[T - half :] = x[:half].clone()  # the last rows repeat the first ones
    return x.to(dtype)


def random_config(rng: random.Random, E: int, top_k: int, scoring: str) -> dict:
    """Random k_base, fractional budget and group arguments valid for (E, top_k, scoring)."""
    k_base = rng.randint(0, top_k)
    budget = rng.choice([k_base, top_k, rng.uniform(k_base, top_k), k_base + 0.5 if k_base < top_k else top_k])
    cfg = dict(top_k=top_k, budget=budget, k_base=k_base, scoring=scoring,
               norm_topk_prob=rng.random() < 0.5, routed_scaling_factor=rng.choice([1.0, 2.5]))
    if scoring in ("softmax_group", "sigmoid_group"):
        n_group = rng.choice(GROUPS_FOR_E[E])
        size = E // n_group
        cfg["n_group"] = n_group
        cfg["topk_group"] = rng.randint(math.ceil(top_k / size), n_group)
    return cfg


def run_both(logits: torch.Tensor, cfg: dict, bias: torch.Tensor | None):
    got = ops.route(logits, correction_bias=bias, **cfg)
    want = ref.route(logits, correction_bias=bias, **cfg)
    return got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scoring", ref.SCORINGS)
def test_route_matches_reference(scoring: str, dtype: torch.dtype):
    rng = random.Random(f"{scoring}-{dtype}")
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    cases = 0
    for T in TS:
        for E in ES:
            for top_k in range(1, 9):
                kind = ("normal", "skewed", "ties")[(T + E + top_k) % 3]
                logits = make_logits(T, E, kind, dtype, gen)
                cfg = random_config(rng, E, top_k, scoring)
                bias = torch.randn(E, generator=gen) * 0.1 if scoring == "sigmoid_group" and top_k % 2 else None
                (w, ids), (rw, rids) = run_both(logits, cfg, bias)
                msg = f"T={T} E={E} kind={kind} cfg={cfg}"
                assert ids.dtype == torch.int32 and w.dtype == torch.float32, msg
                assert ids.shape == (T, top_k) and w.shape == (T, top_k), msg
                assert torch.equal(ids, rids), msg
                torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6, msg=msg)
                cases += 1
    assert cases == len(TS) * len(ES) * 8


def _selection_scores(logits, ids, scoring, bias):
    """c of each slot of a full-budget ids tensor, computed here from the definition in OPS.md."""
    x = logits.float()
    if scoring == "sigmoid_group":
        c = torch.sigmoid(x) + (bias if bias is not None else 0)
    else:
        c = torch.softmax(x, dim=-1)
    return c.gather(1, ids.long())


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid_group"])
@pytest.mark.parametrize("kind", ["normal", "skewed", "ties"])
def test_alloc_t_contract(scoring: str, kind: str):
    """Counts in [k_base, top_k], exact total, prefix layout, candidates independent of the budget,
    and the kept set is the best feasible one."""
    gen = torch.Generator().manual_seed(7)
    rng = random.Random(kind)
    for T in (1, 3, 7, 33):
        for E, top_k in ((8, 4), (60, 4), (64, 6), (128, 8)):
            logits = make_logits(T, E, kind, torch.float32, gen)
            group = dict(n_group=4, topk_group=2) if scoring == "sigmoid_group" else {}
            bias = torch.randn(E, generator=gen) * 0.05 if scoring == "sigmoid_group" else None
            _, full_ids = ops.route(logits, top_k, top_k, k_base=top_k, scoring=scoring, correction_bias=bias, **group)
            c_full = _selection_scores(logits, full_ids, scoring, bias)
            for _ in range(6):
                k_base = rng.randint(0, top_k)
                budget = rng.uniform(k_base, top_k)
                w, ids = ops.route(logits, top_k, budget, k_base=k_base, scoring=scoring, correction_bias=bias, **group)
                kept = ids >= 0
                n = kept.sum(dim=1)
                assert (n >= k_base).all() and (n <= top_k).all()
                assert n.sum().item() == min(max(math.floor(budget * T + 0.5), k_base * T), top_k * T)
                # prefix: once a slot is dropped, every later slot of the row is dropped
                assert torch.equal(kept, torch.arange(top_k)[None, :] < n[:, None])
                assert (w[~kept] == 0).all() and (w[kept] > 0).all()
                # candidates do not depend on the budget: kept ids are the full-budget ids
                assert torch.equal(ids[kept], full_ids[kept])
                # best feasible set: among ranks >= k_base, no dropped candidate beats a kept one
                free = torch.arange(top_k)[None, :] >= k_base
                kept_free = c_full[kept & free]
                dropped_free = c_full[~kept & free]
                if kept_free.numel() and dropped_free.numel():
                    assert dropped_free.max() <= kept_free.min()


def test_rounding_is_half_up_in_double():
    logits = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    # T = 4: 1.625 * 4 = 6.5 -> 7 and 1.375 * 4 = 5.5 -> 6 (half up); 1.374 * 4 = 5.496 -> 5
    for budget, total in ((1.625, 7), (1.375, 6), (1.374, 5), (1.0, 4), (4.0, 16)):
        _, ids = ops.route(logits, 4, budget, k_base=1)
        assert (ids >= 0).sum().item() == total


def test_ties_go_to_lower_token_then_lower_rank():
    # Every token has identical logits: the extra slots go to the lowest tokens first.
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).repeat(5, 1)
    _, ids = ops.route(logits, 3, 1.6, k_base=1)  # round(8.0) = 8 slots: 5 base + 3 extra
    assert (ids >= 0).sum(1).tolist() == [2, 2, 2, 1, 1]
    # Equal scores inside a row: lower expert id first.
    logits = torch.tensor([[1.0, 5.0, 5.0, 1.0, 5.0]])
    _, ids = ops.route(logits, 4, 4, k_base=4)
    assert ids.tolist() == [[1, 2, 4, 0]]
    # Within one token, rank r+1 is never kept before rank r even when their scores tie.
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0]])
    _, ids = ops.route(logits, 3, 2.0, k_base=1)
    assert ids.tolist() == [[0, 1, 2], [0, -1, -1]]


def test_full_budget_is_plain_topk_and_k_base_equal_budget_is_plain_top_budget():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(33, 64, generator=gen)
    probs = torch.softmax(logits, dim=-1)
    for top_k in (1, 4, 6, 8):
        w, ids = ops.route(logits, top_k, top_k, k_base=1)
        tw, tids = probs.topk(top_k, dim=-1)
        assert torch.equal(ids.long(), tids)
        torch.testing.assert_close(w, tw)
        for b in range(0, top_k + 1):
            w, ids = ops.route(logits, top_k, b, k_base=b)
            assert torch.equal(ids[:, :b].long(), tids[:, :b]) and (ids[:, b:] == -1).all()
            torch.testing.assert_close(w[:, :b], tw[:, :b])


def test_t1_budget_rounds_like_per_layer_top_k():
    # With T = 1 Alloc-T is per-layer top-round(budget).
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(5))
    for budget, n in ((2.4, 2), (2.5, 3), (5.99, 6)):
        _, ids = ops.route(logits, 6, budget, k_base=1)
        assert (ids >= 0).sum().item() == n


# --- transformers-style routers of the target models, written here from their modeling code -----


def _as_sets(w: torch.Tensor, ids: torch.Tensor) -> list[dict[int, float]]:
    return [{int(i): float(x) for i, x in zip(row_ids, row_w) if i >= 0} for row_ids, row_w in zip(ids, w)]


def _assert_same_routing(got, want):
    gw, gi = got
    ww, wi = want
    gs, ws = _as_sets(gw, gi), _as_sets(ww, wi)
    for g, w in zip(gs, ws):
        assert g.keys() == w.keys()
        for k in g:
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-7)


def mixtral_qwen_router(logits, top_k, norm_topk_prob):
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids


def deepseek_v2_router(logits, top_k, n_group, topk_group, scale):
    scores = logits.float().softmax(dim=-1)
    T, E = scores.shape
    group_scores = scores.view(T, n_group, E // n_group).max(dim=-1).values
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(T, E)
    scores = scores.masked_fill(~score_mask.bool(), 0.0)
    w, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    return w * scale, ids


def deepseek_v3_router(logits, top_k, n_group, topk_group, bias, norm_topk_prob, scale):
    scores = logits.float().sigmoid()
    T, E = scores.shape
    choice = scores + bias
    group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(T, E)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, ids)
    if norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * scale, ids


def gpt_oss_router(logits, top_k):
    top_value, ids = torch.topk(logits.float(), top_k, dim=-1)
    return torch.softmax(top_value, dim=1), ids


def test_full_budget_matches_transformers_routers():
    gen = torch.Generator().manual_seed(11)
    T = 33
    # Mixtral (8 experts, top-2, renormalised), Qwen2-MoE (60, top-4, not), OLMoE (64, top-8)
    for E, top_k, norm in ((8, 2, True), (60, 4, False), (64, 8, False), (128, 8, True)):
        logits = torch.randn(T, E, generator=gen)
        got = ops.route(logits, top_k, top_k, scoring="softmax", norm_topk_prob=norm)
        _assert_same_routing(got, mixtral_qwen_router(logits, top_k, norm))
    # DeepSeek-V2 group_limited_greedy (160 experts in 8 groups upstream; 64 in 8 here)
    logits = torch.randn(T, 64, generator=gen)
    got = ops.route(logits, 6, 6, scoring="softmax_group", n_group=8, topk_group=3, routed_scaling_factor=16.0)
    _assert_same_routing(got, deepseek_v2_router(logits, 6, 8, 3, 16.0))
    # DeepSeek-V3 noaux_tc (256 experts, 8 groups, 4 chosen, top-8, bias, renormalised, x2.5)
    logits = torch.randn(T, 128, generator=gen)
    bias = torch.randn(128, generator=gen) * 0.1
    got = ops.route(logits, 8, 8, scoring="sigmoid_group", correction_bias=bias, n_group=8, topk_group=4,
                    norm_topk_prob=True, routed_scaling_factor=2.5)
    _assert_same_routing(got, deepseek_v3_router(logits, 8, 8, 4, bias, True, 2.5))
    # GPT-OSS (32 experts, top-4): top-k of the raw logits, softmax over them
    logits = torch.randn(T, 32, generator=gen)
    got = ops.route(logits, 4, 4, scoring="topk_softmax")
    _assert_same_routing(got, gpt_oss_router(logits, 4))
    # ... and with a reduced budget the GPT-OSS weights are softmax over the kept logits
    w, ids = ops.route(logits, 4, 2.5, k_base=1, scoring="topk_softmax")
    for t in range(T):
        kept = ids[t][ids[t] >= 0].long()
        torch.testing.assert_close(w[t, : kept.numel()], torch.softmax(logits[t, kept], dim=0))


def test_validation_switch_round_trips():
    before = ops.validation_enabled()
    try:
        ops.set_validation(True)
        assert ops.validation_enabled()
        ops.set_validation(False)
        assert not ops.validation_enabled()
    finally:
        ops.set_validation(before)


# --- opcheck and torch.compile ---------------------------------------------------------------------


def _route_samples():
    gen = torch.Generator().manual_seed(2)
    yield (torch.randn(7, 64, generator=gen), 6, 3.3), dict(k_base=1)
    yield (torch.randn(5, 60, generator=gen).bfloat16(), 4, 2.0), dict(k_base=2, norm_topk_prob=True)
    yield (torch.randn(3, 64, generator=gen).half(), 6, 6.0), dict(scoring="softmax_group", n_group=8, topk_group=3)
    yield (torch.randn(9, 128, generator=gen), 8, 4.5), dict(
        scoring="sigmoid_group", correction_bias=torch.randn(128, generator=gen), n_group=8, topk_group=4,
        norm_topk_prob=True, routed_scaling_factor=2.5)
    yield (torch.randn(4, 32, generator=gen), 4, 1.0), dict(k_base=0, scoring="topk_softmax")
    yield (torch.randn(0, 64, generator=gen), 6, 2.0), dict()


@pytest.mark.parametrize("sample", list(_route_samples()), ids=lambda s: f"T{s[0][0].shape[0]}")
def test_route_opcheck(sample):
    args, kwargs = sample
    torch.library.opcheck(torch.ops.allocmoe.route.default, args, kwargs)


def test_compile_fullgraph_route_and_experts():
    gen = torch.Generator().manual_seed(4)
    gate_up = torch.randn(16, 24, 32, generator=gen) * 0.1
    down = torch.randn(16, 32, 12, generator=gen) * 0.1

    def moe(hidden, logits):
        w, ids = ops.route(logits, 4, 2.5, k_base=1, norm_topk_prob=True)
        return ops.experts(hidden, gate_up, down, w, ids)

    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager", dynamic=True)
    for T in (5, 9):
        hidden = torch.randn(T, 32, generator=gen)
        logits = torch.randn(T, 16, generator=gen)
        torch.testing.assert_close(compiled(hidden, logits), moe(hidden, logits))


def test_probabilities_do_not_depend_on_expert_order():
    """A row and permutations of it get the same probabilities (docs/OPS.md step 1: the softmax
    denominator is summed exactly), so their equal scores are ties across tokens, and Alloc-T's
    extra slots go to the lower tokens first. An fp32 running sum gives these eight rows three
    different denominators."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, generator=gen) * 3
    logits = torch.stack([base] + [base[torch.randperm(64, generator=gen)] for _ in range(7)])
    w, _ = ops.route(logits, top_k=6, budget=6, k_base=0)
    assert all(torch.equal(w[t], w[0]) for t in range(8))
    w, ids = ops.route(logits, top_k=6, budget=1.5, k_base=1)  # 12 slots: 8 at k_base, 4 extra
    assert (ids >= 0).sum(dim=1).tolist() == [2, 2, 2, 2, 1, 1, 1, 1]
    rw, rids = ref.route(logits, top_k=6, budget=1.5, k_base=1)
    assert torch.equal(ids, rids)
