"""The drop-in on a GPU: same logits as the unpatched model at full budget, and no host sync in
an MoE block's forward (the activation counters stay on device)."""
import pytest
import torch

import allocmoe_ext  # noqa: F401  registers torch.ops.allocmoe
from allocmoe_ext.integration import activation_stats, apply, moe_layers
from allocmoe_ext.policies import TokenPolicy
from tiny_models import TINY_ARCHITECTURES, tiny_model


def _has_cuda_kernels() -> bool:
    return torch.cuda.is_available() and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"allocmoe::{op}", "CUDA") for op in ("route", "experts"))


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _has_cuda_kernels(), reason="needs a CUDA GPU and the CUDA build of allocmoe_ext"),
]


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
@torch.no_grad()
def test_full_budget_logits_equal_unpatched_on_cuda(arch):
    model = tiny_model(arch).cuda()
    ids = torch.randint(3, 96, (2, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    expected = model(ids).logits
    apply(model)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=0)
    assert activation_stats(model) == [float(moe_layers(model)[0].spec.top_k)] * len(moe_layers(model))


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2_moe", "gpt_oss"])
@torch.no_grad()
def test_block_forward_does_not_sync(arch):
    model = apply(tiny_model(arch).cuda(), TokenPolicy("alloc_t", budget=1.5))
    block = moe_layers(model)[0]
    hidden = torch.randn(2, 8, model.config.hidden_size, device="cuda")
    block(hidden)  # warm up (lazy initialisation may sync once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        block(hidden)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert activation_stats(model)[0] == 1.5


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2_moe", "mixtral"])
@torch.no_grad()
def test_fused_decode_path_equals_unfused_on_cuda(arch):
    """At decode sizes the fused moe op must agree with route + experts; "auto" fuses there
    only before sm_90 (from sm_90 on the unfused path is the faster one)."""
    model = apply(tiny_model(arch).cuda(), TokenPolicy("alloc_t", budget=1.5))
    hidden = torch.randn(4, 1, model.config.hidden_size, device="cuda")
    before_sm90 = torch.cuda.get_device_capability()[0] < 9
    for block in moe_layers(model):
        block.fused = "never"
        expected = block(hidden)
        block.fused = "always"
        torch.testing.assert_close(block(hidden), expected, atol=1e-4, rtol=0)
        block.fused = "auto"
        assert block._use_fused(hidden.reshape(-1, hidden.shape[-1])) == before_sm90
