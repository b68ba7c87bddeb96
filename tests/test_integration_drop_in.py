"""The drop-in on tiny random-weight models of every supported architecture: at full budget the
patched model is the unpatched model (logits, generation, state dict), and restore undoes it."""
import pytest
import torch

from allocmoe_ext.integration import AllocMoE, apply, moe_layers, restore
from tiny_models import TINY_ARCHITECTURES, tiny_model

# Dense layers the tiny configs contain (first_k_dense_replace / mlp_only_layers), checked
# below so that the drop-in provably leaves them alone.
DENSE_LAYERS = {"deepseek_v2": [0], "deepseek_v2_group": [0], "deepseek_v3": [0], "qwen2_moe": [1], "qwen3_moe": [0]}

ATOL = 1e-5


def _input_ids(batch=2, seq=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 96, (batch, seq), generator=g)


@pytest.fixture(params=TINY_ARCHITECTURES)
def arch(request):
    return request.param


@torch.no_grad()
def test_full_budget_equals_unpatched_and_restore_undoes(arch):
    model = tiny_model(arch)
    originals = [layer.mlp for layer in model.model.layers]
    ids = _input_ids()
    # Left padding exercises the attention mask path as generate uses it.
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = model(ids, attention_mask=mask).logits
    expected_tokens = model.generate(ids[:, :5], **gen)

    assert apply(model) is model
    dense = DENSE_LAYERS.get(arch, [])
    for i, (layer, original) in enumerate(zip(model.model.layers, originals)):
        if i in dense:  # dense layers are left alone
            assert layer.mlp is original and not isinstance(layer.mlp, AllocMoE)
        else:
            assert isinstance(layer.mlp, AllocMoE) and layer.mlp.layer_index == i
            assert layer.mlp.original_block is original
    assert [b.layer_index for b in moe_layers(model)] == [i for i in range(len(originals)) if i not in dense]
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, expected, atol=ATOL, rtol=0)
    tokens = model.generate(ids[:, :5], **gen)
    assert tokens.shape == (2, 9) and torch.equal(tokens, expected_tokens)

    assert restore(model) is model
    assert all(layer.mlp is original for layer, original in zip(model.model.layers, originals))
    assert not any(isinstance(m, AllocMoE) for m in model.modules())
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, expected, atol=0, rtol=0)


@torch.no_grad()
def test_block_matches_the_original_block(arch):
    """Block level: the router logits, and forward including the return convention
    (GPT-OSS returns (hidden, router_scores))."""
    model = tiny_model(arch)
    apply(model)
    tokens = torch.randn(5, model.config.hidden_size)
    hidden = torch.randn(2, 6, model.config.hidden_size)
    for block in moe_layers(model):
        router = block.router if arch == "gpt_oss" else block.gate
        torch.testing.assert_close(block.router_logits(tokens), router(tokens)[0], atol=0, rtol=0)
        assert block.spec.num_experts == router.num_experts and block.spec.top_k == router.top_k

        expected = block.original_block(hidden)
        got = block(hidden)
        if arch == "gpt_oss":
            assert isinstance(got, tuple) and len(got) == 2
            torch.testing.assert_close(got[0], expected[0], atol=ATOL, rtol=0)
            # The original's scores are in its top-k order; compare per token as sorted sets.
            torch.testing.assert_close(got[1].sort(-1).values, expected[1].sort(-1).values, atol=ATOL, rtol=0)
        else:
            assert isinstance(got, torch.Tensor) and got.shape == hidden.shape
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_state_dict_round_trips(arch):
    model = tiny_model(arch)
    before = model.state_dict()
    apply(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for key, tensor in before.items():
        assert after[key] is tensor or after[key].data_ptr() == tensor.data_ptr(), key
        assert torch.equal(after[key], tensor), key

    # A checkpoint of the unpatched architecture (other weights) loads into the patched model...
    other = tiny_model(arch, seed=7)
    ids = _input_ids()
    expected = other(ids).logits
    result = model.load_state_dict(other.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(model(ids).logits, expected, atol=ATOL, rtol=0)
    # ...and the patched model's state dict loads into a fresh unpatched one.
    fresh = tiny_model(arch, seed=3)
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(fresh(ids).logits, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_save_pretrained_of_patched_model_loads_into_transformers(tmp_path):
    """A patched model saves the checkpoint transformers expects (DeepSeek-V3: with the fp32
    correction-bias buffer), and that checkpoint loads unchanged into the unpatched class."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("deepseek_v3")
    ids = _input_ids()
    expected = model(ids).logits
    apply(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert not any(isinstance(m, AllocMoE) for m in loaded.modules())
    torch.testing.assert_close(loaded(ids).logits, expected, atol=ATOL, rtol=0)
    # and the loaded model patches to the same result
    torch.testing.assert_close(apply(loaded)(ids).logits, expected, atol=ATOL, rtol=0)
