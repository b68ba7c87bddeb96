"""CUDA `experts` op against the CPU op (docs/OPS.md), on fresh random inputs.

Every path of the CUDA op is run at every shape by forcing it through ALLOCMOE_EXPERTS_PATH
(stream / decode / skinny / prefill / generic / wide; see csrc/cuda/experts.cu), so a shape threshold never
hides a path.
Outputs come from the caching allocator, which is flooded with NaN before each run, so an element
the kernel forgets to write shows up as NaN. Skipped without a GPU or a CUDA build.
"""

from __future__ import annotations

import pytest
import torch

from allocmoe_ext import ops
from cuda_marks import CUDA_ONLY

pytestmark = CUDA_ONLY

PATHS = ("auto", "stream", "decode", "skinny", "prefill", "generic", "wide")
FAST_PATHS = ("stream", "decode", "skinny", "prefill", "wide")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def make_inputs(T, E, K, H, I, dtype, *, seed, skew=False, drop=0.3, gen_layout=False, bias=False):
    """Random layer and routing. Rows hold K distinct experts (as route returns) with a random
    number of trailing -1 slots plus a few -1 holes, so per-token counts vary. skew: every token
    routed to the same experts 0..K-1. gen_layout: GPT-OSS-style transposed views of the weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    if gen_layout:  # parameters stored [E, H, 2I] / [E, I, H]; the op gets transposed views
        gu = (torch.randn(E, H, 2 * I, generator=g) / H**0.5).to(dtype).transpose(1, 2)
        dn = (torch.randn(E, I, H, generator=g) / I**0.5).to(dtype).transpose(1, 2)
    else:
        gu = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
        dn = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    if skew:
        ids = torch.arange(K, dtype=torch.int32).repeat(T, 1)
    else:
        ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K].to(torch.int32)
    w = torch.rand(T, K, generator=g)
    if drop > 0 and T > 0:
        n_keep = torch.randint(max(1, K // 2), K + 1, (T,), generator=g)
        n_keep[torch.arange(T) % 13 == 5] = 0  # a few tokens with no expert at all
        ids[torch.arange(K)[None, :] >= n_keep[:, None]] = -1
        ids[torch.rand(T, K, generator=g) < drop / 4] = -1  # and a few holes
    gub = (torch.randn(E, 2 * I, generator=g) * 0.1).to(dtype) if bias else None
    db = (torch.randn(E, H, generator=g) * 0.1).to(dtype) if bias else None
    return x.to(dtype), gu, dn, w, ids, gub, db


def to_cuda(t):
    if t is None:
        return None
    if t.dim() == 3 and not t.is_contiguous():  # keep the transposed-view layout on the GPU
        return t.transpose(1, 2).contiguous().cuda().transpose(1, 2)
    return t.cuda()


def poison_allocator(numel: int) -> None:
    """Leave NaN in the cached blocks the op's output and scratch will be carved from."""
    for n in (numel, 4 * numel + 4096, 1 << 22):
        torch.full((n,), float("nan"), device="cuda").view(-1)
    torch.cuda.synchronize()


def run_cuda(inputs, activation="silu", path="auto", monkeypatch=None):
    x, gu, dn, w, ids, gub, db = (to_cuda(t) for t in inputs)
    if monkeypatch is not None:
        monkeypatch.setenv("ALLOCMOE_EXPERTS_PATH", path)
    poison_allocator(x.shape[0] * max(x.shape[1], 1))
    out = ops.experts(x, gu, dn, w, ids, gub, db, activation=activation)
    torch.cuda.synchronize()
    return out


def run_cpu(inputs, activation="silu"):
    return ops.experts(*inputs[:5], inputs[5], inputs[6], activation=activation)


def check(inputs, dtype, path, monkeypatch, activation="silu"):
    ref = run_cpu(inputs, activation)
    out = run_cuda(inputs, activation, path, monkeypatch)
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_cuda
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"unwritten (NaN) or non-finite output on path {path}"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"path={path} rel err {err:.3g} >= {TOL[dtype]}"


