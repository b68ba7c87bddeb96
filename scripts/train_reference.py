#!/usr/bin/env python3
"""Train the reference MoE shipped with allocmoe_ext (python/allocmoe_ext/reference_model/).

A transformers DeepseekV2ForCausalLM with fine-grained experts (64 routed, top-6, 2 shared, the
DeepSeek-V2-Lite layout at a small width), byte-level, trained on the Python sources of the
installed site-packages (see allocmoe_ext/data.py). One H100, a few minutes:

    PYTHONUNBUFFERED=1 python scripts/train_reference.py --out /tmp/ref --time-budget 390

The number of optimizer steps is either given (``--steps``, exactly repeatable with the same
seed and data) or derived from ``--time-budget`` after timing the first steps (the chosen count
is logged, so a rerun with ``--steps N`` repeats it). A wall-clock guard stops training and
saves if the run is slower than predicted.

Outputs in ``--out``: config.json + model.safetensors (bf16, save_pretrained format) and
training_log.json (the curve: loss, aux loss, lr, held-out bits per byte; final per-layer
routing statistics; data summary; timings).

A CPU smoke test: ``python scripts/train_reference.py --out /tmp/ref_tiny --tiny --steps 5``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def load_data_module():
    """Import allocmoe_ext/data.py by path: the package __init__ loads the compiled extension,
    which need not match this Python (the GPU machine runs another version)."""
    path = REPO / "python" / "allocmoe_ext" / "data.py"
    spec = importlib.util.spec_from_file_location("allocmoe_data", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def reference_config(tiny: bool = False):
    """The reference model's architecture. Only long-stable DeepseekV2Config fields are used."""
    from transformers import DeepseekV2Config

    common = dict(
        vocab_size=256,               # byte-level
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,             # plain q projection (DeepSeek-V2-Lite has none either)
        kv_lora_rank=64,              # MLA latent
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_shared_experts=2,
        topk_method="greedy",         # softmax over all experts, top-6, no renormalisation:
        norm_topk_prob=False,         # DeepSeek-V2-Lite's routing
        routed_scaling_factor=1.0,
        first_k_dense_replace=1,      # layer 0 is a dense MLP, as in DeepSeek-V2-Lite
        max_position_embeddings=512,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        use_cache=True,
    )
    if tiny:
        return DeepseekV2Config(hidden_size=32, intermediate_size=64, moe_intermediate_size=8,
                                num_hidden_layers=3, **{**common, "n_routed_experts": 16,
                                                        "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                                                        "qk_rope_head_dim": 8, "v_head_dim": 8})
    # 1 dense + 8 MoE layers; 11.2M parameters, 22.4 MB in bf16.
    return DeepseekV2Config(hidden_size=192, intermediate_size=768, moe_intermediate_size=32,
                            num_hidden_layers=9, **common)


class RouterTap:
    """Forward hooks on every MoE router: keep its input so the load-balancing loss and the
    routing statistics use exactly the logits the model routed with."""

    def __init__(self, model):
        self.inputs: list[torch.Tensor] = []
        self.gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        self.handles = [g.register_forward_hook(self._hook) for g in self.gates]

    def _hook(self, module, args, output):
        self.inputs.append(args[0])

    def logits(self) -> list[torch.Tensor]:
        out = []
        for gate, x in zip(self.gates, self.inputs):
            x = x.reshape(-1, x.shape[-1])
            out.append(F.linear(x.float(), gate.weight.float()))
        return out

    def clear(self):
        self.inputs.clear()


def load_balance_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch/DeepSeek expert-level balance loss, averaged over layers:
    E/K * sum_e f_e * P_e, where f_e is the fraction of top-K slots given to expert e and P_e
    the mean routing probability of e. It is 1 for perfectly uniform routing."""
    losses = []
    for logits in router_logits:
        probs = logits.softmax(dim=-1)
        num_experts = probs.shape[-1]
        top = probs.topk(top_k, dim=-1).indices
        counts = torch.zeros(num_experts, device=probs.device).scatter_add_(
            0, top.reshape(-1), torch.ones(top.numel(), device=probs.device))
        frac = counts / top.numel()
        losses.append(num_experts * (frac * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


@torch.no_grad()
def routing_stats(router_logits: list[torch.Tensor], top_k: int) -> list[dict]:
    """Per MoE layer: normalised entropy of the expert load (1 = all experts equally used),
    experts used, max/mean load, and mean per-token routing entropy (nats)."""
    stats = []
    for logits in router_logits:
        probs = logits.softmax(dim=-1)
        num_experts = probs.shape[-1]
        top = probs.topk(top_k, dim=-1).indices.reshape(-1)
        load = torch.bincount(top, minlength=num_experts).double()
        p = load / load.sum()
        ent = -(p[p > 0] * p[p > 0].log()).sum().item()
        tok_ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean().item()
        stats.append({
            "load_entropy_normalised": ent / math.log(num_experts),
            "experts_used": int((load > 0).sum().item()),
            "max_over_mean_load": float(load.max() / load.mean()),
            "token_routing_entropy_nats": tok_ent,
            "top1_prob_mean": float(probs.max(-1).values.mean()),
        })
    return stats


@torch.no_grad()
def evaluate(model, batches, device, tap=None, top_k=6, autocast=True):
    """Mean next-byte NLL (bits per byte), accuracy; optionally routing stats."""
    model.eval()
    nll, correct, count = 0.0, 0, 0
    all_logits = []
    for batch in batches:
        batch = batch.to(device)
        if tap is not None:
            tap.clear()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=batch).logits
        logits = logits[:, :-1].float()
        target = batch[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                               reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
        if tap is not None:
            all_logits.append(tap.logits())
    model.train()
    out = {"bits_per_byte": nll / count / math.log(2), "accuracy": correct / count,
           "tokens": count}
    if tap is not None:
        per_layer = [torch.cat([step[i] for step in all_logits]) for i in range(len(tap.gates))]
        out["routing"] = routing_stats(per_layer, top_k)
        tap.clear()
    return out


def set_experts_implementation(model, impl: str):
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(impl)
    else:  # older transformers 5.x: the experts read the config field directly
        model.config._experts_implementation = impl


def pick_experts_implementation(model, batch, device, autocast) -> str:
    """transformers' grouped_mm experts path is the fast one on a GPU; if it fails on this
    torch/dtype combination, fall back to the eager per-expert loop (slow but always works)."""
    for impl in ("grouped_mm", "eager"):
        try:
            set_experts_implementation(model, impl)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return impl
        except Exception as e:  # noqa: BLE001 - any failure means "use the next implementation"
            print(f"experts implementation {impl!r} failed: {type(e).__name__}: {e}", flush=True)
            model.zero_grad(set_to_none=True)
    raise RuntimeError("no experts implementation works on this machine")


def lr_at(step: int, total: int, warmup: int, peak: float, floor_frac: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor_frac + (1 - floor_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=None,
                    help="optimizer steps (default: as many as fit in --time-budget)")
    ap.add_argument("--time-budget", type=float, default=390.0,
                    help="seconds of training when --steps is not given; also the guard")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss weight")
    ap.add_argument("--data-bytes", type=int, default=200_000_000, help="training text cap")
    ap.add_argument("--eval-seqs", type=int, default=64, help="held-out sequences per eval")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--tiny", action="store_true", help="tiny config for a CPU smoke test")
    ap.add_argument("--device", default=None)
    ap.add_argument("--shard-mb", type=int, default=None,
                    help="save in shards of at most this many MB (for transfer limits)")
    args = ap.parse_args(argv)

    t_start = time.time()
    from transformers import DeepseekV2ForCausalLM
    import transformers

    data = load_data_module()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast = device.type == "cuda"
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data_bytes = min(args.data_bytes, 2_000_000) if args.tiny else args.data_bytes
    t0 = time.time()
    text, data_summary = data.training_text(data_bytes)
    train_ids = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(device)
    eval_batches = data.evaluation_batches(8 if args.tiny else args.eval_seqs, args.seq_len, 16)
    data_summary["load_seconds"] = round(time.time() - t0, 2)
    print(f"data: {data_summary}", flush=True)

    config = reference_config(args.tiny)
    model = DeepseekV2ForCausalLM(config).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {config.num_hidden_layers} layers "
          f"({config.num_hidden_layers - config.first_k_dense_replace} MoE)", flush=True)
    tap = RouterTap(model)

    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    n_windows = train_ids.numel() - args.seq_len

    def next_batch():
        starts = torch.randint(0, n_windows, (args.batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(args.seq_len)[None, :]
        return train_ids[idx.to(device)].long()

    impl = pick_experts_implementation(model, next_batch(), device, autocast)
    tap.clear()
    print(f"experts implementation: {impl}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=device.type == "cuda")

    total_steps = args.steps
    timing_probe = (5, 25)  # time steps [5, 25) to predict how many fit in the budget
    curve, evals = [], []
    t_train = time.time()
    t_probe = None
    step = 0
    stopped_by_guard = False
    while True:
        if total_steps is not None and step >= total_steps:
            break
        if time.time() - t_train > args.time_budget:
            stopped_by_guard = True
            print(f"wall-clock guard: stopping at step {step}", flush=True)
            break
        if total_steps is None and step == timing_probe[0]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_probe = time.time()
        if total_steps is None and step == timing_probe[1]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t_probe) / (timing_probe[1] - timing_probe[0])
            # Leave room for the periodic evals (about 2% of the time) and the final save.
            remaining = args.time_budget - (time.time() - t_train)
            total_steps = step + int(0.95 * remaining / per_step)
            print(f"{per_step * 1000:.1f} ms/step -> {total_steps} steps", flush=True)

        lr = lr_at(step, total_steps or 10 ** 9, args.warmup, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = next_batch()
        tap.clear()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=batch).logits
        lm_loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                  batch[:, 1:].reshape(-1))
        aux = load_balance_loss(tap.logits(), config.num_experts_per_tok)
        loss = lm_loss + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1

        if step % args.log_every == 0 or step == 1:
            rec = {"step": step, "loss": lm_loss.item(), "bits_per_byte": lm_loss.item() / math.log(2),
                   "aux_loss": aux.item(), "lr": lr, "grad_norm": float(grad_norm),
                   "tokens": step * args.batch_size * args.seq_len,
                   "seconds": round(time.time() - t_train, 2)}
            curve.append(rec)
            print(json.dumps(rec), flush=True)
        if step % args.eval_every == 0:
            ev = evaluate(model, eval_batches, device, autocast=autocast)
            ev.update(step=step, seconds=round(time.time() - t_train, 2))
            evals.append(ev)
            print("eval", json.dumps(ev), flush=True)

    train_seconds = time.time() - t_train
    final = evaluate(model, eval_batches, device, tap=tap, top_k=config.num_experts_per_tok,
                     autocast=autocast)
    final.update(step=step, seconds=round(time.time() - t_train, 2))
    evals.append({k: v for k, v in final.items() if k != "routing"})
    print("final eval", json.dumps({k: v for k, v in final.items() if k != "routing"}), flush=True)
    for i, r in enumerate(final["routing"]):
        print(f"moe layer {i}: " + json.dumps(r), flush=True)

    for h in tap.handles:
        h.remove()
    model = model.to(torch.bfloat16)
    if args.shard_mb:
        model.save_pretrained(out, safe_serialization=True, max_shard_size=f"{args.shard_mb}MB")
    else:
        model.save_pretrained(out, safe_serialization=True)

    log = {
        "args": vars(args),
        "steps": step,
        "stopped_by_wall_clock_guard": stopped_by_guard,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "tokens_seen": step * args.batch_size * args.seq_len,
        "parameters": n_params,
        "experts_implementation": impl,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "data": data_summary,
        "curve": curve,
        "evals": evals,
        "final_eval": final,
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"saved to {out} ({size / 1e6:.1f} MB) in {time.time() - t_start:.0f}s total", flush=True)


if __name__ == "__main__":
    sys.exit(main())
