"""The quality study behind `allocmoe demo` / bench/quality.py, and the embedded reference model."""
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from allocmoe_ext import demo  # noqa: E402
from allocmoe_ext.integration.tiny import tiny_model  # noqa: E402


def _batches(seed, n, seq, vocab):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (2, seq), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_study():
    # tiny deepseek_v2: 1 dense + 2 MoE layers, 8 experts, top-3.
    model = tiny_model("deepseek_v2", num_hidden_layers=3)
    calib = _batches(0, 2, 24, model.config.vocab_size)
    evals = _batches(1, 2, 24, model.config.vocab_size)
    results = demo.quality_study(model, calib, evals, budgets=(1.5, 2), log=lambda s: None)
    return model, results


def test_study_has_every_method_at_every_budget_at_the_right_budget(tiny_study):
    _, results = tiny_study
    L, K = results["model"]["num_moe_layers"], results["model"]["top_k"]
    assert (L, K) == (2, 3)
    assert results["reference"]["realised"] == pytest.approx(K)
    assert len(results["rows"]) == len(demo.METHODS) * 2
    for r in results["rows"]:
        b = r["budget_per_layer"]
        assert r["budget"] == pytest.approx(b * L)
        assert len(r["layer_budgets"]) == L and len(r["realised_per_layer"]) == L
        assert math.isfinite(r["bits_per_byte"]) and 0 <= r["accuracy"] <= 1
        if r["policy"] in ("topk", "alloc_t"):
            # Deterministic policies spend exactly the planned per-layer budgets (48 tokens a call).
            assert r["realised_per_layer"] == pytest.approx(r["layer_budgets"], abs=1e-9)
            assert sum(r["layer_budgets"]) == pytest.approx(b * L)
        else:
            assert r["thresholds"] is not None and len(r["thresholds"]) == L
    # Both profiles are complete L x K matrices; Alloc-L rows are relative perplexity changes.
    for name in ("alloc_l", "lexi"):
        m = results["profiles"][name]["matrix"]
        assert len(m) == L and all(len(row) == K for row in m)
    assert results["profiles"]["alloc_l"]["matrix"][-1][-1] == pytest.approx(0.0, abs=1e-12)
    json.dumps(results)  # JSON-ready


def test_study_leaves_the_model_at_full_budget(tiny_study):
    from allocmoe_ext import integration

    model, results = tiny_study
    assert all(layer.policy.budget is None for layer in integration.moe_layers(model))


def test_tables_show_every_method_and_mark_the_best(tiny_study):
    _, results = tiny_study
    text = demo.format_table(results)
    for name, _, _ in demo.METHODS:
        assert name in text
    for b in (1.5, 2):
        rows = [r for r in results["rows"] if r["budget_per_layer"] == b]
        best = min(rows, key=lambda r: r["bits_per_byte"])
        assert f"{best['bits_per_byte']:.4f}*" in text
    md = demo.format_table(results, markdown=True).splitlines()
    table = [line for line in md if line.startswith("|")]
    assert len(table) == 2 + 1 + len(demo.METHODS)  # header, rule, full budget, methods
    assert all(line.count("|") == 2 + 2 for line in table)
    alloc = demo.format_allocations(results, markdown=True)
    assert "Alloc-L" in alloc and "LExI" in alloc and "k=3" in alloc


def _fake_results(values):
    rows = []
    for (name, b), bpb in values.items():
        rows.append({"method": name, "budget_per_layer": b, "bits_per_byte": bpb})
    return {"budgets": sorted({b for _, b in values}), "rows": rows}


def test_verdict_compares_against_uniform_and_the_best_baseline():
    res = _fake_results({("Uniform", 2.0): 1.5, ("NAEE", 2.0): 1.3, ("+Alloc-L+T", 2.0): 1.4,
                         ("Uniform", 3.0): 1.2, ("LExI", 3.0): 1.25, ("+Alloc-L+T", 3.0): 1.1})
    v = demo.verdict(res)
    assert v["2"]["beats_uniform"] and not v["2"]["beats_best_baseline"]
    assert v["2"]["best_baseline"] == "NAEE"
    assert v["3"]["beats_uniform"] and v["3"]["beats_best_baseline"]
    assert v["3"]["best_baseline"] == "Uniform"
    # Without a Uniform row the comparison with Uniform is absent, not a crash.
    v = demo.verdict(_fake_results({("NAEE", 2.0): 1.3, ("+Alloc-L+T", 2.0): 1.2}))
    assert v["2"]["uniform"] is None and not v["2"]["beats_uniform"] and v["2"]["beats_best_baseline"]


def test_unknown_method_and_bad_budget_are_clear_errors():
    model = tiny_model("deepseek_v2", num_hidden_layers=2)
    b = _batches(0, 1, 8, model.config.vocab_size)
    with pytest.raises(ValueError, match="methods"):
        demo.quality_study(model, b, b, methods=["Uniform", "Oracle"], log=lambda s: None)
    with pytest.raises(ValueError, match="budgets"):
        demo.quality_study(model, b, b, budgets=(7,), methods=["Uniform"], log=lambda s: None)


def test_layer_speed_times_every_budget():
    model = tiny_model("deepseek_v2", num_hidden_layers=2)
    rows = demo.layer_speed(model, budgets=(1, 2), tokens=(1, 5), repeats=2)
    assert [(r["tokens"], r["budget_per_layer"]) for r in rows] == [
        (1, 3.0), (1, 1.0), (1, 2.0), (5, 3.0), (5, 1.0), (5, 2.0)]
    assert all(r["median_us"] > 0 for r in rows)


def test_demo_is_a_cli_subcommand():
    from allocmoe_ext import cli

    args = cli.build_parser().parse_args(["demo", "--eval-seqs", "3", "--budgets", "2", "4"])
    assert args.eval_seqs == 3 and args.budgets == [2.0, 4.0] and args.func is demo._cli
    assert demo.main(["--seq-len", "1000"]) == 2


# ----------------------------------------------------------------- the embedded reference model

def test_reference_checkpoint_ships_and_is_small():
    from allocmoe_ext.reference_model import PATH

    files = {p.name: p.stat().st_size for p in PATH.iterdir()}
    assert "config.json" in files and "model.safetensors" in files and "training_log.json" in files
    assert sum(files.values()) <= 25 * 10 ** 6
    with open(PATH / "config.json") as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "deepseek_v2" and cfg["vocab_size"] == 256
    assert (cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["n_shared_experts"]) == (64, 6, 2)
    assert cfg["num_hidden_layers"] - cfg["first_k_dense_replace"] >= 8


def test_demo_runs_end_to_end_on_the_reference_model(tmp_path, capsys):
    """The main job on the embedded model at a miniature size: it is trained (far below the
    8 bits per byte of a uniform guess) and every row spends its budget."""
    out = tmp_path / "demo.json"
    results = demo.run(calib_seqs=1, eval_seqs=2, seq_len=64, budgets=(3,),
                       methods=["Uniform", "+Alloc-L+T"], device="cpu", json_path=str(out))
    text = capsys.readouterr().out
    assert "+Alloc-L+T" in text and "b=3" in text
    assert results["model"]["num_moe_layers"] == 8 and results["model"]["num_experts"] == 64
    assert results["reference"]["bits_per_byte"] < 3.0
    for r in results["rows"]:
        assert r["realised"] == pytest.approx(3.0, abs=1e-9)
        assert r["bits_per_byte"] < 4.0
    assert set(results["verdict"]) == {"3"}
    assert json.loads(out.read_text())["budgets"] == [3.0]
