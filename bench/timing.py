"""Timing helpers for the layer benchmark: medians of device-event timings, CUDA-graph capture,
an L2 flush between runs, and the two machine ceilings (copy bandwidth, bf16 matmul rate).

Method (see the workplace METHOD.md): warm up first, time every run with its own pair of CUDA
events, take the median; rotate among several input sets; read (not write) a buffer several
times the L2 size between runs so that no run finds the previous run's weights in cache.
On the CPU the same functions use time.perf_counter (smoke runs only: CPU numbers mean little).
"""
from __future__ import annotations

import statistics
import time

import torch

L2_BYTES = 50 * 2**20  # H100 L2; the flush buffer reads 4x this
SLEEP_CYCLES = 100_000  # ~50 us at H100 clocks: longer than launching a graph or a few kernels


class Timer:
    """Times no-argument callables on one device. ``calls`` rotate: run i uses calls[i % len]."""

    def __init__(self, device: torch.device, reps: int, warmup: int, flush_l2: bool = True):
        if reps < 1 or warmup < 0:
            raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
        self.device = device
        self.cuda = device.type == "cuda"
        self.reps = reps
        self.warmup = warmup
        self._flush_buf = None
        if self.cuda and flush_l2:
            # Random data (never zeros); a read-only reduction leaves no dirty lines behind that
            # the timed kernel would have to write back.
            self._flush_buf = torch.rand(4 * L2_BYTES // 4, device=device, dtype=torch.float32)
            self._flush_out = torch.empty((), device=device, dtype=torch.float32)

    def _flush(self):
        torch.sum(self._flush_buf, dim=0, out=self._flush_out)

    def median_us(self, calls, flush_l2: bool = True) -> dict:
        """Median (and spread) in microseconds over ``reps`` timed runs after ``warmup`` runs.

        Before each run the device is kept busy (the L2 flush, or a short sleep kernel when
        ``flush_l2`` is false: small inputs that a real model has just written stay in L2), so
        that the host has queued the timed work before its start event fires and a graph's
        launch latency is not counted as device time.
        """
        n = len(calls)
        for i in range(self.warmup):
            calls[i % n]()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
            for i in range(self.reps):
                if flush_l2 and self._flush_buf is not None:
                    self._flush()
                else:
                    torch.cuda._sleep(SLEEP_CYCLES)
                starts[i].record()
                calls[i % n]()
                ends[i].record()
            torch.cuda.synchronize(self.device)
            times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
        else:
            times = []
            for i in range(self.reps):
                t0 = time.perf_counter()
                calls[i % n]()
                times.append((time.perf_counter() - t0) * 1e6)
        times.sort()
        return {
            "median_us": statistics.median(times),
            "p10_us": times[len(times) // 10],
            "p90_us": times[(len(times) * 9) // 10],
            "runs": len(times),
        }


def capture_graph(fn):
    """Capture ``fn()`` (no arguments, fixed input buffers) in a CUDA graph.

    Returns (graph, output_of_the_captured_call). Warm-up runs on a side stream first, as the
    PyTorch docs require (lazy handle creation and workspace allocation must not be captured).
    Raises whatever the capture raises (e.g. a host sync inside ``fn``).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out


def measure_ceilings(timer: Timer, quick: bool) -> dict:
    """Device-to-device copy bandwidth (bytes read + written), read bandwidth (a sum over the same
    buffer: what a weight stream can reach; copy and read differ by up to 25% between machines
    of one kind), and bf16 matmul rate."""
    dev = timer.device
    copy_elems = (2**24 if quick else 2**29)  # bf16: 32 MiB quick, 1 GiB full
    src = torch.randn(copy_elems, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t_copy = timer.median_us([lambda: dst.copy_(src)])["median_us"]
    copy_bytes = 2 * src.numel() * src.element_size()
    acc = torch.empty((), device=dev, dtype=torch.float32)
    t_read = timer.median_us([lambda: torch.sum(src, dim=0, dtype=torch.float32, out=acc)])["median_us"]
    read_bytes = src.numel() * src.element_size()
    del src, dst, acc

    n = 512 if quick else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
    t_mm = timer.median_us([lambda: torch.mm(a, b, out=c)])["median_us"]
    del a, b, c
    return {
        "copy_bytes": copy_bytes,
        "copy_us": t_copy,
        "copy_bw_Bps": copy_bytes / (t_copy * 1e-6),
        "read_bytes": read_bytes,
        "read_us": t_read,
        "read_bw_Bps": read_bytes / (t_read * 1e-6),
        "matmul_n": n,
        "matmul_us": t_mm,
        "matmul_flops": 2 * n**3 / (t_mm * 1e-6),
    }
