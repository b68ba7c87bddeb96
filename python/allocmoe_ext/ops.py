import torch
from . import _C  # noqa: F401