# (T, E, K): every T of the issue, every E, K from 1 to 8.
SHAPES = [
    (0, 8, 2),
    (1, 8, 1),
    (1, 64, 6),
    (2, 60, 4),
    (3, 128, 8),
    (7, 8, 3),
    (16, 64, 6),
    (64, 60, 5),
    (64, 128, 7),
    (1000, 64, 6),
    (4096, 8, 2),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("T,E,K", SHAPES)
def test_bf16_matches_cpu(T, E, K, path, monkeypatch):
    inputs = make_inputs(T, E, K, 64, 96, torch.bfloat16, seed=T * 1000 + E * 10 + K)
    check(inputs, torch.bfloat16, path, monkeypatch)


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("T,E,K", [(5, 64, 6), (300, 60, 4)])
def test_fp16_matches_cpu(T, E, K, path, monkeypatch):
    inputs = make_inputs(T, E, K, 128, 64, torch.float16, seed=T + E + K)
    check(inputs, torch.float16, path, monkeypatch)


@pytest.mark.parametrize("T,E,K", [(1, 8, 2), (7, 60, 4), (64, 64, 6), (1000, 128, 8)])
def test_fp32_matches_cpu(T, E, K, monkeypatch):
    inputs = make_inputs(T, E, K, 64, 96, torch.float32, seed=T * 7 + E + K)
    check(inputs, torch.float32, "auto", monkeypatch)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("T", [1, 9, 64, 300, 4096])
def test_skewed_routing(T, path, monkeypatch):
    """All tokens on the same experts: one expert gets T pairs (decode takes several passes)."""
    inputs = make_inputs(T, 64, 2, 64, 64, torch.bfloat16, seed=T, skew=True, drop=0.0)
    check(inputs, torch.bfloat16, path, monkeypatch)


@pytest.mark.parametrize("path", FAST_PATHS)
def test_repeated_and_out_of_range_ids(path, monkeypatch):
    """A row may name one expert twice (each slot counts); with validation off, ids >= E or < -1
    are skipped like -1 (never read out of bounds)."""
    x, gu, dn, w, ids, _, _ = make_inputs(12, 16, 4, 64, 64, torch.bfloat16, seed=5, drop=0.0)
    ids[:, 1] = ids[:, 0]
    bad = ids.clone()
    bad[:, 3] = torch.where(torch.arange(12) % 2 == 0, 16, -7).to(torch.int32)
    ok = ids.clone()
    ok[:, 3] = -1
    ref = run_cpu((x, gu, dn, w, ok, None, None))
    out = run_cuda((x, gu, dn, w, bad, None, None), path=path, monkeypatch=monkeypatch)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("T,E,K,H,I", [(40, 16, 4, 1024, 288), (70, 8, 6, 256, 1408), (33, 64, 6, 2048, 64)])
def test_long_reductions(T, E, K, H, I, path, monkeypatch):
    """H and I spanning many k blocks (the skinny path's shared-memory ring wraps several times,
    a last block with fewer than 4 chunks) and partial row tiles (I % 64, H % 128)."""
    inputs = make_inputs(T, E, K, H, I, torch.bfloat16, seed=T + H + I)
    check(inputs, torch.bfloat16, path, monkeypatch)


@pytest.mark.parametrize(
    "T,E,K,H,I,skew",
    [
        (1, 64, 6, 2048, 1408, False),  # DeepSeek-V2-Lite: 4 stages per gate_up item, a 384-wide last down stage
        (2, 60, 4, 2048, 1408, False),
        (7, 64, 8, 1024, 1024, False),
        (16, 64, 6, 2048, 1408, False),  # two n tiles, x of 16 tokens in shared memory
        (16, 8, 8, 256, 96, True),  # 16 pairs on each of 8 experts
        (16, 128, 2, 4096, 64, False),  # x at its largest (16 x 4096): a shallower ring
        (5, 16, 6, 256, 4096, False),  # T*K = 30: act resident in shared memory (5 rows of 4096)
        (6, 16, 6, 256, 4096, False),  # T*K = 36: act rows copied into the stages next to the weights
        (12, 24, 6, 512, 8192, True),  # act in the stages, a wide I (8 stages per down unit)
        # past 16 tokens: x staged per (expert, pass), act in the stages, expert-major down into y + combine
        (17, 64, 6, 2048, 1408, False),
        (33, 60, 4, 1024, 704, False),
        (64, 64, 6, 2048, 1408, False),  # DeepSeek-V2-Lite at T=64
        (64, 8, 8, 256, 96, True),  # 64 pairs on each of 8 experts: 4 passes, x restaged for each
        (64, 512, 8, 256, 64, False),  # T*K = 512 and E = 512, the stream path's limits
    ],
)
def test_stream_decode_shapes(T, E, K, H, I, skew, monkeypatch):
    """The stream path at model shapes: multi-stage items, partial last stages, many items per
    CTA, the ring wrapping many times (several calls reuse nothing: outputs poisoned)."""
    inputs = make_inputs(T, E, K, H, I, torch.bfloat16, seed=T + E + H, skew=skew, drop=0.0 if skew else 0.3)
    check(inputs, torch.bfloat16, "stream", monkeypatch)


@pytest.mark.parametrize("T", [4, 16])
def test_auto_takes_stream_kernels_on_sm90(T, monkeypatch):
    """On sm_90 auto mode at T <= 16 runs the stream kernels (not a silent fallback): the two
    launches (ALLOCMOE_STREAM_LAUNCHES=one is measured slower in the layer bench)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the stream path needs sm_90")
    monkeypatch.delenv("ALLOCMOE_STREAM_LAUNCHES", raising=False)
    inputs = make_inputs(T, 64, 6, 2048, 1408, torch.bfloat16, seed=T)
    ref = run_cpu(inputs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = run_cuda(inputs, path="auto", monkeypatch=monkeypatch)
    names = " ".join(e.name for e in prof.events())
    assert "stream_gate_up_kernel" in names and "stream_down_kernel" in names, names[:2000]
    assert "stream_experts_kernel" not in names, names[:2000]
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize(
    "T,E,K,H,I,skew",
    [(1, 64, 6, 2048, 1408, False), (3, 60, 2, 512, 256, False), (4, 64, 6, 2048, 1408, True),
     (4, 64, 8, 512, 256, False), (7, 64, 6, 1024, 352, False), (16, 64, 6, 1024, 1408, False),
     (17, 60, 6, 512, 704, False), (40, 64, 6, 1024, 704, True), (64, 128, 8, 1024, 512, False)])
def test_stream_one_launch_equals_two_launches(T, E, K, H, I, skew, monkeypatch):
    """The one-launch stream kernel (per-expert readiness counters between the phases) gives the
    two launches' output bit for bit, with act resident or staged, tile-major or expert-major,
    over many calls (the counters are never reset: every call must find them consistent)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the stream path needs sm_90")
    inputs = make_inputs(T, E, K, H, I, torch.bfloat16, seed=3 * T + K, skew=skew, drop=0.0 if skew else 0.3)
    ref = run_cpu(inputs)
    monkeypatch.setenv("ALLOCMOE_STREAM_LAUNCHES", "two")
    two = run_cuda(inputs, path="stream", monkeypatch=monkeypatch)
    monkeypatch.setenv("ALLOCMOE_STREAM_LAUNCHES", "one")
    for _ in range(3):
        one = run_cuda(inputs, path="stream", monkeypatch=monkeypatch)
        assert torch.equal(one, two)
    assert rel_err(one, ref) < 1e-2


def test_stream_one_launch_graph_replay(monkeypatch):
    """The one launch (cooperative and programmatic dependent) captured in a CUDA graph replays
    correctly on new routing, several times in a row."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the stream path needs sm_90")
    monkeypatch.setenv("ALLOCMOE_EXPERTS_PATH", "stream")
    monkeypatch.setenv("ALLOCMOE_STREAM_LAUNCHES", "one")
    check_graph_replay(4, 64, 6, 1024, 512, replays=3)


def test_stream_past_16_tokens_runs_three_launches(monkeypatch):
    """The stream path past 16 tokens (forced) ends with the combine launch (expert-major down)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the stream path needs sm_90")
    inputs = make_inputs(40, 64, 6, 2048, 1408, torch.bfloat16, seed=40)
    ref = run_cpu(inputs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = run_cuda(inputs, path="stream", monkeypatch=monkeypatch)
    names = " ".join(e.name for e in prof.events())
    assert all(k in names for k in ("stream_gate_up_kernel", "stream_down_kernel", "combine_slots_kernel")), names[:2000]
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("T,E,K", [(65, 8, 2), (64, 513, 8), (3, 513, 2)])
def test_stream_path_limits(T, E, K, monkeypatch):
    """At and past the stream path's limits (T > 64; E > 512 with T*K > 320, the counting list
    builder's; E = 513 at T*K = 6 stays on the stream path) a forced stream path computes the
    right result (past them on the decode kernels)."""
    inputs = make_inputs(T, E, K, 256, 64, torch.bfloat16, seed=T + E)
    check(inputs, torch.bfloat16, "stream", monkeypatch)


def test_stream_repeated_ids_take_several_passes(monkeypatch):
    """One expert named by more than 16 slots (a row may repeat an id): several 16-pair passes,
    each re-streaming the item's weights."""
    x, gu, dn, w, ids, _, _ = make_inputs(12, 4, 4, 256, 128, torch.bfloat16, seed=9, drop=0.0)
    ids[:, :3] = 2  # expert 2 gets 36 slots
    ref = run_cpu((x, gu, dn, w, ids, None, None))
    out = run_cuda((x, gu, dn, w, ids, None, None), path="stream", monkeypatch=monkeypatch)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("T,K", [(1, 8), (4, 8), (5, 6), (11, 3)])
def test_stream_lists_on_both_sides_of_one_warp(T, K, monkeypatch):
    """Up to 32 slots every warp of the stream kernels builds the expert lists itself
    (build_stream_lists_warp); from 33 on the whole block does. Both sides of that line, with an
    id repeated in a row, holes, and ids >= E or < -1, which are skipped like -1."""
    x, gu, dn, w, ids, _, _ = make_inputs(T, 60, K, 256, 192, torch.bfloat16, seed=40 + T * K)
    ids[:, 1] = ids[:, 0]
    ok = ids.clone()
    ok[:, K - 1] = -1
    bad = ids.clone()
    bad[:, K - 1] = torch.where(torch.arange(T) % 2 == 0, 60, -7).to(torch.int32)
    ref = run_cpu((x, gu, dn, w, ok, None, None))
    out = run_cuda((x, gu, dn, w, bad, None, None), path="stream", monkeypatch=monkeypatch)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-2


def needs_sm90():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the path needs sm_90")


@pytest.mark.parametrize(
    "T,E,K,H,I,skew,dtype",
    [
        (1, 64, 6, 2048, 1408, False, torch.bfloat16),
        (17, 64, 6, 2048, 1408, False, torch.bfloat16),
        (40, 16, 4, 1024, 320, False, torch.bfloat16),  # down: a last stage of 64 k (zeros past I)
        (64, 60, 5, 1024, 704, False, torch.float16),
        (100, 8, 8, 256, 128, True, torch.bfloat16),  # 100 pairs per expert: 4 tiles, the last partial
        (256, 64, 6, 2048, 1408, False, torch.bfloat16),  # DeepSeek-V2-Lite at T=256
        (300, 128, 7, 512, 192, False, torch.bfloat16),
        (512, 64, 8, 256, 64, False, torch.bfloat16),  # one row block of gate_up, half a stage of down k
    ],
)
def test_wide_shapes(T, E, K, H, I, skew, dtype, monkeypatch):
    """The wide path where it runs (sm_90, I % 64 == 0, H % 128 == 0): its own kernels (not a
    fallback), equal to the CPU op, bitwise the same on a second run."""
    needs_sm90()
    inputs = make_inputs(T, E, K, H, I, dtype, seed=T + E + I, skew=skew, drop=0.0 if skew else 0.3)
    ref = run_cpu(inputs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = run_cuda(inputs, path="wide", monkeypatch=monkeypatch)
    names = " ".join(e.name for e in prof.events())
    assert all(k in names for k in ("prefill_align_kernel", "wide_kernel", "combine_slots_kernel")), names[:2000]
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]
    assert torch.equal(run_cuda(inputs, path="wide", monkeypatch=monkeypatch), out)


def test_wide_graph_replay_and_no_slots(monkeypatch):
    """The wide path captured in a CUDA graph replays on new routing; with every slot dropped it
    writes zeros (no tile at all)."""
    needs_sm90()
    monkeypatch.setenv("ALLOCMOE_EXPERTS_PATH", "wide")
    check_graph_replay(40, 64, 6, 256, 128, replays=2)
    x, gu, dn, w, ids, _, _ = make_inputs(5, 8, 3, 256, 128, torch.bfloat16, seed=1)
    ids[:] = -1
    out = run_cuda((x, gu, dn, w, ids, None, None), path="wide", monkeypatch=monkeypatch)
    assert torch.equal(out.cpu(), torch.zeros(5, 256, dtype=torch.bfloat16))


@pytest.mark.parametrize("T,K,kernel", [(17, 6, "wide_kernel"), (256, 6, "wide_kernel"), (512, 6, "wide_kernel"),
                                         (600, 6, "skinny_gate_up_kernel")])
def test_auto_takes_wide_kernel_past_16_tokens_on_sm90(T, K, kernel, monkeypatch):
    """On sm_90 auto mode past 16 tokens runs the wide kernel up to 48 slots per expert on
    average (T*K <= 48 E), then skinny (not a silent fallback)."""
    needs_sm90()
    inputs = make_inputs(T, 64, K, 2048, 1408, torch.bfloat16, seed=T)
    ref = run_cpu(inputs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = run_cuda(inputs, path="auto", monkeypatch=monkeypatch)
    names = " ".join(e.name for e in prof.events())
    assert kernel in names, names[:2000]
    assert rel_err(out, ref) < 1e-2


def test_auto_path_choice(monkeypatch):
    """Auto mode equals every forced fast path at the sizes where it switches (T=16/17, the wide
    limit of 48 slots per expert on average where wide fits (H=128, I=64), and the skinny limit of
    64: T*K = 64*E)."""
    for T, E, K, H, I in ((16, 16, 4, 64, 96), (17, 16, 4, 64, 96), (192, 16, 4, 128, 64), (193, 16, 4, 128, 64),
                          (256, 16, 4, 64, 96), (257, 16, 4, 64, 96)):
        inputs = make_inputs(T, E, K, H, I, torch.bfloat16, seed=T)
        ref = run_cpu(inputs)
        outs = {p: run_cuda(inputs, path=p, monkeypatch=monkeypatch) for p in ("auto",) + FAST_PATHS}
        for p, o in outs.items():
            assert torch.isfinite(o).all() and rel_err(o, ref) < 1e-2, (T, p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T", [1, 5, 300])
def test_gpt_oss_swiglu_bias_transposed(T, dtype, monkeypatch):
    """GPT-OSS: swiglu_oai (interleaved gate/up, clamped), biases, transposed weight views."""
    inputs = make_inputs(T, 8, 4, 64, 48, dtype, seed=T, gen_layout=True, bias=True)
    check(inputs, dtype, "auto", monkeypatch, activation="swiglu_oai")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_odd_sizes_take_generic_path(dtype, monkeypatch):
    """H and I not multiples of 32: the fast paths must hand over to the generic kernel."""
    inputs = make_inputs(9, 8, 3, 40, 24, dtype, seed=3)
    for path in ("decode", "prefill"):
        check(inputs, dtype, path, monkeypatch)


def test_all_slots_dropped_gives_zeros(monkeypatch):
    x, gu, dn, w, ids, _, _ = make_inputs(5, 8, 3, 64, 64, torch.bfloat16, seed=1)
    ids[:] = -1
    for path in PATHS:
        out = run_cuda((x, gu, dn, w, ids, None, None), path=path, monkeypatch=monkeypatch)
        assert torch.equal(out.cpu(), torch.zeros(5, 64, dtype=torch.bfloat16)), path


@pytest.mark.parametrize("path", PATHS)
def test_run_to_run_deterministic(path, monkeypatch):
    inputs = make_inputs(200, 64, 6, 128, 96, torch.bfloat16, seed=11)
    a = run_cuda(inputs, path=path, monkeypatch=monkeypatch)
    b = run_cuda(inputs, path=path, monkeypatch=monkeypatch)
    assert torch.equal(a, b)


def check_graph_replay(T, E, K, H, I, replays=1):
    """Captured once, replayed on new routing and activations written into the same buffers."""
    x, gu, dn, w, ids = [to_cuda(t) for t in make_inputs(T, E, K, H, I, torch.bfloat16, seed=1)[:5]]
    ops.experts(x, gu, dn, w, ids)  # warm-up outside capture (kernel attributes, allocator)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.experts(x, gu, dn, w, ids)
    for seed in (2, 3):
        nx, _, _, nw, nids, _, _ = make_inputs(T, E, K, H, I, torch.bfloat16, seed=seed)
        x.copy_(nx.cuda())
        w.copy_(nw.cuda())
        ids.copy_(nids.cuda())
        out.fill_(float("nan"))
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
        ref = run_cpu((nx, gu.cpu(), dn.cpu(), nw, nids, None, None))
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("path", FAST_PATHS)
def test_cuda_graph_capture_and_replay(path, monkeypatch):
    monkeypatch.setenv("ALLOCMOE_EXPERTS_PATH", path)
    check_graph_replay(24, 64, 6, 64, 96)


@pytest.mark.parametrize("T", [3, 300])
def test_opcheck(T):
    x, gu, dn, w, ids, _, _ = (to_cuda(t) for t in make_inputs(T, 8, 2, 64, 32, torch.bfloat16, seed=T))
    torch.library.opcheck(torch.ops.allocmoe.experts.default, (x, gu, dn, w, ids))


def test_errors_name_the_argument():
    x, gu, dn, w, ids, _, _ = (to_cuda(t) for t in make_inputs(4, 8, 2, 64, 32, torch.bfloat16, seed=0))
    with pytest.raises(RuntimeError, match="down"):
        torch.ops.allocmoe.experts(x, gu, dn.float(), w, ids)
    with pytest.raises(RuntimeError, match="weights"):
        torch.ops.allocmoe.experts(x, gu, dn, w.half(), ids)
    with pytest.raises(RuntimeError, match="ids"):
        torch.ops.allocmoe.experts(x, gu, dn, w, ids.long())
    with pytest.raises(RuntimeError, match="activation"):
        torch.ops.allocmoe.experts(x, gu, dn, w, ids, activation="gelu")
    with pytest.raises(RuntimeError, match="weights"):
        torch.ops.allocmoe.experts(x, gu, dn, w.cpu(), ids)


VALIDATION_SCRIPT = '''
import torch
from allocmoe_ext import ops
x = torch.randn(4, 64).bfloat16().cuda()
gu = torch.randn(8, 64, 64).bfloat16().cuda()
dn = torch.randn(8, 64, 32).bfloat16().cuda()
w = torch.rand(4, 2).cuda()
ids = torch.randint(0, 8, (4, 2), dtype=torch.int32).cuda()
ops.set_validation(True)
out = ops.experts(x, gu, dn, w, ids)  # valid ids pass the check
assert torch.isfinite(out).all()
for bad in (8, -2):
    ids[2, 1] = bad
    try:
        ops.experts(x, gu, dn, w, ids)
        print("NO ERROR")
    except RuntimeError as e:
        print("RAISED", str(e).splitlines()[0])
ops.set_validation(False)
ids[2, 1] = 9
print("OFF", bool(torch.isfinite(ops.experts(x, gu, dn, w, ids)).all()))
'''


def run_script(code: str):
    """Runs code in a fresh interpreter: a crash (not an exception) fails one test, not the run."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"process died (rc={r.returncode}): {r.stderr[-500:]}"
    return r.stdout.splitlines()


def test_validation_rejects_out_of_range_ids():
    """With validation on, an id >= E or < -1 raises an error naming ids (and the slot); with it
    off the slot is skipped. In a subprocess: an earlier version crashed the process (the message
    formatted integers through an ostream, see csrc/cuda/experts.cu)."""
    lines = run_script(VALIDATION_SCRIPT)
    assert len(lines) == 3, lines
    assert lines[0].startswith("RAISED") and "ids[2, 1] = 8" in lines[0] and "E=8" in lines[0], lines[0]
    assert lines[1].startswith("RAISED") and "ids[2, 1] = -2" in lines[1], lines[1]
    assert lines[2] == "OFF True", lines[2]


SHAPE_ERROR_SCRIPT = '''
import torch
x = torch.randn(4, 64).bfloat16().cuda()
gu = torch.randn(8, 64, 64).bfloat16().cuda()
dn = torch.randn(8, 64, 32).bfloat16().cuda()
w = torch.rand(4, 2).cuda()
ids = torch.randint(0, 8, (4, 1), dtype=torch.int32).cuda()
import allocmoe_ext
try:
    torch.ops.allocmoe.experts(x, gu, dn, w, ids)
    print("NO ERROR")
except RuntimeError as e:
    print("RAISED", str(e).splitlines()[0])
'''


def test_shape_error_with_numbers_raises():
    """A shape error whose message prints numbers (ids [4, 1] vs weights [4, 2]) raises on CUDA
    (the old ids check crashed in the module's integer formatting; this guards the shared
    argument checks against the same fate). In a subprocess, like the validation test."""
    lines = run_script(SHAPE_ERROR_SCRIPT)
    assert lines and lines[-1].startswith("RAISED") and "ids" in lines[-1], lines
