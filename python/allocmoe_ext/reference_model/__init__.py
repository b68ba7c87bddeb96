"""The embedded reference MoE: a byte-level DeepSeek-V2-architecture model shipped in this folder.

11.2M parameters (bf16 safetensors, 22.6 MB): 9 decoder layers, the first dense and 8 MoE layers
with 64 routed experts (top-6, softmax routing without renormalisation) and 2 shared experts,
hidden size 192, MLA attention, vocabulary = the 256 byte values. Trained by
``scripts/train_reference.py`` on Python sources of site-packages; ``training_log.json`` holds
the training curve and final routing statistics, docs/REFERENCE_MODEL.md the model card.

    from allocmoe_ext.reference_model import load_reference_model
    model = load_reference_model()            # fp32 on CPU, eval mode, no network
"""
from __future__ import annotations

from pathlib import Path

PATH = Path(__file__).resolve().parent


def load_reference_model(device: str = "cpu", dtype=None):
    """The embedded reference model (transformers DeepseekV2ForCausalLM) in eval mode.

    ``dtype`` defaults to float32 (the checkpoint is stored in bf16; fp32 makes CPU evaluation
    exact and is what the quality table uses).
    """
    import torch
    from transformers import AutoModelForCausalLM

    if not (PATH / "model.safetensors").is_file():
        raise FileNotFoundError(f"the reference checkpoint is missing from {PATH}")
    dtype = torch.float32 if dtype is None else dtype
    model = AutoModelForCausalLM.from_pretrained(str(PATH), dtype=dtype, local_files_only=True)
    return model.to(device).eval()
