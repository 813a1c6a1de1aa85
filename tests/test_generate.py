"""Tests of generation: sampling and the loop (bigram.py, chapter 3), the key-value cache (attention.py, chapter 4),
the GPT's decoders (gpt.py, chapter 6), streaming text and the decode layout (generate.py, chapter 9)."""
import ast
import re
from pathlib import Path

import pytest
import torch

import nanogpt_plus
from nanogpt_plus import gpt
from nanogpt_plus.attention import KVCache
from nanogpt_plus.bigram import BigramLanguageModel, crop_decoder, generate, sample_next_token, stream
from nanogpt_plus.generate import TextStream, to_decode_layout
from nanogpt_plus.tokenizer import CharTokenizer, GPT2Tokenizer


def tiny_gpt(bias=True, context_size=16, vocab_size=23, n_layer=2, n_head=2, n_embd=16, seed=0):
    torch.manual_seed(seed)
    cfg = gpt.GPTConfig(vocab_size=vocab_size, context_size=context_size, n_layer=n_layer, n_head=n_head,
                        n_embd=n_embd, dropout=0.0, bias=bias)
    return gpt.GPT(cfg).eval()


def prompts(B=3, T=5, V=23, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- sampling


def test_greedy_is_argmax_and_temperature_zero_is_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    want = logits.argmax(-1, keepdim=True)
    assert torch.equal(sample_next_token(logits, top_k=1), want)
    assert torch.equal(sample_next_token(logits, temperature=0.0), want)
    assert torch.equal(sample_next_token(logits, temperature=0.0, top_p=0.5), want)


def test_top_k_keeps_exactly_k_with_ties():
    logits = torch.zeros(2, 10)  # every logit ties
    logits[1, 7] = 1.0  # row 1: one clear winner, then nine ties
    g = torch.Generator().manual_seed(0)
    seen = [set(), set()]
    for _ in range(300):
        tok = sample_next_token(logits, top_k=3, generator=g)
        for b in range(2):
            seen[b].add(tok[b, 0].item())
    assert len(seen[0]) == 3, seen[0]  # a value threshold would keep all 10
    assert len(seen[1]) == 3 and 7 in seen[1], seen[1]


def test_top_k_is_per_row_in_a_batch():
    # nanoGPTplus used row 0's threshold for every row; here each row keeps its own top 2.
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0, 5.0]])
    g = torch.Generator().manual_seed(0)
    toks = torch.cat([sample_next_token(logits, top_k=2, generator=g) for _ in range(200)], 1)
    assert set(toks[0].tolist()) == {0, 1}
    assert set(toks[1].tolist()) == {3, 4}


def test_top_k_larger_than_vocab_keeps_all():
    logits = torch.zeros(1, 4)
    g = torch.Generator().manual_seed(0)
    toks = {sample_next_token(logits, top_k=100, generator=g).item() for _ in range(200)}
    assert toks == {0, 1, 2, 3}


def test_top_p_edges():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    draw = lambda p: {sample_next_token(logits, top_p=p, generator=g).item() for _ in range(300)}
    assert draw(1e-6) == {0}  # the top token is always kept
    assert draw(0.5) == {0}  # the top token alone reaches 0.5
    assert draw(0.51) == {0, 1}
    assert draw(0.79) == {0, 1}
    assert draw(0.81) == {0, 1, 2}
    assert draw(1.0) == {0, 1, 2, 3}


def test_top_p_and_top_k_combine_and_handle_minus_inf():
    logits = torch.tensor([[0.0, float("-inf"), 0.0, 0.0, float("-inf")]])
    g = torch.Generator().manual_seed(0)
    toks = {sample_next_token(logits, top_k=2, top_p=0.9, generator=g).item() for _ in range(200)}
    assert toks <= {0, 2, 3} and len(toks) == 2


