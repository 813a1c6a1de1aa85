"""Plain tests of the model chapters (04 attention, 05 block, 06 GPT) beyond what the notebooks show."""
import math

import pytest
import torch

from nanogpt_plus.attention import CausalSelfAttention, KVCache, MultiHeadAttention, causal_mask
from nanogpt_plus.block import Block
from nanogpt_plus.gpt import GPT, PRESETS, GPTConfig


def tiny_config(**changes):
    return GPTConfig(**{**dict(vocab_size=50, context_size=24, n_layer=2, n_head=2, n_embd=16), **changes})


@pytest.mark.parametrize("name,count", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                        ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_gpt2_parameter_counts(name, count):
    with torch.device("meta"): model = GPT(GPTConfig.from_name(name))
    assert model.num_params() == count
    assert model.num_params(non_embedding=True) == count - 50257 * model.config.n_embd - 1024 * model.config.n_embd


def test_presets_build_and_round_trip():
    for name in PRESETS:
        config = GPTConfig.from_name(name)
        assert GPTConfig(**config.to_dict()) == config
    assert GPTConfig.from_name("small", vocab_size=3).vocab_size == 3


@pytest.mark.parametrize("changes,message", [
    (dict(n_embd=15), "divisible by n_head"), (dict(n_head=0), "n_head must be a positive integer"),
    (dict(vocab_size=0), "vocab_size must be"), (dict(context_size=2.5), "context_size must be"),
    (dict(n_layer=True), "n_layer must be"), (dict(dropout=1.0), "dropout must be in [0, 1)"),
    (dict(dropout=-0.5), "dropout must be in [0, 1)"), (dict(bias="yes"), "bias must be True or False")])
def test_config_errors(changes, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        tiny_config(**changes)


def test_module_size_errors():
    with pytest.raises(ValueError, match="divisible"): CausalSelfAttention(10, 3)
    with pytest.raises(ValueError, match="divisible"): MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="positive"): Block(0, 1)
    with pytest.raises(ValueError, match="unknown model size"): GPTConfig.from_name("gpt3")


def test_init_and_tying():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=8, n_embd=64, n_head=4, vocab_size=500))
    assert model.lm_head.weight is model.tok_emb.weight
    assert abs(model.blocks[0].mlp.fc.weight.std().item() - 0.02) < 2e-3
    assert abs(model.blocks[3].attn.proj.weight.std().item() - 0.02 / 4) < 5e-4  # 0.02 / sqrt(2 * 8)
    assert all((b.attn.qkv.bias == 0).all() and (b.mlp.proj.bias == 0).all() for b in model.blocks)
    idx, targets = torch.randint(500, (2, 4, 24))  # targets unrelated to inputs: (tied weights favour idx itself)
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(500)) < 0.05


def test_forward_errors():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="exceed the context size 24"): model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="idx is empty"): model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="idx must be"): model(torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("bias", [True, False])
def test_causality(bias):
    torch.manual_seed(0)
    model = GPT(tiny_config(bias=bias)).eval()
    idx = torch.randint(50, (2, 24))
    with torch.no_grad():
        base, _ = model(idx)
        for t in (0, 1, 7, 23):
            changed = idx.clone()
            changed[:, t:] = (changed[:, t:] + 1) % 50
            assert torch.equal(model(changed)[0][:, :t], base[:, :t])


def test_causal_mask_with_past():
    m = causal_mask(3, past=4)
    assert m.shape == (3, 7)
    assert m[0].tolist() == [True] * 5 + [False] * 2 and m[2].all()


# The cache is attention.py's KVCache (chapter 4); these check the model side of the protocol against it.
@pytest.mark.parametrize("bias", [True, False])
def test_kv_cache_chunks_match_full_pass(bias):
    torch.manual_seed(0)
    model = GPT(tiny_config(bias=bias)).eval()
    idx = torch.randint(50, (3, 24))
    cache = model.new_kv_cache(batch_size=3)
    with torch.no_grad():
        full, _ = model(idx)
        pieces = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in [(0, 5), (5, 6), (6, 13), (13, 14), (14, 24)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 24
    with pytest.raises(ValueError, match="after 24 cached positions"): model(idx[:, :1], kv_cache=cache)


def test_last_only_matches_full():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(50, (2, 10))
    with torch.no_grad():
        last, loss = model(idx, last_only=True)
        full, _ = model(idx)
    assert loss is None and last.shape == (2, 1, 50)
    torch.testing.assert_close(last[:, 0], full[:, -1])


@pytest.mark.parametrize("bias", [True, False])
def test_generate_wrapper_greedy_cache_parity(bias):
    torch.manual_seed(0)
    model = GPT(tiny_config(bias=bias))
    prompt = torch.randint(50, (2, 5))
    plain = model.generate(prompt, 30, top_k=1)  # runs past the context of 24
    cached = model.generate(prompt, 30, top_k=1, use_kv_cache=True)
    assert plain.shape == (2, 35)
    assert torch.equal(plain, cached)
    assert model.training  # generation restores the mode it found


def test_new_kv_cache_matches_the_model():
    torch.manual_seed(0)
    model = GPT(tiny_config()).to(torch.bfloat16)
    cache = model.new_kv_cache(batch_size=2)
    c = model.config
    assert isinstance(cache, KVCache) and cache.pos == 0 and cache.max_len == c.context_size
    assert len(cache.k) == len(cache.v) == c.n_layer
    assert cache.k[0].shape == (2, c.n_head, c.context_size, c.n_embd // c.n_head)
    assert cache.k[0].dtype == torch.bfloat16 and cache.k[0].device == model.tok_emb.weight.device


def test_layer_norms_are_torch_layer_norms():
    # nn.LayerNorm(n, bias=...) keeps the parameter names weight/bias that GPT-2 loading and checkpoints use
    model = GPT(tiny_config(bias=False))
    assert all(type(m) is torch.nn.LayerNorm for m in (model.ln_f, model.blocks[0].ln1, model.blocks[0].ln2))
    assert "ln_f.weight" in dict(model.named_parameters()) and "ln_f.bias" not in dict(model.named_parameters())
    assert "ln_f.bias" in dict(GPT(tiny_config(bias=True)).named_parameters())
