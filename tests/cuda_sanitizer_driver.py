"""Small driver for compute-sanitizer (memcheck, racecheck): every CUDA path of route and moe once, the
experts op's stream path with act in the stages and past 16 tokens, and its wide path."""

import os

import torch

from allocmoe_ext import ops

torch.manual_seed(0)
for T, E, K, budget in ((1, 64, 6, 3.0), (16, 60, 4, 2.5), (64, 64, 6, 3.0), (300, 128, 8, 5.0)):
    ops.route(torch.randn(T, E, device="cuda"), K, budget)
ops.route(torch.randn(20, 64, device="cuda"), 6, 3.0, scoring="sigmoid_group", n_group=8, topk_group=4,
          correction_bias=torch.rand(64, device="cuda"))
H, I, E = 256, 128, 16
for path, T in [(p, T) for p in ("split", "stream", "fused", "composite") for T in (1, 3, 16)]:
    os.environ["ALLOCMOE_MOE_PATH"] = path  # the split and stream kernels, the one-launch kernel, the composition
    ops.moe(torch.randn(T, H, device="cuda").bfloat16(), torch.randn(E, H, device="cuda").bfloat16(),
            torch.randn(E, 2 * I, H, device="cuda").bfloat16(), torch.randn(E, H, I, device="cuda").bfloat16(),
            4, 2.5, shared_gate_up=torch.randn(1, 2 * I, H, device="cuda").bfloat16(),
            shared_down=torch.randn(1, H, I, device="cuda").bfloat16(),
            shared_gate=torch.randn(H, device="cuda").bfloat16())
os.environ["ALLOCMOE_MOE_PATH"] = "split"  # router logits in; H past the last 256-row down box
ops.moe(torch.randn(2, 288, device="cuda").bfloat16(), None, torch.randn(8, 2 * 64, 288, device="cuda").bfloat16(),
        torch.randn(8, 288, 64, device="cuda").bfloat16(), 8, 8.0, router_logits=torch.randn(2, 8, device="cuda"))
os.environ["ALLOCMOE_MOE_PATH"] = "stream"
for T, K, budget in ((1, 6, 3.0), (4, 6, 24 / 4), (16, 8, 5.0)):  # router logits in; resident and double-buffered act
    ops.moe(torch.randn(T, H, device="cuda").bfloat16(), None, torch.randn(E, 2 * I, H, device="cuda").bfloat16(),
            torch.randn(E, H, I, device="cuda").bfloat16(), K, budget, router_logits=torch.randn(T, E, device="cuda"))
# The experts op's stream path: act rows copied into the stages by the second producer warp
# (T=8), and past 16 tokens x staged per (expert, pass), expert-major down into y, combine;
# uneven (skewed) expert loads with several passes.
os.environ["ALLOCMOE_EXPERTS_PATH"] = "stream"
for T, E, K in ((8, 16, 6), (40, 16, 4), (64, 8, 8)):
    ids = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)]).int()
    if T == 64:
        ids[:, :] = torch.arange(K, device="cuda", dtype=torch.int32)
    ops.experts(torch.randn(T, H, device="cuda").bfloat16(), torch.randn(E, 2 * I, H, device="cuda").bfloat16(),
                torch.randn(E, H, I, device="cuda").bfloat16(), torch.rand(T, K, device="cuda"), ids)
# The wide path (sm_90; elsewhere it falls back): tensor-map weight boxes and cp.async token rows in one
# ring, a down stage of 64 k (I = 320), several 32-pair tiles on one expert (skewed).
if torch.cuda.get_device_capability()[0] >= 9:
    os.environ["ALLOCMOE_EXPERTS_PATH"] = "wide"
    for T, E, K, skew in ((3, 16, 4, False), (70, 8, 4, True)):
        ids = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)]).int()
        if skew:
            ids[:, :] = torch.arange(K, device="cuda", dtype=torch.int32)
        ops.experts(torch.randn(T, H, device="cuda").bfloat16(), torch.randn(E, 640, H, device="cuda").bfloat16(),
                    torch.randn(E, H, 320, device="cuda").bfloat16(), torch.rand(T, K, device="cuda"), ids)
torch.cuda.synchronize()
print("sanitizer driver done")
