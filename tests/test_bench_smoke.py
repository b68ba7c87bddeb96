"""CPU smoke test of the layer benchmark (bench/bench_layer.py): tiny shapes, a few seconds.

It checks that the harness runs end to end, that every baseline computes the right function
(rel err against the fp32 reference), that a wrong or missing "ours" can never be reported as
fast, and the harness's own Alloc-T reference.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_layer.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_layer", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_layer"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_quick_run_writes_json_and_checks_every_path(bench, tmp_path):
    argv = ["--quick", "--device", "cpu", "--shapes", "dsv2", "--tokens", "1,4", "--budgets", "full,50%",
            "--reps", "2", "--warmup", "1", "--sets", "2", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    files = list(tmp_path.glob("layer_cpu-*.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").exists()
    result = json.loads(files[0].read_text())
    assert result["ceilings"]["copy_bw_Bps"] > 0 and result["ceilings"]["matmul_flops"] > 0
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 2  # routed only / with shared x T x budget
    for row in rows:
        k = 6 if row["budget_label"] == "full" else 3
        assert row["k_realised"] == pytest.approx(k)
        assert 1 <= row["experts_touched"] <= row["T"] * k
        assert row["floor_us"] == max(row["bw_floor_us"], row["mm_floor_us"]) > 0
        paths = row["paths"]
        assert set(paths) == set(bench.PATHS)
        for name in ("eager_loop", "grouped_mm", "hf_batched_mm", "hf_grouped_mm"):
            if "skipped" in paths[name]:
                continue
            eager = paths[name]["eager"]
            assert eager["median_us"] > 0 and eager["ok"], (name, eager)
        for name in ("ours", "fused", "route"):
            p = paths[name]
            assert "eager" in p or "error" in p or "skipped" in p, (name, p)
            if "eager" in p and name != "fused":  # our CPU ops, when built, must check out
                assert p["eager"]["ok"], (name, p["eager"])
        # "ours" is only reported from a path whose output (and routing) checked out
        if "ours_us" in row:
            assert row["ours_path"].split("/")[0] in bench.OURS_PATHS
            mode = row["ours_path"].split("/")[1]
            assert paths[row["ours_path"].split("/")[0]][mode]["ok"]
            assert row["pct_of_floor"] == pytest.approx(100 * row["floor_us"] / row["ours_us"])


def test_wrong_output_is_never_the_best_time(bench):
    res = {"eager": {"median_us": 5.0, "ok": False}, "graph": {"median_us": 9.0, "ok": True}}
    assert bench.best_time(res, require_ok=True) == (9.0, "graph")
    assert bench.best_time({"eager": {"median_us": 1.0, "ok": False}}, require_ok=True) is None


def test_alloc_t_reference_keeps_budget_prefix_and_best_scores(bench):
    torch.manual_seed(0)
    T, E, K, budget = 7, 12, 4, 2.5
    logits = torch.randn(T, E) * 2
    w, ids = bench.alloc_t_torch(logits, K, budget, k_base=1)
    n_t = (ids >= 0).sum(dim=1)
    assert int(n_t.sum()) == math.floor(budget * T + 0.5)
    assert bool((n_t >= 1).all()) and bool((n_t <= K).all())
    assert bool(((ids >= 0) == (torch.arange(K)[None, :] < n_t[:, None])).all())  # prefixes
    probs = torch.softmax(logits, -1)
    top_w, _ = probs.topk(K, dim=-1)
    kept_optional = top_w[:, 1:][ids[:, 1:] >= 0]
    dropped = top_w[:, 1:][ids[:, 1:] < 0]
    assert kept_optional.min() >= dropped.max()  # the extra slots went to the best candidates
    assert torch.equal(w[ids >= 0], probs.gather(1, ids.clamp(min=0).long())[ids >= 0])
    assert bench.route_check((w, ids), logits, w, ids)["ok"]
    bad = ids.clone()
    bad[0, 0] = (bad[0, 0] + 1) % E  # a different expert for one slot
    assert not bench.route_check((w, bad), logits, w, ids)["ok"]


def test_grouped_mm_path_masks_dropped_slots(bench):
    torch.manual_seed(1)
    E, H, I, T = 4, 16, 8, 5
    gate_up = (torch.randn(E, 2 * I, H) / 4).to(torch.bfloat16)
    down = (torch.randn(E, H, I) / 3).to(torch.bfloat16)
    x = torch.randn(T, H).to(torch.bfloat16)
    ids = torch.tensor([[0, 1], [2, -1], [3, 0], [1, -1], [2, 3]], dtype=torch.int32)
    w = torch.rand(T, 2) * (ids >= 0)
    layer = type("L", (), {"gate_up": gate_up, "down": down})()
    ref = bench.reference_out(x, w, ids, layer, shared=False)
    sentinel = torch.where(ids >= 0, ids, E).long()
    out = bench.grouped_mm_experts(x, sentinel, w, gate_up, down)
    assert bench.rel_err(out, ref) < 1e-2
    eager = bench.TorchExperts(None, gate_up, down)(x, sentinel, w)
    assert bench.rel_err(eager, ref) < 1e-2


def test_bad_arguments_name_the_flag(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "ours,nonsense"])
    assert "--only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--tokens", "1,x"])
    assert "--tokens" in capsys.readouterr().err


def test_cold_start_probe_says_it_needs_a_gpu():
    """bench/cold_start_probe.py measures on CUDA only; elsewhere it must say so and exit 0."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the probe would measure")
    probe = os.path.join(os.path.dirname(BENCH), "cold_start_probe.py")
    done = subprocess.run([sys.executable, probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "needs a CUDA GPU" in done.stdout
