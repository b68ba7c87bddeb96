"""Driver for compute-sanitizer over every path of the CUDA `experts` op (small shapes).

    compute-sanitizer --tool memcheck  --error-exitcode 1 python tests/cuda_experts_sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/cuda_experts_sanitize.py

Exits non-zero if an output is not finite; the sanitizer reports memory errors and races itself.
Not a test (pytest does not collect it).
"""

from __future__ import annotations

import os
import sys

import torch

from allocmoe_ext import ops


def case(T, E, K, H, I, path, dtype=torch.bfloat16, activation="silu", bias=False):
    os.environ["ALLOCMOE_EXPERTS_PATH"] = path
    g = torch.Generator().manual_seed(T * 31 + E)
    x = torch.randn(T, H, generator=g).to(dtype).cuda()
    gu = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype).cuda()
    dn = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype).cuda()
    ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K].to(torch.int32)
    ids[torch.rand(T, K, generator=g) < 0.2] = -1
    w = torch.rand(T, K, generator=g).cuda()
    gub = torch.randn(E, 2 * I, generator=g).to(dtype).cuda() if bias else None
    db = torch.randn(E, H, generator=g).to(dtype).cuda() if bias else None
    out = ops.experts(x, gu, dn, w, ids.cuda(), gub, db, activation=activation)
    torch.cuda.synchronize()
    ok = bool(torch.isfinite(out).all())
    print(f"T={T} E={E} K={K} H={H} I={I} path={path} {dtype} {activation}: {'ok' if ok else 'NOT FINITE'}")
    return ok


def main():
    ok = True
    for path in ("stream", "decode", "skinny", "prefill", "wide"):
        for T in (1, 5, 40, 200):
            ok &= case(T, 16, 4, 64, 96, path)
    ok &= case(40, 8, 4, 512, 160, "skinny")  # several k blocks through the shared-memory ring
    ok &= case(300, 4, 2, 64, 64, "skinny")  # several 64-token passes per expert
    ok &= case(3, 8, 2, 64, 64, "decode", dtype=torch.float16)
    ok &= case(16, 64, 6, 2048, 1408, "stream")  # ring wrapping, partial last stage, two n tiles
    ok &= case(5, 8, 2, 64, 64, "stream", dtype=torch.float16)
    # the one launch (forced): act staged tile-major and expert-major, act resident
    os.environ["ALLOCMOE_STREAM_LAUNCHES"] = "one"
    for T in (16, 40, 4):
        ok &= case(T, 64, 6, 1024, 512, "stream")
    del os.environ["ALLOCMOE_STREAM_LAUNCHES"]
    # the wide path (tensor-map weights, token rows by cp.async): a down k tail, several tiles per expert
    for T in (3, 40, 130):
        ok &= case(T, 8, 4, 256, 320, "wide")
    ok &= case(6, 8, 3, 40, 24, "generic", dtype=torch.float32, activation="swiglu_oai", bias=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
