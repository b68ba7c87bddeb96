"""Tiny random-weight transformers MoE models for tests (builders live in the package)."""
from allocmoe_ext.integration.tiny import TINY_ARCHITECTURES, tiny_config, tiny_model

__all__ = ["TINY_ARCHITECTURES", "tiny_config", "tiny_model"]
