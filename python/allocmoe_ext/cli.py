"""The ``allocmoe`` command.

    allocmoe profile --model M --calib FILE [--method alloc_l|lexi] --out profile.json
    allocmoe plan    --budget B [--allocation alloc_l|lexi|uniform|ascending|descending]
                     [--policy topk|alloc_t|top_p|naee_skip] [--profile profile.json]
                     [--model M --calib FILE] --out plan.json
    allocmoe eval    --model M --eval FILE [--plan plan.json | --policy ... --budget B ...]
    allocmoe bench   [arguments of bench/bench_layer.py]

``M`` is a local transformers checkpoint directory or ``tiny:<arch>`` (a seeded random-weight
tiny config, see ``integration.tiny``; ``--layers`` sets its decoder layer count). Text files
are tokenised with the checkpoint's tokenizer when it has one, otherwise byte-level
(token = byte value modulo the vocabulary size), and cut into ``--seq-len`` sequences.

``profile`` writes its partial profile to ``--out`` after every layer; rerunning the same
command resumes. ``plan`` turns a profile (or nothing, for uniform/ascending/descending) and a
global budget B into per-layer K_l; ``top_p``/``naee_skip`` thresholds are calibrated on
``--calib`` per layer. ``eval`` reports perplexity, next-token accuracy and the realised
average experts per token of every MoE layer. Errors (bad budget, plan for another model,
unsupported architecture, ...) print one line and exit with status 2.

Extra subcommands: a module ``allocmoe_ext.demo`` that defines ``register_cli(subparsers)`` is
imported (only when it exists) and adds its own subparser; it must ``set_defaults(func=...)``
with a function ``func(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time

import torch

EXIT_USAGE = 2


class CLIError(ValueError):
    """A user error the command reports in one line."""


# ----------------------------------------------------------------------------- model and data

def load_model(name: str, device: str = "cpu", dtype: str = "float32", layers: int | None = None,
               seed: int = 0):
    """(model in eval mode on ``device``, tokenizer or None) of ``tiny:<arch>`` or a checkpoint dir."""
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if name.startswith("tiny:"):
        from .integration.tiny import TINY_ARCHITECTURES, tiny_model

        arch = name[len("tiny:"):]
        if arch not in TINY_ARCHITECTURES:
            raise CLIError(f"--model tiny:{arch}: unknown tiny architecture; choose one of "
                           f"{', '.join('tiny:' + a for a in TINY_ARCHITECTURES)}")
        overrides = {} if layers is None else {"num_hidden_layers": layers}
        model, tokenizer = tiny_model(arch, seed=seed, **overrides), None
    elif os.path.isdir(name):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
        tokenizer = None
        if any(os.path.exists(os.path.join(name, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                              "tokenizer.model", "vocab.json")):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(name)
    else:
        raise CLIError(f"--model {name!r} is neither tiny:<arch> nor a local checkpoint directory")
    return model.to(device=device, dtype=torch_dtype).eval(), tokenizer


def read_tokens(path: str, tokenizer, vocab_size: int) -> torch.Tensor:
    """1-D int64 token ids of a text file."""
    if not os.path.isfile(path):
        raise CLIError(f"text file {path!r} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    if tokenizer is not None:
        ids = tokenizer(data.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.int64)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64) % vocab_size


def make_batches(tokens: torch.Tensor, seq_len: int, batch_size: int, max_tokens: int | None) -> list[torch.Tensor]:
    """Consecutive non-overlapping sequences of ``seq_len`` tokens, ``batch_size`` per batch, at
    most ``max_tokens`` tokens in all; a text shorter than one sequence is one short sequence."""
    if seq_len < 2 or batch_size < 1:
        raise CLIError("--seq-len must be >= 2 and --batch-size >= 1")
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    n_seq = tokens.numel() // seq_len
    if n_seq == 0:
        if tokens.numel() < 2:
            raise CLIError("the text has fewer than 2 tokens")
        return [tokens[None]]
    seqs = tokens[: n_seq * seq_len].view(n_seq, seq_len)
    return [seqs[i: i + batch_size] for i in range(0, n_seq, batch_size)]


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _patched_model(args):
    from . import integration

    model, tokenizer = load_model(args.model, _device(args.device), args.dtype, args.layers, args.seed)
    integration.apply(model)  # unsupported architectures fail here, naming the architecture
    return model, tokenizer


def _text_batches(args, path, model, tokenizer):
    tokens = read_tokens(path, tokenizer, model.config.vocab_size)
    batches = make_batches(tokens, args.seq_len, args.batch_size, args.max_tokens)
    return batches


# ----------------------------------------------------------------------------- commands

def _print_matrix(title: str, matrix, fmt="{:+.4f}"):
    K = len(matrix[0])
    print(title)
    print("layer " + " ".join(f"{'k=' + str(k):>10}" for k in range(1, K + 1)))
    for i, row in enumerate(matrix):
        print(f"{i:>5} " + " ".join(f"{fmt.format(v):>10}" for v in row))


def cmd_profile(args) -> int:
    from .profiling import alloc_l_profile, lexi_profile

    model, tokenizer = _patched_model(args)
    batches = _text_batches(args, args.calib, model, tokenizer)
    n_tok = sum(b.numel() for b in batches)
    print(f"profiling {args.method} on {args.model}: {len(batches)} batches, {n_tok} calibration tokens")
    t0 = time.perf_counter()
    if args.method == "alloc_l":
        prof = alloc_l_profile(model, batches, path=args.out, progress=not args.no_progress, source=args.calib)
    else:
        prof = lexi_profile(model, batches, progress=not args.no_progress, source=args.calib)
        prof.save(args.out)
    elapsed = time.perf_counter() - t0
    if prof.reference is not None:
        print(f"full-budget perplexity {prof.reference:.4f}")
    _print_matrix(f"S[layer, k] ({prof.normalisation})", prof.matrix)
    print(f"wrote {args.out} ({elapsed:.1f} s)")
    return 0


def _plan_from_args(args, info: dict, model=None, tokenizer=None):
    """A Plan from --budget/--allocation/--policy/--k-base/--profile (+ --calib for thresholds)."""
    from .plan import build_plan
    from .profiling import Profile

    profile = Profile.load(args.profile) if args.profile else None
    policy = args.policy or "topk"
    calib_batches = None
    if policy in ("top_p", "naee_skip"):
        if model is None or not args.calib:
            raise CLIError(f"--policy {policy} calibrates its thresholds: give --model and --calib")
        calib_batches = _text_batches(args, args.calib, model, tokenizer)
    if args.allocation in ("alloc_l", "lexi") and profile is None:
        raise CLIError(f"--allocation {args.allocation} needs --profile (from `allocmoe profile "
                       f"--method {args.allocation}`)")
    return build_plan(info, args.budget, args.allocation, policy, args.k_base, profile, model, calib_batches,
                      exact_budget=args.exact_budget,
                      notes=f"--budget {args.budget} --allocation {args.allocation} --policy {policy}")


def cmd_plan(args) -> int:
    from . import integration
    from .profiling import Profile

    model = tokenizer = None
    if args.model:
        model, tokenizer = _patched_model(args)
        info = integration.model_info(model)
    elif args.profile:
        info = Profile.load(args.profile).model
    else:
        raise CLIError("plan needs --model or --profile (to know the model's layers and top_k)")
    plan = _plan_from_args(args, info, model, tokenizer)
    plan.save(args.out)
    print(plan.summary())
    if plan.policies[0].threshold is not None:
        print("thresholds: " + " ".join(f"{p.threshold:.4g}" for p in plan.policies))
    print(f"wrote {args.out}")
    return 0


def cmd_eval(args) -> int:
    from . import integration
    from .plan import Plan
    from .profiling import evaluate_lm

    model, tokenizer = _patched_model(args)
    info = integration.model_info(model)
    if args.plan:
        if args.policy or args.budget is not None:
            raise CLIError("give either --plan or --policy/--budget, not both")
        plan = Plan.load(args.plan)
    elif args.policy or args.budget is not None:
        plan = _plan_from_args(args, info, model, tokenizer)
    else:
        plan = None  # the model's own routing, full budget
    integration.apply(model, plan)  # a plan for another model is refused here
    batches = _text_batches(args, args.eval, model, tokenizer)
    integration.reset_stats(model)
    t0 = time.perf_counter()
    result = evaluate_lm(model, batches)
    elapsed = time.perf_counter() - t0
    realised = integration.activation_stats(model)
    planned = plan.layer_budgets if plan is not None else [float(info["top_k"])] * info["num_moe_layers"]
    kinds = [p.kind for p in plan.policies] if plan is not None else ["topk"] * info["num_moe_layers"]
    label = plan.summary() if plan is not None else f"full budget (top_k={info['top_k']} in every layer)"
    print(f"eval {args.model} on {args.eval}: {result['tokens']} predicted tokens, {elapsed:.1f} s")
    print(label)
    print(f"perplexity {result['perplexity']:.4f}  nll {result['nll']:.4f}  accuracy {result['accuracy']:.4f}")
    print("layer  policy     planned K_l  realised")
    for i, (kind, k, r) in enumerate(zip(kinds, planned, realised)):
        print(f"{i:>5}  {kind:<9} {k:>11.3f} {r:>9.3f}")
    print(f"total  {'':<9} {sum(planned):>11.3f} {sum(realised):>9.3f}  (B, of full {info['full_budget']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(result, model=args.model, eval=args.eval, planned=planned, realised=realised,
                           realised_budget=sum(realised), plan=plan.to_dict() if plan else None), f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _bench_script() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.getcwd(), os.path.normpath(os.path.join(here, "..", ".."))):
        path = os.path.join(root, "bench", "bench_layer.py")
        if os.path.isfile(path):
            return path
    return None


def cmd_bench(argv: list[str]) -> int:
    """Pass-through to the layer benchmark of a repository checkout (bench/bench_layer.py)."""
    path = _bench_script()
    if path is None:
        raise CLIError("bench/bench_layer.py not found: run `allocmoe bench` from a checkout of the repository")
    spec = importlib.util.spec_from_file_location("allocmoe_bench_layer", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(path))  # the benchmark imports its sibling modules
    sys.modules[spec.name] = module  # dataclasses in the script look their module up here
    try:
        spec.loader.exec_module(module)
        rc = module.main(argv)
    finally:
        sys.path.remove(os.path.dirname(path))
        sys.modules.pop(spec.name, None)
    return int(rc or 0)


# ----------------------------------------------------------------------------- parser

def _add_model_args(p, required=True):
    p.add_argument("--model", required=required, help="tiny:<arch> or a local transformers checkpoint directory")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of a tiny:<arch> model")
    p.add_argument("--seed", type=int, default=0, help="seed of a tiny:<arch> model's random weights")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    p.add_argument("--max-tokens", type=int, default=32768, help="use at most this many tokens of a text file")


def _add_plan_args(p):
    from .allocation import ALLOCATIONS
    from .policies import POLICY_KINDS

    p.add_argument("--budget", type=float, default=None,
                   help="global budget B = sum over MoE layers of K_l (default: full, L*top_k)")
    p.add_argument("--allocation", default="uniform", choices=ALLOCATIONS, help="how B is split over layers")
    p.add_argument("--policy", default=None, choices=POLICY_KINDS, help="token policy of every layer (default topk)")
    p.add_argument("--exact-budget", action="store_true",
                   help="alloc_l spends exactly B (default: at most B, as the DP is stated)")
    p.add_argument("--k-base", type=int, default=1, help="experts every token keeps under alloc_t")
    p.add_argument("--profile", default=None, help="profile file (from `allocmoe profile`) for alloc_l / lexi")
    p.add_argument("--calib", default=None, help="calibration text file (threshold policies)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="allocmoe", description="Budget-aware expert allocation (Alloc-MoE).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="measure a layer sensitivity profile (resumable)")
    _add_model_args(p)
    p.add_argument("--calib", required=True, help="calibration text file")
    p.add_argument("--method", default="alloc_l", choices=["alloc_l", "lexi"])
    p.add_argument("--out", required=True, help="profile file (JSON); an unfinished one is resumed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("plan", help="allocate a budget over layers and write a plan file")
    _add_model_args(p, required=False)
    _add_plan_args(p)
    p.add_argument("--out", required=True, help="plan file (JSON)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("eval", help="perplexity and realised activations under a plan or policy")
    _add_model_args(p)
    _add_plan_args(p)
    p.add_argument("--eval", required=True, help="evaluation text file")
    p.add_argument("--plan", default=None, help="plan file (JSON)")
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    p.set_defaults(func=cmd_eval)

    sub.add_parser("bench", help="the MoE layer benchmark (bench/bench_layer.py; its own arguments follow)",
                   add_help=False)

    if importlib.util.find_spec(f"{__package__}.demo") is not None:
        demo = importlib.import_module(f"{__package__}.demo")
        register = getattr(demo, "register_cli", None)
        if register is not None:
            register(sub)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark
            return cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (CLIError, ValueError, FileNotFoundError) as e:
        print(f"allocmoe: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
