"""The allocmoe command end to end on tiny random-weight models (in-process and once as a process)."""
import importlib.machinery
import json
import math
import os
import subprocess
import sys
import types

import pytest

from allocmoe_ext import cli

MODEL = ["--model", "tiny:deepseek_v2", "--layers", "5", "--seq-len", "32", "--batch-size", "4",
         "--max-tokens", "1024", "--device", "cpu"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    import argparse
    import json as json_module

    with open(argparse.__file__, "rb") as f:
        (d / "calib.txt").write_bytes(f.read()[:4096])
    with open(json_module.decoder.__file__, "rb") as f:
        (d / "eval.txt").write_bytes(f.read()[:2048])
    return d


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_profile_plan_eval_end_to_end(texts, tmp_path, capsys):
    prof, plan, res = tmp_path / "profile.json", tmp_path / "plan.json", tmp_path / "res.json"
    rc, out, _ = run(capsys, "profile", *MODEL, "--calib", texts / "calib.txt", "--out", prof, "--no-progress")
    assert rc == 0 and "S[layer, k]" in out and prof.exists()
    saved = json.loads(prof.read_text())
    assert saved["complete"] and len(saved["matrix"]) == 4 and len(saved["matrix"][0]) == 3

    rc, out, _ = run(capsys, "plan", "--profile", prof, "--budget", 8, "--allocation", "alloc_l",
                     "--exact-budget", "--policy", "alloc_t", "--out", plan)
    assert rc == 0 and "B=8" in out
    p = json.loads(plan.read_text())
    assert sum(q["budget"] for q in p["policies"]) == 8 and p["profile"]["method"] == "alloc_l"
    assert {q["kind"] for q in p["policies"]} == {"alloc_t"}

    rc, out, _ = run(capsys, "eval", *MODEL, "--eval", texts / "eval.txt", "--plan", plan, "--json", res)
    assert rc == 0 and "perplexity" in out
    r = json.loads(res.read_text())
    assert math.isfinite(r["perplexity"]) and r["tokens"] == (1024 // 32) * 31  # --max-tokens 1024 in 32-token sequences
    # Alloc-T spends exactly round(K_l * T) per call: realised == planned.
    assert r["realised"] == pytest.approx(r["planned"])

    # Rerunning the finished profile resumes from the file: nothing to do, same matrix.
    rc, out, _ = run(capsys, "profile", *MODEL, "--calib", texts / "calib.txt", "--out", prof, "--no-progress")
    assert rc == 0 and json.loads(prof.read_text())["matrix"] == saved["matrix"]


def test_lexi_profile_and_plan(texts, tmp_path, capsys):
    prof, plan = tmp_path / "lexi.json", tmp_path / "plan.json"
    assert run(capsys, "profile", *MODEL, "--calib", texts / "calib.txt", "--method", "lexi",
               "--out", prof, "--no-progress")[0] == 0
    rc, out, _ = run(capsys, "plan", "--profile", prof, "--budget", 7, "--allocation", "lexi", "--out", plan)
    assert rc == 0
    assert sum(q["budget"] for q in json.loads(plan.read_text())["policies"]) == 7


@pytest.mark.parametrize("policy", ["top_p", "naee_skip"])
def test_threshold_policy_is_calibrated_to_its_budget(texts, tmp_path, capsys, policy):
    plan, res = tmp_path / "plan.json", tmp_path / "res.json"
    rc, out, _ = run(capsys, "plan", *MODEL, "--calib", texts / "calib.txt", "--budget", 7,
                     "--allocation", "descending", "--policy", policy, "--out", plan)
    assert rc == 0 and "thresholds:" in out
    # Evaluated on the calibration text itself, every layer hits its budget within 1%.
    rc, out, _ = run(capsys, "eval", *MODEL, "--eval", texts / "calib.txt", "--plan", plan, "--json", res)
    r = json.loads(res.read_text())
    assert r["planned"] == [3.0, 2.0, 1.0, 1.0]  # descending(4 layers, top-3, B=7)
    for got, want in zip(r["realised"], r["planned"]):
        assert abs(got - want) <= 0.01 * want


def test_eval_under_a_policy_without_a_plan(texts, tmp_path, capsys):
    res = tmp_path / "res.json"
    rc, out, _ = run(capsys, "eval", *MODEL, "--eval", texts / "eval.txt", "--policy", "topk",
                     "--budget", 10, "--json", res)
    assert rc == 0
    assert json.loads(res.read_text())["realised"] == pytest.approx([2.5] * 4)  # uniform, fractional
    rc, out, _ = run(capsys, "eval", "--model", "tiny:olmoe", "--eval", texts / "eval.txt", "--json", res)
    assert rc == 0 and "full budget" in out
    assert json.loads(res.read_text())["realised"] == pytest.approx([2.0, 2.0])


def test_bad_input_is_one_clear_line(texts, tmp_path, capsys):
    prof, plan = tmp_path / "profile.json", tmp_path / "plan.json"
    assert run(capsys, "profile", *MODEL, "--calib", texts / "calib.txt", "--out", prof, "--no-progress")[0] == 0

    def error(*argv):
        rc, _, err = run(capsys, *argv)
        last = err.strip().split("\n")[-1]  # after any loading progress bars of transformers
        assert rc == 2 and last.startswith("allocmoe: error:"), err
        return last

    assert "outside [L*k_min, L*top_k] = [4, 12]" in error(
        "plan", "--profile", prof, "--budget", 3, "--allocation", "alloc_l", "--out", plan)
    assert "outside" in error("plan", "--profile", prof, "--budget", 13, "--out", plan)
    assert "needs --profile" in error("plan", *MODEL, "--budget", 8, "--allocation", "alloc_l", "--out", plan)
    assert "give --model and --calib" in error("plan", "--profile", prof, "--budget", 8, "--policy", "top_p",
                                               "--out", plan)
    # A profile with a NaN, and one with the wrong shape.
    bad = json.loads(prof.read_text())
    bad["matrix"][1][2] = float("nan")
    (tmp_path / "nan.json").write_text(json.dumps(bad))
    assert "non-finite" in error("plan", "--profile", tmp_path / "nan.json", "--budget", 8,
                                 "--allocation", "alloc_l", "--out", plan)
    bad = json.loads(prof.read_text())
    bad["matrix"] = bad["matrix"][:3]
    (tmp_path / "short.json").write_text(json.dumps(bad))
    assert "shape (3, 3)" in error("plan", "--profile", tmp_path / "short.json", "--budget", 8,
                                   "--allocation", "alloc_l", "--out", plan)
    # A plan for another model.
    assert run(capsys, "plan", "--profile", prof, "--budget", 8, "--out", plan)[0] == 0
    assert "another model" in error("eval", "--model", "tiny:olmoe", "--eval", texts / "eval.txt", "--plan", plan)
    assert "another model" in error("plan", "--model", "tiny:olmoe", "--profile", prof, "--budget", 3, "--out", plan)
    # Models and files that do not exist, an architecture the drop-in does not support.
    assert "unknown tiny architecture" in error("eval", "--model", "tiny:bert", "--eval", texts / "eval.txt")
    assert "neither" in error("eval", "--model", tmp_path / "nope", "--eval", texts / "eval.txt")
    assert "does not exist" in error("eval", *MODEL, "--eval", tmp_path / "missing.txt")
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(llama)
    assert "unsupported architecture 'llama'" in error("eval", "--model", llama, "--eval", texts / "eval.txt")


def test_bench_passes_its_arguments_through(tmp_path, monkeypatch):
    script = tmp_path / "bench" / "bench_layer.py"
    script.parent.mkdir()
    script.write_text("import json, sys\n"
                      "from dataclasses import dataclass\n"
                      "@dataclass(frozen=True)\n"  # needs the module registered while it loads
                      "class Shape:\n"
                      "    n: int\n"
                      "def main(argv=None):\n"
                      f"    open({str(tmp_path / 'argv.json')!r}, 'w').write(json.dumps(argv))\n"
                      "    return 3\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--quick", "--device", "cpu"]) == 3
    assert json.loads((tmp_path / "argv.json").read_text()) == ["--quick", "--device", "cpu"]


def test_an_optional_demo_module_registers_its_subcommand(monkeypatch, capsys):
    demo = types.ModuleType("allocmoe_ext.demo")
    demo.__spec__ = importlib.machinery.ModuleSpec("allocmoe_ext.demo", None)

    def register_cli(sub):
        p = sub.add_parser("demo")
        p.add_argument("--budget", type=float, default=3.0)
        p.set_defaults(func=lambda args: print(f"demo at {args.budget}") or 0)

    demo.register_cli = register_cli
    monkeypatch.setitem(sys.modules, "allocmoe_ext.demo", demo)
    assert cli.main(["demo", "--budget", "2"]) == 0
    assert "demo at 2.0" in capsys.readouterr().out


def test_cli_as_a_process(texts, tmp_path):
    # One real process (the console script runs the same main); most of its time is importing transformers.
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(cli.__file__))
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "allocmoe_ext.cli", "eval", "--model", "tiny:olmoe",
                           "--eval", str(texts / "eval.txt"), "--seq-len", "32", "--policy", "alloc_t",
                           "--budget", "3"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "perplexity" in proc.stdout and "alloc_t" in proc.stdout
    assert "total  " in proc.stdout and "3.000     3.000" in proc.stdout  # planned and realised B
