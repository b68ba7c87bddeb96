"""Alloc-L isolated deep-to-shallow profiling (resumable) and LExI profiling on tiny models."""
import math
import sys

import pytest
import torch

from allocmoe_ext import integration
from allocmoe_ext.integration.tiny import TINY_ARCHITECTURES, tiny_model
from allocmoe_ext.policies import TokenPolicy
from allocmoe_ext.profiling import Profile, alloc_l_profile, lexi_profile, perplexity


def make_model(arch="deepseek_v2", layers=5):
    return integration.apply(tiny_model(arch, num_hidden_layers=layers))


def calib(n=2, B=2, S=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (B, S), generator=g) for _ in range(n)]


class ForwardCounter:
    """Counts full-model forwards; can stop the run after a number of them (a crash)."""

    def __init__(self, model, crash_after=None):
        self.n, self.crash_after = 0, crash_after
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if self.crash_after is not None and self.n >= self.crash_after:
            raise KeyboardInterrupt("simulated crash")
        self.n += 1


def ppl_under(model, ks, batches):
    integration.set_policies(model, [TokenPolicy("topk", float(k)) for k in ks])
    return perplexity(model, batches)


def test_alloc_l_profile_runs_the_isolated_configurations():
    model, batches = make_model(), calib(1)
    counter = ForwardCounter(model)
    prof = alloc_l_profile(model, batches, progress=False)
    L, K = 4, 3
    assert prof.complete and len(prof.matrix) == L and all(len(r) == K for r in prof.matrix)
    # Coinciding configurations run once: L*K - (L-1) runs, the reference included.
    assert counter.n == L * K - (L - 1)
    # The model is left at full budget.
    assert [l.policy.budget for l in integration.moe_layers(model)] == [float(K)] * L
    full = ppl_under(model, [K] * L, batches)
    assert prof.reference == pytest.approx(full, rel=1e-6)
    # Layer i at k, deeper layers at 1, shallower at K.
    for i, k in [(0, 2), (2, 1), (3, 3), (1, 3)]:
        ks = [K] * i + [k] + [1] * (L - 1 - i)
        ppl = ppl_under(model, ks, batches)
        assert prof.raw[i][k - 1] == pytest.approx(ppl, rel=1e-6)
        assert prof.matrix[i][k - 1] == pytest.approx(ppl / full - 1.0, rel=1e-6, abs=1e-9)
    for i in range(1, L):
        assert prof.raw[i][0] == prof.raw[i - 1][K - 1]
    # The deepest layer at top-K with nothing after it is the full model.
    assert prof.matrix[L - 1][K - 1] == pytest.approx(0.0, abs=1e-6)


def test_alloc_l_profile_resumes_after_a_crash(tmp_path):
    path = tmp_path / "profile.json"
    model, batches = make_model(), calib(1)
    reference = alloc_l_profile(model, batches, progress=False)

    counter = ForwardCounter(model, crash_after=1 + 2 + 1)  # reference (= layer 3 at k=3), layer 3, one run of layer 2
    with pytest.raises(KeyboardInterrupt):
        alloc_l_profile(model, batches, path=path, progress=False)
    counter.handle.remove()
    partial = Profile.load(path)
    assert not partial.complete
    assert partial.raw[3] is not None and partial.raw[2] is None and partial.raw[0] is None

    counter = ForwardCounter(model)
    resumed = alloc_l_profile(model, batches, path=path, progress=False)
    # Layers 2, 1, 0 only, their k=K runs reused from the deeper row: 3 * (3 - 1) runs.
    assert counter.n == 6
    assert resumed.complete and Profile.load(path).complete
    torch.testing.assert_close(resumed.tensor(), reference.tensor())

    # A finished profile: a rerun does nothing.
    counter.n = 0
    alloc_l_profile(model, batches, path=path, progress=False)
    assert counter.n == 0


def test_resume_refuses_a_profile_of_other_tokens_or_model(tmp_path):
    path = tmp_path / "profile.json"
    model = make_model()
    alloc_l_profile(model, calib(1, seed=0), path=path, progress=False)
    with pytest.raises(ValueError, match="another model, method or calibration tokens"):
        alloc_l_profile(model, calib(1, seed=1), path=path, progress=False)
    with pytest.raises(ValueError, match="another model"):
        alloc_l_profile(make_model("olmoe", layers=2), calib(1), path=path, progress=False)


def test_profiling_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    model = make_model("olmoe", layers=2)
    prof = alloc_l_profile(model, calib(1), progress=True)
    assert prof.complete


def test_lexi_profile_is_the_layer_output_error():
    model, batches = make_model(), calib(2)
    prof = lexi_profile(model, batches, progress=False)
    D = torch.tensor(prof.matrix)
    assert D.shape == (4, 3) and torch.all(D[:, 2] == 0) and torch.all(D[:, :2] > 0)
    # Recompute D[1, k] directly: capture layer 1's input at full budget, run it at top-1 and top-3.
    layer = integration.moe_layers(model)[1]
    inputs = []
    h = layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    integration.set_policies(model, None)
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    h.remove()
    sq, n = 0.0, 0
    with torch.no_grad():
        for x in inputs:
            layer.policy = TokenPolicy("topk", 3.0)
            y_full = layer(x)
            layer.policy = TokenPolicy("topk", 1.0)
            sq += (layer(x) - y_full).double().pow(2).sum().item()
            n += x.shape[0] * x.shape[1]
    assert D[1, 0].item() == pytest.approx(math.sqrt(sq / n), rel=1e-5)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_profiles_on_every_architecture(arch):
    model = make_model(arch, layers=3 if arch != "gpt_oss" else 2)
    batches = calib(1, S=8)
    a = alloc_l_profile(model, batches, progress=False)
    d = lexi_profile(model, batches, progress=False)
    info = integration.model_info(model)
    shape = (info["num_moe_layers"], info["top_k"])
    assert tuple(a.tensor().shape) == shape and tuple(d.tensor().shape) == shape
    assert torch.isfinite(a.tensor()).all() and torch.isfinite(d.tensor()).all()


def test_bad_batches():
    model = make_model("olmoe", layers=2)
    with pytest.raises(ValueError, match="empty"):
        alloc_l_profile(model, [], progress=False)
    with pytest.raises(ValueError, match="input_ids"):
        lexi_profile(model, [torch.rand(2, 8)], progress=False)
    with pytest.raises(ValueError, match="S >= 2"):
        alloc_l_profile(model, [torch.zeros(2, 1, dtype=torch.long)], progress=False)


def test_profile_file_round_trip_and_errors(tmp_path):
    model = make_model("olmoe", layers=2)
    prof = lexi_profile(model, calib(1), progress=False)
    prof.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == prof
    (tmp_path / "bad.json").write_text('{"kind": "allocmoe-plan"}')
    with pytest.raises(ValueError, match="not an allocmoe profile"):
        Profile.load(tmp_path / "bad.json")
    incomplete = Profile(method="alloc_l", matrix=[None, None], model={}, calibration={}, normalisation="")
    with pytest.raises(ValueError, match="incomplete"):
        incomplete.tensor()