def test_temperature_sharpens_below_one_and_flattens_above():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(4000, 1)
    freq = lambda t: (sample_next_token(logits, temperature=t, generator=torch.Generator().manual_seed(0)) == 0
                      ).float().mean().item()
    p_top = torch.softmax(logits[0], -1)[0].item()  # 0.665
    assert freq(0.5) > p_top + 0.1 and freq(2.0) < p_top - 0.1


def test_seeded_sampling_is_repeatable():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    a = sample_next_token(logits, temperature=1.3, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = sample_next_token(logits, temperature=1.3, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-1), "top_p"),
])
def test_bad_sampling_args(kw, msg):
    with pytest.raises(ValueError, match=msg):
        sample_next_token(torch.zeros(1, 5), **kw)


def test_bad_logits_shape():
    with pytest.raises(ValueError, match=r"\(B, V\)"):
        sample_next_token(torch.zeros(5))


# ---------------------------------------------------------------- the cache


def test_kvcache_update_and_bytes():
    cache = KVCache(n_layer=3, batch_size=2, n_head=2, head_size=4, max_len=8)
    assert cache.nbytes == 2 * 3 * 2 * 2 * 8 * 4 * 4  # k and v, layers, B, nh, max_len, hs, fp32
    k = torch.randn(2, 2, 5, 4)
    for i in range(3):
        ka, va = cache.layer(i).update(k, -k)
        assert ka.shape == (2, 2, 5, 4) and torch.equal(va, -k)
    cache.advance(5)
    assert cache.pos == 5 and cache.layer(0).past_len == 5
    ka, _ = cache.layer(0).update(k[:, :, :3], k[:, :, :3])
    assert ka.shape == (2, 2, 8, 4) and torch.equal(ka[:, :, 5:], k[:, :, :3])
    with pytest.raises(ValueError, match="max_len"):
        cache.layer(1).update(k, k)
    with pytest.raises(ValueError, match="max_len"):
        cache.advance(4)
    cache.reset()
    assert cache.pos == 0
    assert repr(cache) == "KVCache(layers=3, B=2, nh=2, max_len=8, hs=4, pos=0)"


@pytest.mark.parametrize("sizes", [(0, 1, 1, 1, 1), (1, 0, 1, 1, 1), (1, 1, 0, 1, 1), (1, 1, 1, 0, 1), (1, 1, 1, 1, 0)])
def test_kvcache_refuses_empty_sizes(sizes):
    with pytest.raises(ValueError, match="must be >= 1"):
        KVCache(*sizes)


