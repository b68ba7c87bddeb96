"""Alloc-L allocation: the exact DP against brute force, the baseline schedules, bad input."""
import itertools

import numpy as np
import pytest

from allocmoe_ext import allocation
from allocmoe_ext.allocation import allocate, ascending, descending, lexi, schedule_cost, uniform


def brute_force(S, budget, k_min=1, exact=False):
    """All schedules; the minimum cost and, among exact ties, the lexicographically largest."""
    L, K = S.shape
    best_cost, best = None, None
    for ks in itertools.product(range(k_min, K + 1), repeat=L):
        if sum(ks) > budget or (exact and sum(ks) != budget):
            continue
        cost = sum(S[i, k - 1] for i, k in enumerate(ks))
        if best_cost is None or cost < best_cost or (cost == best_cost and ks > best):
            best_cost, best = cost, ks
    return best_cost, list(best)


@pytest.mark.parametrize("seed", range(40))
def test_dp_equals_brute_force_on_random_instances(seed):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(1, 6))
    K = int(rng.integers(1, 5))
    k_min = int(rng.integers(1, K + 1))
    budget = int(rng.integers(L * k_min, L * K + 1))
    # Half the instances monotone like a real perplexity profile, half arbitrary.
    S = rng.normal(size=(L, K))
    if seed % 2 == 0:
        S = np.sort(np.abs(S), axis=1)[:, ::-1].copy()
    for exact in (False, True):
        ks = allocate(S, budget, k_min=k_min, exact=exact)
        cost, _ = brute_force(S, budget, k_min, exact)
        assert (sum(ks) == budget) if exact else (sum(ks) <= budget)
        assert all(k_min <= k <= K for k in ks)
        assert schedule_cost(S, ks) == pytest.approx(cost, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_dp_tie_breaking_is_the_lexicographically_largest_optimum(seed):
    # Small integer costs make many exact ties; floats of small integers sum exactly.
    rng = np.random.default_rng(100 + seed)
    L, K = int(rng.integers(2, 5)), int(rng.integers(2, 5))
    S = rng.integers(0, 3, size=(L, K)).astype(float)
    budget = int(rng.integers(L, L * K + 1))
    for exact in (False, True):
        cost, best = brute_force(S, budget, exact=exact)
        ks = allocate(S, budget, exact=exact)
        assert schedule_cost(S, ks) == cost
        assert ks == best


def test_dp_prefers_the_insensitive_layer():
    # Layer 0 loses a lot below 3 experts, layer 1 barely cares.
    S = np.array([[9.0, 5.0, 0.1, 0.0], [0.3, 0.2, 0.1, 0.0]])
    assert allocate(S, 5) == [4, 1]
    assert allocate(S, 4) == [3, 1]
    assert allocate(S, 8) == [4, 4]
    assert lexi(S, 5) == [4, 1]


def test_exact_budget_spends_everything_even_when_fewer_experts_look_better():
    # A noisy profile where layer 1 "improves" with fewer experts.
    S = np.array([[3.0, 2.0, 1.0], [0.0, 0.5, 0.7]])
    assert allocate(S, 5) == [3, 1]
    assert allocate(S, 5, exact=True) == [3, 2]
    assert lexi(S, 5) == [3, 2]


def test_dp_is_fast_enough_for_a_real_model():
    rng = np.random.default_rng(0)
    S = np.sort(rng.random((26, 6)), axis=1)[:, ::-1]  # DeepSeek-V2-Lite shape
    ks = allocate(S, 78)
    assert sum(ks) <= 78 and len(ks) == 26


def test_uniform_is_fractional_and_sums_to_budget():
    ks = uniform(8, 6, 20)
    assert ks == [2.5] * 8
    assert sum(uniform(26, 6, 78)) == pytest.approx(78)


@pytest.mark.parametrize("L,K,B", [(1, 6, 3), (8, 6, 16), (8, 6, 20), (8, 6, 48), (8, 6, 8),
                                   (26, 6, 78), (26, 6, 52), (7, 4, 17), (3, 8, 13)])
def test_ascending_descending_are_monotone_and_sum_to_budget(L, K, B):
    up, down = ascending(L, K, B), descending(L, K, B)
    for ks in (up, down):
        assert sum(ks) == B and all(1 <= k <= K for k in ks)
    assert all(a <= b for a, b in zip(up, up[1:]))
    assert all(a >= b for a, b in zip(down, down[1:]))
    if L > 1 and L < B < L * K:
        assert up[0] < up[-1], "the ramp must actually ascend"
    assert down == up[::-1]


def test_ascending_ramp_spans_the_allowed_range():
    assert ascending(5, 6, 15) == [1, 2, 3, 4, 5]
    assert ascending(4, 6, 24) == [6, 6, 6, 6]


@pytest.mark.parametrize("fn", [lambda b: allocate(np.ones((4, 6)), b), lambda b: uniform(4, 6, b),
                                lambda b: ascending(4, 6, b), lambda b: descending(4, 6, b)])
def test_budget_outside_range_is_a_clear_error(fn):
    with pytest.raises(ValueError, match="budget"):
        fn(3)  # below L * k_min = 4
    with pytest.raises(ValueError, match="budget"):
        fn(25)  # above L * top_k = 24
    with pytest.raises(ValueError, match="budget"):
        fn(float("nan"))


def test_budget_below_l_times_k_min():
    with pytest.raises(ValueError, match=r"L\*k_min"):
        allocate(np.ones((4, 6)), 7, k_min=2)


def test_fractional_budget_rejected_by_integer_schedules():
    with pytest.raises(ValueError, match="integer"):
        allocate(np.ones((4, 6)), 10.5)


def test_profile_with_nan_or_wrong_shape_is_a_clear_error():
    S = np.ones((4, 6))
    S[2, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite.*layer 2, k=4"):
        allocate(S, 12)
    with pytest.raises(ValueError, match="2-D"):
        allocate(np.ones(6), 3)
    with pytest.raises(ValueError, match="shape"):
        allocate(np.ones((4, 6)), 12, expect_shape=(5, 6))
    with pytest.raises(ValueError, match="numeric"):
        allocate([["a", "b"]], 2)


def test_allocation_for_names():
    S = np.array([[9.0, 5.0, 0.1, 0.0], [0.3, 0.2, 0.1, 0.0]])
    assert allocation.allocation_for("alloc_l", 5, 2, 4, S) == [4.0, 1.0]
    assert allocation.allocation_for("uniform", 5, 2, 4) == [2.5, 2.5]
    with pytest.raises(ValueError, match="needs a profile"):
        allocation.allocation_for("lexi", 5, 2, 4)
    with pytest.raises(ValueError, match="allocation method"):
        allocation.allocation_for("random", 5, 2, 4)
