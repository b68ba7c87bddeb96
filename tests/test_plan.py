"""Plan file: round trip, model identity check, malformed plans, use with the integration."""
import json

import pytest
import torch

from allocmoe_ext import integration
from allocmoe_ext.integration.tiny import tiny_model
from allocmoe_ext.plan import Plan, PlanMismatchError, check_fits, make_plan
from allocmoe_ext.profiling import lexi_profile

INFO = dict(architecture="deepseek_v2", num_moe_layers=4, num_experts=8, top_k=3, hidden_size=32)


def test_round_trip_keeps_everything(tmp_path):
    profile = {"method": "alloc_l", "matrix": [[0.3, 0.1, 0.0]] * 4, "calibration": {"tokens": 64}}
    plan = make_plan(INFO, [3, 2, 1, 1], kind="alloc_t", allocation="alloc_l", profile=profile, notes="n")
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded == plan
    d = json.loads((tmp_path / "plan.json").read_text())
    assert d["schema_version"] == 1 and d["kind"] == "allocmoe-plan"
    assert d["model"] == {k: INFO[k] for k in ("architecture", "num_moe_layers", "num_experts", "top_k")}
    assert [p["budget"] for p in d["policies"]] == [3.0, 2.0, 1.0, 1.0]
    assert d["budget"] == 7.0 and d["profile"]["matrix"] == profile["matrix"]
    assert loaded.layer_budgets == [3.0, 2.0, 1.0, 1.0]
    assert "B=7" in loaded.summary()


def test_check_fits_names_every_difference():
    plan = make_plan(INFO, [2, 2, 2, 2])
    plan.check_fits(INFO)
    other = dict(INFO, num_experts=16, top_k=4)
    with pytest.raises(PlanMismatchError, match=r"num_experts: plan 8 vs model 16.*top_k: plan 3 vs model 4"):
        check_fits(plan, other)
    with pytest.raises(PlanMismatchError, match="architecture"):
        plan.check_fits(dict(INFO, architecture="olmoe"))


def test_malformed_plans_are_clear_errors(tmp_path):
    good = make_plan(INFO, [2, 2, 2, 2]).to_dict()
    cases = [
        (dict(good, schema_version=99), "schema_version"),
        (dict(good, kind="allocmoe-profile"), "not an allocmoe plan"),
        (dict(good, policies=good["policies"][:3]), "3 policies for a model with 4 MoE layers"),
        (dict(good, policies=[dict(p, budget=5.0) for p in good["policies"]]), "outside"),
        (dict(good, policies=[dict(p, kind="top_p") for p in good["policies"]]), "threshold"),
        (dict(good, policies=[dict(p, kind="magic") for p in good["policies"]]), "policy kind"),
        (dict(good, model={"architecture": "x"}), "identity lacks"),
        (dict(good, surprise=1), "malformed"),
    ]
    for d, msg in cases:
        with pytest.raises(ValueError, match=msg):
            Plan.from_dict(d)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Plan.load(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="layer_budgets"):
        make_plan(INFO, [2, 2])


def test_alloc_t_k_base_never_exceeds_the_layer_budget():
    plan = make_plan(INFO, [3, 2, 1, 1.5], kind="alloc_t", k_base=2)
    assert [p.k_base for p in plan.policies] == [2, 2, 1, 1]


def test_plan_applies_to_its_model_and_not_to_another():
    model = tiny_model("deepseek_v2", num_hidden_layers=5)
    info = integration.model_info(model)
    plan = make_plan(info, [3, 2, 2, 1], kind="alloc_t")
    integration.apply(model, plan)
    assert [l.policy for l in integration.moe_layers(model)] == plan.policies
    integration.reset_stats(model)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 96, (2, 16)), use_cache=False)
    stats = integration.activation_stats(model)
    assert stats == pytest.approx([3, 2, 2, 1])
    other = tiny_model("olmoe")
    with pytest.raises(PlanMismatchError, match="another model"):
        integration.apply(other, plan)


def test_plan_can_carry_a_measured_profile(tmp_path):
    model = integration.apply(tiny_model("olmoe"))
    prof = lexi_profile(model, [torch.randint(0, 96, (1, 8))], progress=False)
    plan = make_plan(integration.model_info(model), [1, 2], profile=prof, allocation="lexi")
    plan.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json").profile["method"] == "lexi"


def test_build_plan_for_every_allocation_and_policy():
    from allocmoe_ext.plan import build_plan
    from allocmoe_ext.profiling import alloc_l_profile

    model = integration.apply(tiny_model("deepseek_v2", num_hidden_layers=5))
    info = integration.model_info(model)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 96, (4, 32), generator=g)]
    profiles = {"alloc_l": alloc_l_profile(model, batches, progress=False),
                "lexi": lexi_profile(model, batches, progress=False)}
    for allocation in ("uniform", "ascending", "descending", "alloc_l", "lexi"):
        for policy in ("topk", "alloc_t", "top_p", "naee_skip"):
            plan = build_plan(info, 8, allocation, policy, profile=profiles.get(allocation), model=model,
                              calib_batches=batches, exact_budget=True)
            assert sum(plan.layer_budgets) == pytest.approx(8)
            assert {p.kind for p in plan.policies} == {policy}
            assert plan.allocation == allocation
            if policy in ("top_p", "naee_skip"):
                assert all(p.threshold is not None for p in plan.policies)
    with pytest.raises(ValueError, match="measured with method 'alloc_l'"):
        build_plan(info, 8, "alloc_l", profile=profiles["lexi"])
    with pytest.raises(ValueError, match="needs a profile"):
        build_plan(info, 8, "lexi")
    with pytest.raises(ValueError, match="calib_batches"):
        build_plan(info, 8, "uniform", "top_p")
    other = integration.model_info(tiny_model("olmoe"))
    with pytest.raises(PlanMismatchError, match="another model"):
        build_plan(other, 3, "alloc_l", profile=profiles["alloc_l"])
