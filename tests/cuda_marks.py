"""What every CUDA test file shares: the skip marks and the NaN poisoning of fresh memory."""
import pytest
import torch

from allocmoe_ext import _C

# Marked `cuda`; skipped without a GPU or without a CUDA build of the extension.
CUDA_ONLY = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and getattr(_C, "with_cuda", False)),
        reason="needs a CUDA GPU and the CUDA build of allocmoe_ext",
    ),
]


def poison_cache(numel: int = 1 << 24) -> None:
    """Fill memory the caching allocator hands out next with NaN, so unwritten outputs show."""
    torch.empty(numel, device="cuda").fill_(float("nan"))