def test_chunked_prefill_matches_one_pass():
    # Prefill 7 tokens, then 5 more in one call (T > 1 with P > 0: the case nanoGPTplus's mask got wrong),
    # then 1: the logits equal a single pass without the cache.
    model = tiny_gpt()
    x = prompts(B=2, T=13)
    full, _ = model(x)
    cache = model.new_kv_cache(2)
    parts = [model(x[:, a:b], kv_cache=cache)[0] for a, b in [(0, 7), (7, 12), (12, 13)]]
    assert cache.pos == 13
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_forward_refuses_to_overflow_the_cache():
    model = tiny_gpt(context_size=8)
    cache = model.new_kv_cache(1)
    model(prompts(B=1, T=8), kv_cache=cache)
    with pytest.raises(ValueError):
        model(prompts(B=1, T=1), kv_cache=cache)


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("bias", [True, False])
def test_greedy_same_tokens_with_and_without_cache(bias):
    model = tiny_gpt(bias=bias, context_size=32)
    x = prompts(B=3, T=5)
    a = generate(model, x, 20, top_k=1)
    b = generate(model, x, 20, top_k=1, use_kv_cache=True)
    assert a.shape == (3, 25) and torch.equal(a[:, :5], x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("bias", [True, False])
def test_greedy_parity_beyond_the_context_window(bias):
    model = tiny_gpt(bias=bias, context_size=8)
    x = prompts(B=2, T=5)
    want = x
    for _ in range(30):  # the definition: crop to the last context_size tokens at every step
        logits, _ = model(want[:, -8:])
        want = torch.cat([want, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generate(model, x, 30, temperature=0), want)
    assert torch.equal(generate(model, x, 30, temperature=0, use_kv_cache=True), want)
    half = generate(model, x, 30, temperature=0, use_kv_cache=True, overflow="half")
    assert half.shape == want.shape
    assert torch.equal(half[:, :8], want[:, :8])  # identical until the window of 8 is full


def test_prompt_longer_than_context_is_cropped():
    model = tiny_gpt(context_size=8)
    x = prompts(B=1, T=20)
    a = generate(model, x, 6, temperature=0)
    b = generate(model, x[:, -8:], 6, temperature=0, use_kv_cache=True)
    assert torch.equal(a[:, 20:], b[:, 8:])
    c = generate(model, x, 6, temperature=0, use_kv_cache=True)
    assert torch.equal(a, c)


def test_seeded_generation_is_repeatable_and_cache_agrees():
    model = tiny_gpt(context_size=12)
    x = prompts(B=2, T=3)
    run = lambda **kw: generate(model, x, 25, temperature=0.9, top_k=10, top_p=0.95,
                                generator=torch.Generator().manual_seed(7), **kw)
    a, b = run(), run()
    assert torch.equal(a, b)
    assert torch.equal(a, run(use_kv_cache=True))  # same draws: the logits agree closely enough
    assert not torch.equal(a, generate(model, x, 25, generator=torch.Generator().manual_seed(8)))


def test_batch_rows_are_independent():
    model = tiny_gpt(context_size=32)
    x = prompts(B=3, T=4)
    both = generate(model, x, 10, temperature=0, use_kv_cache=True)
    for b in range(3):
        assert torch.equal(generate(model, x[b:b + 1], 10, temperature=0, use_kv_cache=True), both[b:b + 1])


def test_stream_yields_columns_and_restores_training_mode():
    model = tiny_gpt()
    model.train()
    steps = list(stream(model, prompts(B=2, T=3), 4, temperature=0))
    assert len(steps) == 4 and all(s.shape == (2, 1) for s in steps)
    assert model.training
    assert torch.equal(generate(model, prompts(B=2, T=3), 0), prompts(B=2, T=3))


def test_bigram_generates():
    torch.manual_seed(0)
    model = BigramLanguageModel(11)
    out = generate(model, torch.zeros(2, 1, dtype=torch.long), 15, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 16) and out.max() < 11
    greedy = generate(model, torch.tensor([[3]]), 5, temperature=0)
    table = model.logits_table.weight
    for t in range(5):  # greedy bigram: next = argmax of the current token's row
        assert greedy[0, t + 1] == table[greedy[0, t]].argmax()
    with pytest.raises(ValueError, match="cache"):
        generate(model, torch.tensor([[3]]), 5, use_kv_cache=True)


@pytest.mark.parametrize("idx, n, kw, msg", [
    (torch.zeros(1, 0, dtype=torch.long), 5, {}, "empty"),
    (torch.zeros(4, dtype=torch.long), 5, {}, r"\(B, T\)"),
    (torch.zeros(1, 3), 5, {}, "LongTensor"),
    (torch.zeros(1, 3, dtype=torch.long), -1, {}, "max_new_tokens"),
    (torch.zeros(1, 3, dtype=torch.long), 5, dict(overflow="wrap"), "overflow"),
    (torch.zeros(1, 3, dtype=torch.long), 5, dict(top_p=2.0), "top_p"),
])
def test_bad_generation_args(idx, n, kw, msg):
    with pytest.raises(ValueError, match=msg):
        generate(tiny_gpt(), idx, n, **kw)


# ---------------------------------------------------------------- decoders


def test_gpt_decoders():
    model = tiny_gpt(context_size=8)
    seq = prompts(B=2, T=12)
    crop = model.decoder(2)
    want = model(seq[:, -8:])[0][:, -1]
    torch.testing.assert_close(crop(seq), want)
    cached = model.decoder(2, use_kv_cache=True)
    assert isinstance(cached, gpt.CachedDecoder) and cached.cache.pos == 0
    for L in range(3, 12):  # prefill, then one token per step, then past the window (exact)
        torch.testing.assert_close(cached(seq[:, :L]), model(seq[:, max(0, L - 8):L])[0][:, -1], atol=1e-5, rtol=1e-5)
    assert cached.cache.pos == 8
    with pytest.raises(ValueError, match="overflow must be one of"):
        model.decoder(2, overflow="wrap")
    with pytest.raises(ValueError, match="overflow must be one of"):
        gpt.CachedDecoder(model, 2, overflow="wrap")


def test_cached_decoder_starts_over_on_a_new_sequence():
    model = tiny_gpt(context_size=16)
    decode = model.decoder(1, use_kv_cache=True)
    a, b = prompts(B=1, T=5, seed=1), prompts(B=1, T=9, seed=2)
    decode(a)
    decode(torch.cat([a, b[:, :1]], 1))
    torch.testing.assert_close(decode(b), model(b)[0][:, -1], atol=1e-5, rtol=1e-5)  # not one token longer: prefill
    assert decode.cache.pos == 9


def test_half_overflow_prefills_half_a_window():
    model = tiny_gpt(context_size=8)
    decode = model.decoder(1, use_kv_cache=True, overflow="half")
    seq = prompts(B=1, T=10)
    for L in range(1, 9):
        decode(seq[:, :L])
    assert decode.cache.pos == 8
    out = decode(seq[:, :9])  # window full: restart from the last 4 tokens
    assert decode.cache.pos == 4
    torch.testing.assert_close(out, model(seq[:, 5:9])[0][:, -1], atol=1e-5, rtol=1e-5)


def test_bigram_decoder():
    model = BigramLanguageModel(7)
    seq = torch.tensor([[1, 2, 3], [4, 5, 6]])
    torch.testing.assert_close(model.decoder(2)(seq), model.logits_table.weight[[3, 6]])
    with pytest.raises(ValueError, match="no key-value cache"):
        model.decoder(2, use_kv_cache=True)


def test_a_given_decoder_is_used():
    model = BigramLanguageModel(5)

    def always_three(seq):
        logits = torch.zeros(seq.size(0), 5)
        logits[:, 3] = 100.0
        return logits

    out = generate(model, torch.zeros(2, 2, dtype=torch.long), 6, decoder=always_three)
    assert (out[:, 2:] == 3).all()
    with pytest.raises(ValueError, match="leave out decoder="):
        generate(model, torch.zeros(1, 1, dtype=torch.long), 2, decoder=always_three, use_kv_cache=True)
    with pytest.raises(TypeError):  # an option the model's decoder does not have
        generate(model, torch.zeros(1, 1, dtype=torch.long), 2, overflow="half")


def test_a_model_without_decoder_gets_a_clear_error():
    class Plain(torch.nn.Module):
        context_size = 1
        def forward(self, idx, last_only=False): return torch.zeros(idx.size(0), 1, 3), None

    with pytest.raises(TypeError, match="crop_decoder"):
        generate(Plain(), torch.zeros(1, 1, dtype=torch.long), 2)
    out = generate(Plain(), torch.zeros(1, 1, dtype=torch.long), 2, decoder=crop_decoder(Plain()))
    assert out.shape == (1, 3)


def test_model_generate_methods_equal_the_loop():
    model = tiny_gpt(context_size=8)
    x = prompts(B=2, T=3)
    for kw in [dict(), dict(use_kv_cache=True), dict(use_kv_cache=True, overflow="half")]:
        a = model.generate(x, 12, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(4), **kw)
        b = generate(model, x, 12, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(4), **kw)
        assert torch.equal(a, b)
    bigram = BigramLanguageModel(23)
    assert torch.equal(bigram.generate(x, 5, generator=torch.Generator().manual_seed(0)),
                       generate(bigram, x, 5, generator=torch.Generator().manual_seed(0)))


# ---------------------------------------------------------------- streaming text


class CountingTokenizer:
    "Counts the ids it is asked to decode; has `decode_bytes` only if the tokenizer it wraps has."
    def __init__(self, tokenizer):
        self.tokenizer, self.decoded, self.calls = tokenizer, 0, 0
        if hasattr(tokenizer, "decode_bytes"): self.decode_bytes = self._counted(tokenizer.decode_bytes)
        self.decode = self._counted(tokenizer.decode)

    def _counted(self, fn):
        def counted(ids):
            self.decoded, self.calls = self.decoded + len(ids), self.calls + 1
            return fn(ids)
        return counted


@pytest.fixture(scope="module")
def bpe():
    return GPT2Tokenizer()


def test_gpt2_decode_bytes(bpe):
    ids = bpe.encode("日本 🙂")
    assert bpe.decode_bytes(ids) == "日本 🙂".encode()
    assert bpe.decode_bytes(torch.tensor(ids)) == "日本 🙂".encode()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bpe.decode_bytes([bpe.vocab_size])


def test_text_stream_never_prints_half_a_character(bpe):
    text = "Café 日本語 🙂 done"
    ids = bpe.encode(text)
    assert len(ids) > len(text.split())  # some characters span several tokens
    s = TextStream(bpe)
    pieces = [s.add([i]) for i in ids]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + s.flush() == text
    assert s.add(bpe.encode("日")[:1]) == ""  # an unfinished character is held back...
    assert s.flush() == "\ufffd"  # ...and shown as U+FFFD at the end, as decode shows it
    assert s.add(torch.tensor([bpe.encode("ok")])) == "ok"  # a tensor, here (1, T), works too


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_text_stream_equals_decode_for_random_ids(bpe, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, bpe.vocab_size, (3000,), generator=g)
    ends = torch.randint(1, 5, (3000,), generator=g).cumsum(0)
    s = TextStream(bpe)
    out = "".join(s.add(chunk) for chunk in ids.tensor_split(ends[ends < len(ids)])) + s.flush()
    assert out == bpe.decode(ids)


def test_text_stream_with_the_character_tokenizer():
    tok = CharTokenizer("abc\nxyz é")
    ids = tok.encode("xyz\nabc é")
    s = TextStream(tok)
    assert "".join(s.add([i]) for i in ids) + s.flush() == "xyz\nabc é"


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_text_stream_work_is_linear(bpe, tokenizer):
    # 50,000 tokens one at a time: every id is decoded exactly once (re-decoding the text so far at every step,
    # as the old TextPrinter did, decodes n(n+1)/2 = 1.25e9 ids).
    base = bpe if tokenizer == "gpt2" else CharTokenizer("abcdefgh\n ")
    n = 50_000
    ids = torch.randint(0, base.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    counting = CountingTokenizer(base)
    s = TextStream(counting)
    out = "".join(s.add([i]) for i in ids) + s.flush()
    assert counting.decoded == n and counting.calls == n
    assert out == base.decode(ids)


# ---------------------------------------------------------------- decode layout


def test_decode_layout_keeps_values_names_and_ties():
    model = tiny_gpt(context_size=8)
    x = prompts(B=2, T=4)
    want = generate(model, x, 12, temperature=0)
    names = [n for n, _ in model.named_parameters()]
    to_decode_layout(model)
    assert [n for n, _ in model.named_parameters()] == names
    assert model.lm_head.weight is model.tok_emb.weight
    assert not model.blocks[0].attn.qkv.weight.is_contiguous() and model.blocks[0].attn.qkv.weight.t().is_contiguous()
    assert torch.equal(generate(model, x, 12, temperature=0, use_kv_cache=True), want)
    to_decode_layout(model, column_major=False)
    assert all(p.is_contiguous() for p in model.parameters())
