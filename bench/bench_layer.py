"""One MoE layer, our ops against the floors and the baselines a user would otherwise run.

    python bench/bench_layer.py                 # full grid (CUDA), under 8 minutes on an H100
    python bench/bench_layer.py --shapes dsv2 --tokens 1,4 --only ours,route
    python bench/bench_layer.py --quick         # tiny shapes, runs on the CPU in seconds

Per row (shape, shared experts or not, T tokens, budget) it times:
  ours        torch.ops.allocmoe.route + torch.ops.allocmoe.experts (routing included)
  fused       torch.ops.allocmoe.moe from the router weight (see call_fused_moe)
  moe_logits  torch.ops.allocmoe.moe from the router logits (routing included, as in ours)
  route       torch.ops.allocmoe.route alone (Alloc-T, k_base=1)
  topk        the routing baseline: softmax + torch.topk(round(K_l))
              (route and topk are timed alone, and as 32 calls in one CUDA graph: "rt_seq",
              the per-call cost inside a captured step, without the launch and event overhead
              that an empty kernel also shows when timed alone)
  eager_loop  transformers-style eager loop (one_hot mask, per-expert index + matmul)
  grouped_mm  sort by expert, offsets, torch._grouped_mm for both projections
  hf_batched_mm / hf_grouped_mm   transformers.integrations.moe experts forwards
Every baseline runs the routing a user would (softmax + torch.topk) and then its experts
forward on exactly the slots Alloc-T kept (dropped slots are the transformers "sentinel"
expert E with weight 0), so every path does the same expert work and its output can be
checked against one fp32 reference. The router matmul (hidden -> logits) is outside every
timed region except the fused op's, which takes the router weight. Shared experts, when
included, are the model's dense torch MLP in every unfused path.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import sys
import time
import zlib
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import Timer, capture_graph, measure_ceilings  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "bench", "results")
REL_ERR_OK = 1e-2  # bf16 operands against an fp32 reference (issue 4)


@dataclass(frozen=True)
class Shape:
    model: str
    hidden: int
    inter: int  # routed expert intermediate size
    experts: int
    top_k: int
    shared_experts: int  # 0: none
    shared_inter: int  # intermediate size of all shared experts together (a dense MLP of this size)
    shared_gate: bool  # Qwen-style sigmoid gate on the shared expert output


SHAPES = {
    "dsv2": Shape("DeepSeek-V2-Lite", 2048, 1408, 64, 6, 2, 2816, False),
    "qwen": Shape("Qwen1.5-MoE-A2.7B", 2048, 1408, 60, 4, 1, 5632, True),
    "olmoe": Shape("OLMoE-1B-7B", 2048, 1024, 64, 8, 0, 0, False),
}
# --quick: same expert counts and top-k, tiny matrices.
QUICK_SHAPES = {
    "dsv2": Shape("DeepSeek-V2-Lite (tiny)", 128, 64, 64, 6, 2, 128, False),
    "qwen": Shape("Qwen1.5-MoE-A2.7B (tiny)", 128, 64, 60, 4, 1, 256, True),
    "olmoe": Shape("OLMoE-1B-7B (tiny)", 128, 48, 64, 8, 0, 0, False),
}
TOKENS = [1, 4, 16, 64, 256, 1024, 4096]
QUICK_TOKENS = [1, 4]
BUDGETS = {"full": 1.0, "75%": 0.75, "50%": 0.5, "33%": 1.0 / 3.0}  # fractions of top_k
PATHS = ["route", "ours", "moe_logits", "fused", "topk", "eager_loop", "grouped_mm", "hf_batched_mm", "hf_grouped_mm"]
OURS_PATHS = ("ours", "moe_logits", "fused")
ROUTING_PATHS = ("route", "topk")
SEQ_CALLS = 32  # routing paths are also timed as SEQ_CALLS calls in one graph (graph_sequence_us)
BASELINE_PATHS = ("eager_loop", "grouped_mm", "hf_batched_mm", "hf_grouped_mm")


class Skip(Exception):
    """A path that cannot run in this configuration (recorded as skipped, not as an error)."""


class DeviceFault(RuntimeError):
    """The device is in an unusable state (e.g. an illegal memory access): stop the run."""


# ----------------------------------------------------------------------------- the extension
def load_extension():
    """Import allocmoe_ext (as PYTHONPATH / the install says, else from the source tree).

    Returns (error string or None, dict saying which module was loaded and which kernels it has).
    """
    try:
        try:
            import allocmoe_ext  # noqa: F401
        except ImportError:
            sys.path.insert(0, os.path.join(REPO, "python"))
            import allocmoe_ext  # noqa: F401,F811
    except Exception as e:  # the native module may be missing, stale, or built for another torch
        return f"allocmoe_ext not importable: {type(e).__name__}: {str(e).splitlines()[0]}", {}
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    info = {"module": allocmoe_ext.__file__}
    for op in ("route", "experts", "moe"):
        info[op] = [k for k in ("CPU", "CUDA") if hasattr(torch.ops.allocmoe, op) and has(f"allocmoe::{op}", k)]
    return None, info


def call_fused_moe(x, logits, layer, shape, budget, shared, from_logits=False):
    """Return a no-argument callable running torch.ops.allocmoe.moe for this row: from the
    router weight (the router matmul inside the timed region) or, with from_logits, from the
    router logits (the same work as route + experts).

    The ONE place that knows the fused op's schema. It matches the schema's argument names
    against the values below; fix the names here when the schema changes.
    """
    if not hasattr(torch.ops.allocmoe, "moe"):
        raise Skip("torch.ops.allocmoe.moe does not exist in this build")
    op = torch.ops.allocmoe.moe
    names = [a.name for a in op.default._schema.arguments]
    if from_logits and "router_logits" not in names:
        raise Skip(f"moe schema takes no router_logits: {names}")
    values = {
        "hidden": x, "hidden_states": x,
        "router_weight": None if from_logits else layer.router,
        "gate_up": layer.gate_up, "down": layer.down,
        "top_k": shape.top_k, "budget": budget, "k_base": 1,
        "scoring": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.0,
    }
    shared_values = {
        "shared_gate_up": layer.sh_gate_up, "shared_down": layer.sh_down,
        "shared_gate": layer.sh_gate,
    }
    if from_logits:
        values["router_logits"] = logits
    if shared:
        if "shared_gate_up" not in names:
            raise Skip(f"moe schema has no shared-expert arguments: {names}")
        values.update(shared_values)
    kwargs = {}
    for a in op.default._schema.arguments:
        if a.name in values:
            kwargs[a.name] = values[a.name]
        elif not a.has_default_value():
            raise TypeError(f"moe schema needs {a.name!r}; update call_fused_moe in bench/bench_layer.py")

    def run():
        out = op(**kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    return run


# ----------------------------------------------------------------------------- layer and inputs
class Layer:
    """Random bf16 weights of one MoE layer in the transformers layout (gate rows first).

    Shared experts are stored stacked, [S, 2I_s, H] and [S, H, I_s] (the fused op's layout),
    and once more as the one dense MLP of intermediate S*I_s that transformers models hold.
    """

    def __init__(self, shape: Shape, device, seed: int):
        g = torch.Generator(device=device).manual_seed(seed)
        H, I, E = shape.hidden, shape.inter, shape.experts

        def randn(*size, std):
            return (torch.randn(*size, generator=g, device=device) * std).to(torch.bfloat16)

        self.gate_up = randn(E, 2 * I, H, std=H**-0.5)
        self.down = randn(E, H, I, std=I**-0.5)
        self.router = randn(E, H, std=2.0 * H**-0.5)  # logits of std ~2
        S = shape.shared_experts
        self.sh_gate_up = self.sh_down = self.sh_gate = None
        if S:
            Ij = shape.shared_inter // S
            self.sh_gate_up = randn(S, 2 * Ij, H, std=H**-0.5)
            self.sh_down = randn(S, H, Ij, std=shape.shared_inter**-0.5)
            self.sh_gate = randn(H, std=H**-0.5) if shape.shared_gate else None
            # dense MLP: gate rows of every shared expert, then their up rows; down side by side
            self.dense_gate_up = torch.cat([self.sh_gate_up[:, :Ij].reshape(S * Ij, H),
                                            self.sh_gate_up[:, Ij:].reshape(S * Ij, H)])
            self.dense_down = self.sh_down.permute(1, 0, 2).reshape(H, S * Ij).contiguous()

    def logits(self, x):
        """Router logits in fp32, as the models (and the fused op) compute them."""
        return x.float() @ self.router.float().T


def shared_mlp(x, layer):
    """The shared experts as one dense SiLU MLP (2 experts of I == one MLP of 2I)."""
    gate, up = F.linear(x, layer.dense_gate_up).chunk(2, dim=-1)
    y = F.linear(F.silu(gate) * up, layer.dense_down)
    if layer.sh_gate is not None:
        y = y * torch.sigmoid(F.linear(x, layer.sh_gate[None]))
    return y


def alloc_t_torch(logits, top_k, budget, k_base=1):
    """Alloc-T with softmax scoring in plain torch (docs/OPS.md, route): the slots every path uses."""
    T = logits.shape[0]
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = probs.topk(top_k, dim=-1)
    n_total = min(max(math.floor(budget * T + 0.5), k_base * T), top_k * T)
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep[:, :k_base] = True
    extra = n_total - k_base * T
    if extra > 0:
        rest = w[:, k_base:].reshape(-1)
        chosen = rest.topk(extra).indices
        keep_rest = torch.zeros_like(rest, dtype=torch.bool)
        keep_rest[chosen] = True
        keep[:, k_base:] = keep_rest.view(T, top_k - k_base)
    return torch.where(keep, w, 0.0), torch.where(keep, ids, -1).to(torch.int32)


def reference_out(x, w, ids, layer, shared):
    """fp32 reference of the layer (upcast weights, one expert at a time)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    xf = x.float()
    for e in torch.unique(ids[ids >= 0]).tolist():
        tok, slot = torch.where(ids == e)
        gate, up = (xf[tok] @ layer.gate_up[e].float().T).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ layer.down[e].float().T
        out.index_add_(0, tok, y * w[tok, slot, None])
    if shared:
        y = torch.zeros_like(out)
        for j in range(layer.sh_gate_up.shape[0]):  # stacked form: checks the dense copy too
            gate, up = (xf @ layer.sh_gate_up[j].float().T).chunk(2, dim=-1)
            y += (F.silu(gate) * up) @ layer.sh_down[j].float().T
        if layer.sh_gate is not None:
            y = y * torch.sigmoid(xf @ layer.sh_gate.float())[:, None]
        out += y
    return out


def rel_err(out, ref) -> float:
    err = (torch.linalg.vector_norm(out.float() - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30)).item()
    return err if math.isfinite(err) else float("inf")


def dense_slots(w, ids, num_experts):
    """(kept [T, E] bool, weight [T, E] fp32) from slot form; id -1 goes to a dropped column E."""
    T = ids.shape[0]
    col = torch.where(ids >= 0, ids.long(), num_experts)
    kept = torch.zeros(T, num_experts + 1, dtype=torch.bool, device=ids.device).scatter_(1, col, True)
    wd = torch.zeros(T, num_experts + 1, dtype=torch.float32, device=ids.device).scatter_(1, col, w.float())
    return kept[:, :num_experts], wd[:, :num_experts]


def route_check(out, logits, w_ref, ids_ref, k_base=1, tie_tol=1e-6):
    """Is ``out`` = (weights, ids) an Alloc-T result for these logits?

    Same kept (token, expert) pairs as the torch reference, except pairs whose score is within
    ``tie_tol`` of the selection cut-off (fp32 softmax rounding may order near-ties either way);
    same number of kept slots; kept slots a prefix of each row; weights equal to the scores.
    """
    w, ids = out
    if ids.shape != ids_ref.shape or w.shape != w_ref.shape:
        return {"ok": False, "note": f"shapes {tuple(w.shape)}, {tuple(ids.shape)}"}
    E = logits.shape[1]
    ids = ids.to(torch.int32)
    n_t = (ids >= 0).sum(dim=1)
    slot = torch.arange(ids.shape[1], device=ids.device)
    prefix = bool(((ids >= 0) == (slot[None, :] < n_t[:, None])).all())
    in_range = bool((ids < E).all()) and bool((n_t >= k_base).all())
    kept, wd = dense_slots(w, ids, E)
    kept_ref, wd_ref = dense_slots(w_ref, ids_ref, E)
    differ = kept ^ kept_ref
    probs = torch.softmax(logits.float(), dim=-1)
    optional = w_ref[:, k_base:][ids_ref[:, k_base:] >= 0]  # scores of the slots Alloc-T chose
    cutoff = optional.min() if optional.numel() else probs.new_tensor(float("inf"))
    near_tie = bool(((probs[differ] - cutoff).abs() <= tie_tol).all())
    both = kept & kept_ref
    werr = rel_err(wd[both], wd_ref[both]) if bool(both.any()) else 0.0
    same_count = int(n_t.sum()) == int((ids_ref >= 0).sum())
    ok = prefix and in_range and same_count and near_tie and werr < 1e-5
    return {"ok": ok, "pairs_differ": int(differ.sum()), "weights_rel_err": werr,
            "prefix": prefix, "same_count": same_count}


# ----------------------------------------------------------------------------- baselines
class TorchExperts(torch.nn.Module):
    """Experts in the transformers layout; forward is the transformers-style eager loop."""

    def __init__(self, config, gate_up, down):
        super().__init__()
        self.num_experts = gate_up.shape[0]
        self.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
        self.down_proj = torch.nn.Parameter(down, requires_grad=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        # Class E is the "no expert" sentinel: dropped slots land there and are skipped.
        hits = F.one_hot(top_k_index.long(), num_classes=self.num_experts + 1).permute(2, 1, 0)  # [E+1, K, T]
        used = (hits.sum(dim=(1, 2)) > 0).nonzero()
        for e in used[:, 0]:
            if e == self.num_experts:
                continue
            slot, tok = torch.where(hits[e])
            gate, up = F.linear(hidden_states[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self.down_proj[e]) * top_k_weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def make_hf_experts(layer, impl):
    """A tiny experts module the way transformers builds one, dispatching to ``impl``."""
    from transformers.integrations.moe import use_experts_implementation

    class HFExperts(TorchExperts):
        pass

    HFExperts = use_experts_implementation(HFExperts)
    return HFExperts(SimpleNamespace(_experts_implementation=impl), layer.gate_up, layer.down)


def grouped_mm_experts(x, ids_sentinel, w, gate_up, down):
    """Sort slots by expert, offsets by histogram, torch._grouped_mm for both projections."""
    T, K = ids_sentinel.shape
    E = gate_up.shape[0]
    flat = ids_sentinel.reshape(-1)
    e_sorted, order = torch.sort(flat)  # sentinel E sorts to the tail; grouped_mm skips it
    tok = order // K
    # histc (not bincount) keeps the path free of host syncs, so it can be graph-captured.
    counts = torch.histc(e_sorted.float(), bins=E, min=0, max=E - 1)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    gate, up = torch._grouped_mm(x[tok], gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offs)
    # Rows past offs[-1] are left unwritten by grouped_mm: mask them, never multiply them.
    y = torch.where((e_sorted < E)[:, None], y.float() * w.reshape(-1)[order][:, None], 0.0)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tok, y)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- one row
class RowInputs:
    """Input sets for one row, with the Alloc-T slots of each: ``n_sets`` rotated while timing,
    plus one more (index ``check``) used only for the correctness check, so that no freed block
    of an earlier run can hold its right answer."""

    def __init__(self, shape, layer, T, budget, n_sets, device, seed):
        g = torch.Generator(device=device).manual_seed(seed)
        self.x, self.logits, self.w, self.ids = [], [], [], []
        self.w_trim, self.ids_sentinel = [], []
        self.n_sets, self.check = n_sets, n_sets
        for _ in range(n_sets + 1):
            x = torch.randn(T, shape.hidden, generator=g, device=device).to(torch.bfloat16)
            logits = layer.logits(x)
            w, ids = alloc_t_torch(logits, shape.top_k, budget)
            # Kept slots are a prefix of each row: baselines get the columns that hold any.
            kmax = int((ids >= 0).sum(dim=1).max().item())
            w_t, i_t = w[:, :kmax].contiguous(), ids[:, :kmax]
            self.x.append(x)
            self.logits.append(logits)
            self.w.append(w)
            self.ids.append(ids)
            self.w_trim.append(w_t)
            self.ids_sentinel.append(torch.where(i_t >= 0, i_t, shape.experts).long().contiguous())
        self.k_realised = float((self.ids[0] >= 0).sum().item()) / T
        self.touched = sum(float(torch.unique(i[i >= 0]).numel()) for i in self.ids[:n_sets]) / n_sets
        self.has_dropped = any(bool((i == shape.experts).any()) for i in self.ids_sentinel)


def build_paths(ctx, only):
    """name -> (make(set_index) -> no-argument callable, graph-capturable?) or a Skip."""
    shape, layer, inp, budget, shared = ctx.shape, ctx.layer, ctx.inp, ctx.budget, ctx.shared
    E, K = shape.experts, shape.top_k
    gate_up, down = layer.gate_up, layer.down
    k_int = max(1, math.floor(budget + 0.5))
    add_shared = (lambda x, y: y + shared_mlp(x, layer)) if shared else (lambda x, y: y)
    paths = {}
    if ctx.ext_error:
        paths.update({p: Skip(ctx.ext_error) for p in ("route", "ours", "moe_logits", "fused") if p in only})
        only = [p for p in only if p not in paths]

    if "ours" in only:
        def make(s):
            x, lg = inp.x[s], inp.logits[s]

            def run():
                w, ids = torch.ops.allocmoe.route(lg, K, budget, 1)
                return add_shared(x, torch.ops.allocmoe.experts(x, gate_up, down, w, ids))
            return run
        paths["ours"] = (make, True)
    if "fused" in only:
        paths["fused"] = (lambda s: call_fused_moe(inp.x[s], inp.logits[s], layer, shape, budget, shared), True)
    if "moe_logits" in only:
        paths["moe_logits"] = (
            lambda s: call_fused_moe(inp.x[s], inp.logits[s], layer, shape, budget, shared, from_logits=True), True)
    if "route" in only:
        paths["route"] = (lambda s: (lambda lg=inp.logits[s]: torch.ops.allocmoe.route(lg, K, budget, 1)), True)
    if "topk" in only:
        paths["topk"] = (lambda s: (lambda lg=inp.logits[s]: torch.softmax(lg, -1, dtype=torch.float32).topk(k_int)), True)

    def baseline(experts_fn):
        def make(s):
            x, lg, w, ids = inp.x[s], inp.logits[s], inp.w_trim[s], inp.ids_sentinel[s]

            def run():
                torch.softmax(lg, -1, dtype=torch.float32).topk(k_int)  # the routing a user runs
                return add_shared(x, experts_fn(x, ids, w))
            return run
        return make

    if "eager_loop" in only:
        eager = TorchExperts(None, gate_up, down)
        paths["eager_loop"] = (baseline(eager), False)  # host syncs: not capturable
    if "grouped_mm" in only:
        if not hasattr(torch, "_grouped_mm"):
            paths["grouped_mm"] = Skip("torch._grouped_mm not in this torch")
        else:
            paths["grouped_mm"] = (baseline(lambda x, i, w: grouped_mm_experts(x, i, w, gate_up, down)), True)
    for impl in ("batched_mm", "grouped_mm"):
        name = "hf_" + impl
        if name not in only:
            continue
        gathered = inp.ids_sentinel[0].numel() * 3 * shape.hidden * shape.inter * 2
        if impl == "batched_mm" and gathered > ctx.max_gather_bytes:
            paths[name] = Skip(f"batched_mm would gather {gathered / 2**30:.1f} GiB of weights")
            continue
        try:
            mod = make_hf_experts(layer, impl)
        except ImportError as e:
            paths[name] = Skip(f"transformers not importable ({e})")
            continue
        # Dropped slots are transformers' expert-parallel sentinel (id E, weight 0).
        mod._is_expert_parallel = inp.has_dropped
        paths[name] = (baseline(mod), True)
    return paths


def check_device(device):
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except Exception as e:
            raise DeviceFault(f"device unusable after an error: {e}") from e


def measure_path(name, spec, ctx, timer, use_graph, refs):
    """Eager (and graph) timings of one path, each with its correctness on the check set."""
    if isinstance(spec, Skip):
        return {"skipped": str(spec)}
    make, graphable = spec
    flush = name not in ROUTING_PATHS  # routing reads only logits, which a model has just written
    result = {"l2_flush": flush and ctx.device.type == "cuda"}
    try:
        calls = [make(s) for s in range(ctx.inp.n_sets)]
        check_call = make(ctx.inp.check)
        out = check_call()
        result["eager"] = check_output(name, out, refs)
        poison(out)
        del out
        result["eager"].update(timer.median_us(calls, flush_l2=flush))
    except Skip as e:
        return {"skipped": str(e)}
    except Exception as e:
        check_device(ctx.device)
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    if use_graph and graphable:
        graphs = []
        try:
            for c in calls + [check_call]:
                graphs.append(capture_graph(c))
            check_graph, check_out = graphs.pop()
            poison(check_out)  # capture does not run the kernels: the buffer holds whatever was there
            check_graph.replay()
            result["graph"] = check_output(name, check_out, refs)
            poison(check_out)
            del check_graph, check_out
            result["graph"].update(timer.median_us([g.replay for g, _ in graphs], flush_l2=flush))
        except Exception as e:
            check_device(ctx.device)
            result["graph"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        del graphs
        if name in ROUTING_PATHS and result["graph"].get("ok"):
            result["graph_seq"] = graph_sequence_us(calls, timer)
    return result


def graph_sequence_us(calls, timer, n=SEQ_CALLS):
    """Per call of n calls (rotating inputs) captured in ONE graph: what a small kernel costs
    inside a captured decode step, without the ~3 us that events around a single launch add
    (an empty kernel times ~2.9 us alone, ~0.9 us a call in such a graph on an H100)."""
    try:
        graph, _ = capture_graph(lambda: [calls[i % len(calls)]() for i in range(n)])
        t = timer.median_us([graph.replay], flush_l2=False)
        del graph
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    return {"median_us": t["median_us"] / n, "p10_us": t["p10_us"] / n, "p90_us": t["p90_us"] / n,
            "runs": t["runs"], "calls_per_graph": n}


def poison(out):
    """Overwrite a checked output, so that a later kernel that leaves its output unwritten and
    is handed this block by the allocator cannot pass for right (NaN never passes)."""
    for t in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(t, torch.Tensor):
            t.fill_(float("nan") if t.is_floating_point() else -7)


def check_output(name, out, refs):
    """Correctness of one path's output on the check set.

    Layer outputs: rel err against the fp32 reference on the slots the path used (ours: the
    slots our route chose, which must themselves pass route_check; baselines: torch Alloc-T).
    """
    if name == "route":
        return route_check(out, refs.logits, refs.w, refs.ids)
    if name == "topk":
        return {}
    ref = refs.ours if name in OURS_PATHS else refs.torch
    if out.shape != ref.shape:
        return {"rel_err": float("inf"), "ok": False, "note": f"output shape {tuple(out.shape)}"}
    err = rel_err(out, ref)
    res = {"rel_err": err, "ok": err < REL_ERR_OK}
    if name in OURS_PATHS:
        res["ok"] = res["ok"] and refs.route_ok
        res["route_ok"] = refs.route_ok
    return res


def references(ctx):
    """fp32 layer references on the check set: on the torch Alloc-T slots and on our route's slots."""
    inp = ctx.inp
    c = inp.check
    x, logits = inp.x[c], inp.logits[c]
    refs = SimpleNamespace(logits=logits, w=inp.w[c], ids=inp.ids[c], route_ok=False,
                           torch=reference_out(x, inp.w[c], inp.ids[c], ctx.layer, ctx.shared))
    refs.ours = refs.torch
    try:
        ours_route = torch.ops.allocmoe.route(logits, ctx.shape.top_k, ctx.budget, 1)
        refs.route_ok = route_check(ours_route, logits, refs.w, refs.ids)["ok"]
        if refs.route_ok:
            refs.ours = reference_out(x, ours_route[0], ours_route[1].to(torch.int32), ctx.layer, ctx.shared)
        poison(ours_route)
    except Exception:
        check_device(ctx.device)  # the route path itself records the error
    return refs


def best_time(res, require_ok):
    """Fastest of a path's eager/graph timings (only correct ones when require_ok)."""
    best = None
    for mode in ("eager", "graph"):
        m = res.get(mode, {})
        if "median_us" in m and (m.get("ok", False) or not require_ok):
            if best is None or m["median_us"] < best[0]:
                best = (m["median_us"], mode)
    return best


def run_row(ctx, timer, args, ceil):
    shape, T = ctx.shape, ctx.T
    inp = ctx.inp
    H, I = shape.hidden, shape.inter
    expert_bytes = 3 * H * I * 2
    shared_bytes = (3 * H * shape.shared_inter + (H if shape.shared_gate else 0)) * 2 if ctx.shared else 0
    bw_floor = (inp.touched * expert_bytes + shared_bytes) / ceil["copy_bw_Bps"] * 1e6
    bw_floor_read = (inp.touched * expert_bytes + shared_bytes) / ceil["read_bw_Bps"] * 1e6
    flops = 6 * T * inp.k_realised * H * I + (6 * T * H * shape.shared_inter if ctx.shared else 0)
    mm_floor = flops / ceil["matmul_flops"] * 1e6
    floor = max(bw_floor, mm_floor)

    refs = references(ctx)
    row = {
        "shape": ctx.shape_key, "model": shape.model, "shared": ctx.shared, "T": T,
        "budget_label": ctx.budget_label, "budget": ctx.budget, "k_realised": inp.k_realised,
        "topk_baseline_k": max(1, math.floor(ctx.budget + 0.5)),
        "experts_touched": inp.touched, "bytes_floor": inp.touched * expert_bytes + shared_bytes,
        "bw_floor_us": bw_floor, "bw_floor_read_us": bw_floor_read, "mm_floor_us": mm_floor, "floor_us": floor,
        "route_ok": refs.route_ok,
        "paths": {},
    }
    for name, spec in build_paths(ctx, args.only).items():
        row["paths"][name] = measure_path(name, spec, ctx, timer, args.graph, refs)

    ours = [(b[0], f"{p}/{b[1]}") for p in OURS_PATHS if (b := best_time(row["paths"].get(p, {}), True))]
    wrong = [p + "/" + m for p in OURS_PATHS for m in ("eager", "graph")
             if row["paths"].get(p, {}).get(m, {}).get("ok") is False]
    row["ours_wrong"] = wrong  # a fast-but-wrong kernel is listed here and never counted as "ours"
    if ours:
        t, where = min(ours)
        row["ours_us"], row["ours_path"], row["pct_of_floor"] = t, where, 100.0 * floor / t
        row["ratio_vs"] = {}
        for b in BASELINE_PATHS:
            bt = best_time(row["paths"].get(b, {}), False)
            if bt:
                row["ratio_vs"][b] = bt[0] / t
    return row


# ----------------------------------------------------------------------------- table and output
def fmt(v, spec, width):
    return f"{v:{spec}}".rjust(width) if v is not None else "-".rjust(width)


BASELINE_COLS = ("loop us(x)", "gmm us(x)", "hf_bmm us(x)", "hf_gmm us(x)")


def baseline_cell(res, ratio):
    """A baseline's best time and, when ours ran correctly, its ratio to ours."""
    bt = best_time(res, False)
    if bt is None:
        return "-".rjust(14)
    return (f"{bt[0]:.1f}" + (f"({ratio:.2f}x)" if ratio else "")).rjust(14)


def table(rows):
    head = (f"{'shape':6} {'sh':2} {'T':>5} {'bud':>4} {'k':>5} {'touch':>5} {'bw_fl':>7} {'mm_fl':>7} "
            f"{'ours':>8} {'how':16} {'%fl':>4} {'route':>6} {'rt_seq':>6} {'topk':>6} "
            + " ".join(f"{b:>14}" for b in BASELINE_COLS) + f" {'err':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['shape']:6} {'y' if r['shared'] else 'n':2} {r['T']:>5} {r['budget_label']:>4}  skipped: {r['skipped']}")
            continue
        p = r["paths"]
        rt = best_time(p.get("route", {}), False)
        tk = best_time(p.get("topk", {}), False)
        ratios = r.get("ratio_vs", {})
        errs = [p[n][m]["rel_err"] for n in OURS_PATHS for m in ("eager", "graph") if "rel_err" in p.get(n, {}).get(m, {})]
        how = r.get("ours_path", "WRONG" if r["ours_wrong"] else "n/a") + ("!" if r["ours_wrong"] and "ours_path" in r else "")
        lines.append(
            f"{r['shape']:6} {'y' if r['shared'] else 'n':2} {r['T']:>5} {r['budget_label']:>4} {r['k_realised']:>5.2f} "
            f"{r['experts_touched']:>5.1f} {r['bw_floor_us']:>7.1f} {r['mm_floor_us']:>7.1f} "
            f"{fmt(r.get('ours_us'), '.1f', 8)} {how:16} {fmt(r.get('pct_of_floor'), '.0f', 4)} "
            f"{fmt(rt and rt[0], '.1f', 6)} {fmt(p.get('route', {}).get('graph_seq', {}).get('median_us'), '.1f', 6)} "
            f"{fmt(tk and tk[0], '.1f', 6)} "
            + " ".join(baseline_cell(p.get(b, {}), ratios.get(b)) for b in BASELINE_PATHS)
            + f" {fmt(max(errs) if errs else None, '.1e', 7)}"
        )
    lines.append("ours/how: best correct path of ours (route+experts), moe_logits and fused, eager or graph; WRONG: none passed, "
                 "!: another failed (rows' ours_wrong); baselines: best time us (baseline / ours)")
    return "\n".join(lines)


def bars_summary(rows):
    """The issue-4 bars (DeepSeek-V2-Lite, routed only): measured time / floor."""
    by = {(r["T"], r["budget_label"]): r for r in rows
          if r["shape"] == "dsv2" and not r["shared"] and "skipped" not in r}
    out = []

    def x_floor(r):
        return r["ours_us"] / r["bw_floor_us"] if r and "ours_us" in r else None

    for label, key, bar in (("T=1 full", (1, "full"), 1.15), ("T=1 50%", (1, "50%"), 1.25)):
        r = by.get(key)
        v = x_floor(r)
        vr = r["ours_us"] / r["bw_floor_read_us"] if r and "ours_us" in r else None
        out.append(f"  {label}: ours/bw_floor = {fmt(v, '.2f', 5)} (bar <= {bar}); "
                   f"ours/read floor = {fmt(vr, '.2f', 5)}")
    mid = [by.get((t, "full")) for t in (4, 16, 64, 256)]
    mid = [r["ours_us"] / r["floor_us"] for r in mid if r and "ours_us" in r]
    out.append(f"  T=4..256 full: worst ours/floor = {fmt(max(mid) if mid else None, '.2f', 5)} (bar <= 1.10); "
               f"by T: {', '.join(f'{v:.3f}' for v in mid)}")
    full, half = by.get((1, "full")), by.get((1, "50%"))
    if full and half and "ours_us" in full and "ours_us" in half:
        out.append(f"  T=1 speedup full -> 50%: {full['ours_us'] / half['ours_us']:.2f}x (bar >= 1.8)")
    routes = [best_time(r["paths"].get("route", {}), True) for (t, _), r in by.items() if t <= 64]
    routes = [v[0] for v in routes if v]
    seq = [r["paths"].get("route", {}).get("graph_seq", {}).get("median_us") for (t, _), r in by.items() if t <= 64]
    seq = [v for v in seq if v is not None]
    out.append(f"  route alone, T<=64: worst {fmt(max(routes) if routes else None, '.1f', 5)} us a call timed alone "
               f"(bar <= 4), {fmt(max(seq) if seq else None, '.1f', 5)} us a call in a graph of {SEQ_CALLS}")
    return "\n".join(out)


def ceilings_line(ceil):
    return (f"copy {ceil['copy_bw_Bps'] / 1e9:.0f} GB/s (read+write), read {ceil['read_bw_Bps'] / 1e9:.0f} GB/s, "
            f"bf16 matmul {ceil['matmul_flops'] / 1e12:.1f} TFLOP/s (n={ceil['matmul_n']})")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} ({os.cpu_count()} threads)"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few tokens and reps (CPU smoke test)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    ap.add_argument("--tokens", default=None, help="comma list of T (default 1,4,...,4096; quick: 1,4)")
    ap.add_argument("--budgets", default=",".join(BUDGETS), help=f"comma list of {list(BUDGETS)}".replace("%", "%%"))
    ap.add_argument("--shared", default="both", choices=["no", "yes", "both"], help="routed only, with shared experts, or both")
    ap.add_argument("--only", default=",".join(PATHS), help=f"comma list of paths to time: {PATHS}")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default 40; quick: 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 5; quick: 1)")
    ap.add_argument("--sets", type=int, default=4, help="input sets rotated while timing")
    ap.add_argument("--no-graph", dest="graph", action="store_false", help="skip CUDA-graph timings")
    ap.add_argument("--time-limit", type=float, default=420.0, help="seconds; rows left when it runs out are skipped")
    ap.add_argument("--max-gather-gb", type=float, default=4.0, help="skip hf_batched_mm when it would gather more weight bytes")
    ap.add_argument("--out", default=RESULTS_DIR, help="directory for the JSON (and .md table)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    def split(s, allowed, what):
        items = [v.strip() for v in s.split(",") if v.strip()]
        bad = [v for v in items if v not in allowed]
        if bad or not items:
            ap.error(f"--{what}: unknown {bad or items}; choose from {list(allowed)}")
        return items

    args.shapes = split(args.shapes, SHAPES, "shapes")
    args.budgets = split(args.budgets, BUDGETS, "budgets")
    args.only = split(args.only, PATHS, "only")
    try:
        args.tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else (QUICK_TOKENS if args.quick else TOKENS)
    except ValueError:
        ap.error(f"--tokens: expected a comma list of integers, got {args.tokens!r}")
    if any(t < 1 for t in args.tokens):
        ap.error("--tokens: every T must be >= 1")
    args.reps = args.reps if args.reps is not None else (3 if args.quick else 40)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    if args.reps < 1 or args.warmup < 0 or args.sets < 1:
        ap.error("--reps must be >= 1, --warmup >= 0, --sets >= 1")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device available")
    args.graph = args.graph and args.device.type == "cuda"
    return args


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = args.device
    ext_error, ext_info = load_extension()
    args.ext_error = ext_error
    print(f"allocmoe_ext: {ext_info}", file=sys.stderr)
    if os.environ.get("ALLOCMOE_VALIDATE", "0") not in ("", "0"):
        print("warning: ALLOCMOE_VALIDATE is on; its host syncs are in the timings", file=sys.stderr)
    if ext_error:
        print(ext_error, file=sys.stderr)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny CPU shapes: thread barriers on a busy machine cost more than they save
    timer = Timer(device, args.reps, args.warmup)
    with torch.no_grad():
        ceil = measure_ceilings(timer, args.quick)
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    result = {
        "bench": "bench_layer", "argv": sys.argv[1:] if argv is None else list(argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device), "torch": torch.__version__, "transformers": tf_version,
        "cuda": torch.version.cuda, "extension_error": ext_error, "extension": ext_info,
        "has_fused_moe": (not ext_error) and hasattr(torch.ops.allocmoe, "moe"),
        "env": {k: v for k, v in os.environ.items() if k.startswith("ALLOCMOE_")},
        "ceilings": ceil, "timing": {"reps": args.reps, "warmup": args.warmup, "input_sets": args.sets,
                                     "graph": args.graph,
                                     "l2_flush": "before every CUDA run, except route/topk (a sleep kernel instead)"},
        "rows": [],
    }
    print(f"device {result['device']}, torch {torch.__version__}: {ceilings_line(ceil)}", file=sys.stderr, flush=True)

    try:
        with torch.no_grad():
            run_grid(args, shapes, timer, ceil, result, t_start)
    except DeviceFault as e:
        result["fatal"] = str(e)
        print(f"FATAL: {e}", file=sys.stderr)
    finally:
        result["wall_s"] = time.perf_counter() - t_start
        path = write_results(result, args.out)
    print(table(result["rows"]))
    print(f"\nBars (issue 4, dsv2 routed-only):\n{bars_summary(result['rows'])}")
    if ext_error:
        print(f"\nWARNING: no ours/fused/route timings: {ext_error}")
    print(f"allocmoe_ext: {ext_info}")
    print(f"\n{result['device']}: {ceilings_line(ceil)}; "
          f"ratios are baseline time / ours; {result['wall_s']:.0f} s; wrote {path}")
    return 1 if "fatal" in result else 0


def run_grid(args, shapes, timer, ceil, result, t_start):
    for shape_key in args.shapes:
        shape = shapes[shape_key]
        layer = Layer(shape, args.device, args.seed)
        variants = [False, True] if args.shared == "both" else [args.shared == "yes"]
        variants = [v for v in variants if not v or shape.shared_inter]
        for shared in variants:
            for T in args.tokens:
                for label in args.budgets:
                    budget = BUDGETS[label] * shape.top_k
                    key = {"shape": shape_key, "model": shape.model, "shared": shared, "T": T,
                           "budget_label": label, "budget": budget}
                    if time.perf_counter() - t_start > args.time_limit:
                        result["rows"].append({**key, "skipped": f"time limit {args.time_limit:.0f} s"})
                        continue
                    inp = RowInputs(shape, layer, T, budget, args.sets, args.device,
                                    seed=zlib.crc32(f"{args.seed}/{shape_key}/{T}/{label}".encode()))
                    ctx = SimpleNamespace(shape_key=shape_key, shape=shape, layer=layer, T=T, budget=budget,
                                          budget_label=label, shared=shared, inp=inp, device=args.device,
                                          max_gather_bytes=args.max_gather_gb * 2**30, ext_error=args.ext_error)
                    row = run_row(ctx, timer, args, ceil)
                    result["rows"].append(row)
                    print(f"{shape_key} shared={int(shared)} T={T} {label}: ours {row.get('ours_us', float('nan')):.1f} us "
                          f"({row.get('ours_path', 'n/a')}), floor {row['floor_us']:.1f} us", file=sys.stderr, flush=True)
                    del inp, ctx
        del layer
        if args.device.type == "cuda":
            torch.cuda.empty_cache()


def finite(obj):
    """JSON has no inf/NaN: a non-finite float (e.g. the rel err of a NaN output) becomes null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_results(result, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    path = os.path.join(out_dir, f"layer_{slug}_{stamp}.json")
    with open(path, "w") as f:
        json.dump(finite(result), f, indent=1, allow_nan=False)
    with open(path[:-5] + ".md", "w") as f:
        f.write(f"{result['device']}, torch {result['torch']}, {result['date']}\n\n```\n{table(result['rows'])}\n```\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
