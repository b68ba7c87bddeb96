"""Layer sensitivity profiles for budget allocation.

Both profiles are matrices ``S[L, K]`` (``S[i, k-1]`` = cost of MoE layer i at k experts per
token, k = 1..K, K = the model's top_k) that ``allocation.allocate`` minimises.

Alloc-L (``alloc_l_profile``), isolated deep-to-shallow perplexity profiling (ALLOC_MOE.md):
for every MoE layer i, deepest first, and every k = K..1, the model runs with layer i at top-k,
every deeper layer j > i at top-1 and every shallower layer j < i at top-K, and the perplexity
of the calibration tokens is recorded. Normalisation (ours): ``S[i, k-1] = ppl(i, k) / ppl_full
- 1``, the relative perplexity change against the unmodified model (every layer at top-K). A
common affine change of all entries leaves the DP's choice unchanged, so this is the same
allocation as raw perplexity, in a readable unit. The raw perplexities are kept too.
Configurations that coincide are run once: row i at k=1 is the same model as row i-1 at k=K
(layers < i at K, layers >= i at 1), and the deepest row at k=K is the unmodified model (the
reference), so a full profile takes L*K - (L-1) model passes over the calibration batches.

Resumable: with ``path`` the partial profile is written (atomically) after every layer; a rerun
with the same model, calibration tokens and path continues after the last finished layer. A file
from another model or other tokens is refused rather than silently mixed in.

LExI (``lexi_profile``): ``D[j, k-1] = E ||Y_{j,k}(X) - Y_{j,K}(X)||``: the inputs X of every MoE
block are captured with forward hooks while the full-budget model runs, then each block alone is
re-run on them at top-k. The expectation is the root mean square over calibration tokens of the
per-token output error, i.e. ||Y_k - Y_K||_F / sqrt(T) of all calibration tokens taken as one
matrix, so it does not depend on how the tokens are batched. ``D[j, K-1] = 0``.

Perplexity is exp of the mean next-token cross-entropy over every position of every batch
(position t predicts token t+1); batches are int64 ``input_ids`` tensors [B, S].
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, asdict
from typing import Iterable, Sequence

import torch

from .policies import TokenPolicy

PROFILE_SCHEMA_VERSION = 1
PROFILE_METHODS = ("alloc_l", "lexi")


@dataclass
class Profile:
    """A sensitivity profile and how it was measured."""

    method: str  # "alloc_l" or "lexi"
    matrix: list  # S[L][K] (rows of layers that are not profiled yet are None)
    model: dict  # identity: architecture, num_moe_layers, num_experts, top_k
    calibration: dict  # source, tokens, batches, sha256 of the tokens
    normalisation: str
    raw: list | None = None  # alloc_l: the perplexities behind S
    reference: float | None = None  # alloc_l: full-budget perplexity
    date: str = ""
    complete: bool = False
    schema_version: int = PROFILE_SCHEMA_VERSION
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Profile":
        if d.get("schema_version") != PROFILE_SCHEMA_VERSION:
            raise ValueError(f"profile schema_version {d.get('schema_version')!r} is not supported "
                             f"(this version reads {PROFILE_SCHEMA_VERSION})")
        if d.get("method") not in PROFILE_METHODS:
            raise ValueError(f"profile method must be one of {PROFILE_METHODS}, got {d.get('method')!r}")
        return Profile(**d)

    def save(self, path) -> None:
        _atomic_write_json(path, {"kind": "allocmoe-profile", **self.to_dict()})

    @staticmethod
    def load(path) -> "Profile":
        with open(path) as f:
            d = json.load(f)
        if d.pop("kind", None) != "allocmoe-profile":
            raise ValueError(f"{path} is not an allocmoe profile file")
        return Profile.from_dict(d)

    def tensor(self) -> torch.Tensor:
        if not self.complete or any(row is None for row in self.matrix):
            raise ValueError("profile is incomplete: finish profiling first")
        return torch.tensor(self.matrix, dtype=torch.float64)


def _atomic_write_json(path, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def model_identity(info: dict) -> dict:
    """The fields of ``integration.model_info`` that say which model a profile or plan is for."""
    return {k: info[k] for k in ("architecture", "num_moe_layers", "num_experts", "top_k")}


def _tqdm(total: int, desc: str, enabled: bool):
    """A tqdm bar if tqdm is installed and wanted, else a silent stand-in."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, leave=False)
        except ImportError:
            pass

    class _Silent:
        def update(self, n=1):
            pass

        def set_postfix_str(self, s):
            pass

        def close(self):
            pass

    return _Silent()


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def prepare_batches(batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Materialise and check an iterable of input_ids batches (each profiling run reuses them)."""
    out = []
    for i, ids in enumerate(batches):
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"batch {i} is not a tensor of input_ids")
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.shape[1] < 2:
            raise ValueError(f"batch {i} must be an integer input_ids tensor [B, S] with S >= 2, "
                             f"got {tuple(ids.shape)} {ids.dtype}")
        out.append(ids.long())
    if not out:
        raise ValueError("batches is empty: profiling needs calibration tokens")
    return out


def calibration_fingerprint(batches: Sequence[torch.Tensor], source: str = "") -> dict:
    h = hashlib.sha256()
    for ids in batches:
        h.update(str(tuple(ids.shape)).encode())
        h.update(ids.cpu().numpy().tobytes())
    return {"source": source, "tokens": int(sum(ids.numel() for ids in batches)),
            "batches": len(batches), "sha256": h.hexdigest()}


@torch.no_grad()
def evaluate_lm(model, batches: Sequence[torch.Tensor]) -> dict:
    """Next-token language-model quality over every position of every batch: mean
    cross-entropy ``nll`` (nats), ``perplexity`` = exp(nll), top-1 ``accuracy``, ``tokens``
    (the number of predicted positions)."""
    device = _model_device(model)
    nll, correct, count = 0.0, 0, 0
    for ids in batches:
        ids = ids.to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        target = ids[:, 1:]
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    if count == 0:
        raise ValueError("no tokens to evaluate")
    return {"nll": nll / count, "perplexity": math.exp(nll / count), "accuracy": correct / count,
            "tokens": count}


def perplexity(model, batches: Sequence[torch.Tensor]) -> float:
    """exp(mean next-token cross-entropy) over every position of every batch."""
    return evaluate_lm(model, batches)["perplexity"]


def _topk_policies(ks: Sequence[int]) -> list[TokenPolicy]:
    return [TokenPolicy("topk", float(k)) for k in ks]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def alloc_l_profile(model, batches: Iterable[torch.Tensor], path=None, progress: bool = True,
                    source: str = "") -> Profile:
    """Alloc-L isolated deep-to-shallow perplexity profile of an integrated model (see the
    module docstring). ``path``: where the partial profile is saved after every layer and from
    which a rerun resumes. The model's policies are restored to full budget at the end."""
    from . import integration

    batches = prepare_batches(batches)
    identity = model_identity(integration.model_info(model))
    L, K = identity["num_moe_layers"], identity["top_k"]
    calib = calibration_fingerprint(batches, source)

    profile = None
    if path is not None and os.path.exists(path):
        profile = Profile.load(path)
        if profile.method != "alloc_l" or profile.model != identity \
                or profile.calibration.get("sha256") != calib["sha256"]:
            raise ValueError(
                f"the partial profile in {path} was measured on another model, method or "
                f"calibration tokens ({profile.method}, {profile.model}, "
                f"{profile.calibration.get('tokens')} tokens) than this run ({identity}, "
                f"{calib['tokens']} tokens): remove it or choose another path")
    if profile is None:
        profile = Profile(method="alloc_l", matrix=[None] * L, raw=[None] * L, model=identity,
                          calibration=calib, normalisation="relative perplexity change: ppl / ppl_full - 1")

    # Configurations already measured (from a resumed file): per-layer ks -> perplexity.
    memo: dict[tuple, float] = {}
    if profile.reference is not None:
        memo[(K,) * L] = profile.reference
    for i, row in enumerate(profile.raw):
        if row is not None:
            for k in range(1, K + 1):
                memo[tuple([K] * i + [k] + [1] * (L - 1 - i))] = row[k - 1]

    todo = [i for i in range(L - 1, -1, -1) if profile.raw[i] is None]
    bar = _tqdm(total=len(todo) * K + (profile.reference is None), desc="Alloc-L profile", enabled=progress)

    def measure(ks: tuple) -> float:
        if ks not in memo:
            integration.set_policies(model, _topk_policies(ks))
            memo[ks] = perplexity(model, batches)
        bar.update(1)
        return memo[ks]

    try:
        if profile.reference is None:
            profile.reference = measure((K,) * L)
        for i in todo:  # deepest first
            row = [None] * K
            for k in range(K, 0, -1):
                row[k - 1] = measure(tuple([K] * i + [k] + [1] * (L - 1 - i)))
                bar.set_postfix_str(f"layer {i} k={k} ppl={row[k - 1]:.4g}")
            profile.raw[i] = row
            profile.matrix[i] = [p / profile.reference - 1.0 for p in row]
            profile.complete = all(r is not None for r in profile.raw)
            profile.date = _now()
            if path is not None:
                profile.save(path)
    finally:
        bar.close()
        integration.set_policies(model, _topk_policies([K] * L))
    profile.complete = True
    return profile


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def lexi_profile(model, batches: Iterable[torch.Tensor], progress: bool = True, source: str = "") -> Profile:
    """LExI layer-output-error profile of an integrated model (see the module docstring)."""
    from . import integration

    batches = prepare_batches(batches)
    identity = model_identity(integration.model_info(model))
    L, K = identity["num_moe_layers"], identity["top_k"]
    layers = integration.moe_layers(model)
    full = _topk_policies([K] * L)
    device = _model_device(model)
    sq_err = torch.zeros(L, K, dtype=torch.float64)
    n_tokens = 0
    bar = _tqdm(total=len(batches) * L * (K - 1), desc="LExI profile", enabled=progress)

    try:
        for ids in batches:
            captured: dict[int, tuple] = {}
            handles = []
            for j, layer in enumerate(layers):
                def hook(module, args, kwargs, out, j=j):
                    captured[j] = (args, kwargs, _block_output(out))
                handles.append(layer.register_forward_hook(hook, with_kwargs=True))
            try:
                integration.set_policies(model, full)
                model(input_ids=ids.to(device), use_cache=False)
            finally:
                for h in handles:
                    h.remove()
            n_tokens += ids.numel()
            for j, layer in enumerate(layers):
                args, kwargs, y_full = captured[j]
                for k in range(1, K):
                    policies = list(full)
                    policies[j] = TokenPolicy("topk", float(k))
                    integration.set_policies(model, policies)
                    y = _block_output(layer(*args, **kwargs))
                    sq_err[j, k - 1] += (y.double() - y_full.double()).pow(2).sum().item()
                    bar.update(1)
    finally:
        bar.close()
        integration.set_policies(model, full)
    D = (sq_err / n_tokens).sqrt()
    return Profile(method="lexi", matrix=D.tolist(), model=identity,
                   calibration=calibration_fingerprint(batches, source),
                   normalisation="RMS over calibration tokens of ||Y_k(x) - Y_K(x)||_2 per MoE block",
                   date=_now(), complete=True)
