"""allocmoe_ext: budget-aware expert activation allocation (Alloc-MoE) for MoE inference.

Layers of the package, bottom up:
- ``ops``: the native operators ``torch.ops.allocmoe.*`` (CPU and CUDA kernels, fake kernels).
- ``policies``: per-layer token policies (top-k, Alloc-T, Top-P, NAEE) over the ``route`` op.
- ``allocation`` / ``profiling`` / ``plan``: Alloc-L (sensitivity profiles, the exact DP, the
  baseline schedules) and the plan file that carries a per-layer allocation.
- ``integration``: the drop-in for Hugging Face transformers MoE models (``apply``/``restore``).
- ``cli``: the ``allocmoe`` command.

Importing the package loads only the ops and the policies; the rest (which needs
transformers) loads on first use.
"""
from . import ops
from .ops import experts, route
from .policies import RoutingSpec, TokenPolicy

__version__ = "0.1.0"

# name -> submodule that defines it, imported lazily (transformers is optional).
_LAZY = {
    "apply": "integration",
    "restore": "integration",
    "AllocMoE": "integration",
    "moe_layers": "integration",
    "set_policies": "integration",
    "reset_stats": "integration",
    "activation_stats": "integration",
    "model_info": "integration",
    "allocate": "allocation",
    "Plan": "plan",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'allocmoe_ext' has no attribute {name!r}")


__all__ = ["ops", "route", "experts", "RoutingSpec", "TokenPolicy", *_LAZY]
