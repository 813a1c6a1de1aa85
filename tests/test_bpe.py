"""Byte-pair encoding (chapter 02b): training, exactness against tiktoken's `gpt2`, the fast path, files, bad input.

No test needs the network: GPT-2's `vocab.bpe` and `encoder.json` come from tiktoken's cache (an offline machine
seeds it with tools/seed_offline_caches.py), tiny-shakespeare from the book's cache.
"""
import json
import random
from collections import Counter

import pytest
import regex
import tiktoken
import tiktoken.load
import torch

from nanogpt_plus.bpe import (ENDOFTEXT, GPT2_SPLIT_PATTERN, BPETokenizer, apply_merges, check_text, gpt2_byte_chars,
                              gpt2_merges, learn_merges, merge_pair, split_chunks, split_specials, train_merges,
                              vocab_bytes)
from nanogpt_plus.data import tiny_shakespeare
from nanogpt_plus.tokenizer import CharTokenizer, GPT2Tokenizer

# Accents (composed and combining), many scripts, emoji (skin tone, family, flag, variation selector), astral
# letters, every kind of white-space run, contractions in all spellings, numerals, control characters, the special.
STRESS = (
    "Café, naïve, Ångström, façade; cafe\u0301 with a combining accent. Ελληνικά русский עברית العربية हिन्दी ไทย\n"
    "東京は大きい。北京欢迎你！서울 🎭🎉👍🏽👩‍👩‍👧 🇫🇷 ❤️ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0001F600\n"
    "It's it'S IT'S you're we've I'm they'll he'd 'tis rock'n'roll O'Neil's it’s 's 'S '\n"
    "spaces:   three,\ttab,\t\ttwo tabs, trailing   \n\n\n\r\n \u00a0no-break \u3000ideographic\u2028"
    "line\x85next\x0bvt\x0cff\x1cfs\n   \n \t \n"
    "numbers: 1234567890 3.14159 1,000,000 ٣٤٥ ²³ ½ Ⅻ 0x1F\n"
    "odd: \x00\x01\x7f \ufeffBOM \u200bzwsp \ufffd \uffff \U0010ffff <|endoftext|> <|endoftext|><|endoftext|> end   "
)
FRAGMENTS = [*"aZé \t\n\r'.,!?1２٣-_", "  ", "   ", "\n\n", "'s", "'ll", "'S", "’s", "🎭", "👩‍👩‍👧", "東京", "\u00a0",
             "\u3000", "\x1c", "\x85", "\u2028", "e\u0301", "\ufeff", "\U0001d518", "the", " the", "<|endoftext|>"]


def random_strings(n, seed=0):
    rng = random.Random(seed)
    for _ in range(n): yield "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 40)))


def recount_merges(pieces: Counter, n_merges):
    "Reference training: recount every pair before each merge; ties go to the smaller pair."
    seqs = {p: list(p.encode("utf-8")) for p in pieces}
    merges = []
    for new_id in range(256, 256 + n_merges):
        counts = Counter()
        for p, ids in seqs.items():
            for pair in zip(ids, ids[1:]): counts[pair] += pieces[p]
        if not counts: break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        seqs = {p: merge_pair(ids, best, new_id) for p, ids in seqs.items()}
    return merges


@pytest.fixture(scope="module")
def text():
    return tiny_shakespeare()


@pytest.fixture(scope="module")
def gpt2():
    return BPETokenizer.from_gpt2()


@pytest.fixture(scope="module")
def reference():
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def tok(text):
    return BPETokenizer.train(text, 4096)


def test_merge_pair_scans_left_to_right():
    assert merge_pair([1, 2, 3, 1, 2], (1, 2), 256) == [256, 3, 256]
    assert merge_pair([7, 7, 7], (7, 7), 256) == [256, 7]
    assert merge_pair([7, 7, 7, 7, 7], (7, 7), 256) == [256, 256, 7]
    assert merge_pair([], (1, 2), 256) == []


@pytest.mark.parametrize("corpus", ["shakespeare", "ties", "raw"])
def test_incremental_training_equals_recounting(text, corpus):
    pieces = {"shakespeare": Counter(regex.findall(GPT2_SPLIT_PATTERN, text[:30_000])),
              "ties": Counter(["aaaa", "abab", "baba", "aaab", "zz zz", "aaaaaaa"]),
              "raw": Counter([text[:8_000]])}[corpus]
    merges, n_tokens = learn_merges(pieces, 150)
    assert merges == recount_merges(pieces, 150)
    assert n_tokens[0] == sum(len(p.encode()) * n for p, n in pieces.items())
    ranks = {pair: 256 + i for i, pair in enumerate(merges)}
    assert n_tokens[-1] == sum(len(apply_merges(list(p.encode()), ranks)) * n for p, n in pieces.items())


def test_trained_tokenizer(text, tok):
    assert tok.vocab_size == 4096 and len(tok.merges) == 4096 - 257 and tok.eot_token == 4095
    assert tok.kind == "bpe" and tok.special_tokens == {"<|endoftext|>": 4095}
    assert len(set(tok.vocab)) == len(tok.vocab) == 4095
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 3  # 4,096 tokens compress Shakespeare more than 3x
    assert tok.encode("<|endoftext|>") == [4095] and tok.decode([4095]) == "<|endoftext|>"


def test_smaller_vocabulary_is_a_prefix(text):
    small, large = BPETokenizer.train(text[:100_000], 400), BPETokenizer.train(text[:100_000], 700)
    assert small.merges == large.merges[:len(small.merges)]


def test_special_tokens_are_never_learned(text):
    docs = "<|endoftext|>".join(text[i:i + 200] for i in range(0, 40_000, 200))
    tok = BPETokenizer.train(docs, 600, special_tokens=("<|endoftext|>", "<|pad|>"))
    assert tok.special_tokens == {"<|endoftext|>": 598, "<|pad|>": 599} and tok.eot_token == 598
    assert not any(b"endof" in t or b"<|" in t for t in tok.vocab)
    ids = tok.encode("a<|pad|>b<|endoftext|>")
    assert ids[1] == 599 and ids[-1] == 598 and tok.decode(ids) == "a<|pad|>b<|endoftext|>"
    assert BPETokenizer.train(text[:10_000], 300, special_tokens=()).eot_token is None


def test_gpt2_equals_tiktoken_on_tiny_shakespeare(text, gpt2, reference):
    assert gpt2.vocab_size == reference.n_vocab == 50257 and gpt2.eot_token == reference.eot_token == 50256
    ids = gpt2.encode(text)
    assert ids == reference.encode(text)
    assert gpt2.decode(ids) == text


def test_gpt2_equals_tiktoken_on_stress_text(gpt2, reference):
    ids = gpt2.encode(STRESS)
    assert ids == reference.encode(STRESS, allowed_special="all") == GPT2Tokenizer().encode(STRESS)
    assert gpt2.decode(ids) == STRESS


def test_gpt2_equals_tiktoken_on_every_code_point(gpt2, reference):
    # Each code point twice, space-separated, in blocks: every character class of the split pattern is exercised
    # and compared between Python's `regex` and tiktoken's Rust regex engine.
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    for start in range(0, len(cps), 1024):
        s = " ".join(chr(c) * 2 for c in cps[start:start + 1024])
        assert gpt2.encode(s) == reference.encode_ordinary(s), f"code points from U+{cps[start]:04X}"


def test_random_strings_match_and_round_trip(gpt2, reference, tok):
    fast = tok.to_tiktoken()
    for s in random_strings(3000):
        ids = gpt2.encode(s)
        assert ids == reference.encode(s, allowed_special="all"), repr(s)
        assert gpt2.decode(ids) == s, repr(s)
        ours = tok.encode(s)
        assert ours == fast.encode(s, allowed_special="all"), repr(s)
        assert tok.decode(ours) == s, repr(s)


def test_fast_path_agrees_with_teaching_path(text, tok, gpt2, reference):
    fast = tok.to_tiktoken()
    assert isinstance(fast, tiktoken.Encoding) and fast.n_vocab == 4096 and fast.eot_token == 4095
    for s in (text, STRESS, ""):
        assert fast.encode(s, allowed_special="all") == tok.encode(s)
    assert fast.decode(tok.encode(STRESS)) == STRESS
    assert gpt2.to_tiktoken().encode(STRESS, allowed_special="all") == reference.encode(STRESS, allowed_special="all")
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    s = " ".join(chr(c) * 2 for c in cps[:20_000])
    assert fast.encode_ordinary(s) == tok.encode(s)


def test_surrogates_are_refused(gpt2, tok):
    for s in ["a\ud800b", "caf\udce9", "\ud83c\udfad", "x" * 50 + "\udfff"]:
        for t in (gpt2, tok):
            with pytest.raises(ValueError, match="holds the surrogate"): t.encode(s)
        with pytest.raises(ValueError, match="holds the surrogate"): BPETokenizer.train("abc " + s, 300)
    with pytest.raises(ValueError, match=r"index 3"): tok.encode("caf\udce9")


def test_decode(tok):
    ids = tok.encode("naïve 🎭")
    assert tok.decode(torch.tensor(ids)) == "naïve 🎭"
    assert tok.decode_bytes(ids) == "naïve 🎭".encode("utf-8")
    emoji = tok.encode("🎭")
    assert len(emoji) == 4 and tok.decode(emoji[:2]) == "\ufffd"  # part of a character: replaced, as in tiktoken
    with pytest.raises(ValueError, match="outside the vocabulary"): tok.decode([4096])
    with pytest.raises(ValueError, match="outside the vocabulary"): tok.decode([-1])


def test_save_and_load(tmp_path, tok, gpt2, reference, text):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    saved = json.loads(path.read_text(encoding="utf-8"))  # plain JSON, nothing pickled
    assert saved["type"] == "bpe" and saved["special_tokens"] == ["<|endoftext|>"]
    assert saved["pattern"] == GPT2_SPLIT_PATTERN and len(saved["merges"]) == 3839 and saved["byte_ids"] == list(range(256))
    loaded = BPETokenizer.load(path)
    assert loaded.merges == tok.merges and loaded.vocab_size == 4096 and loaded.encode(STRESS) == tok.encode(STRESS)
    gpt2.save(path)
    assert BPETokenizer.load(path).encode(STRESS) == reference.encode(STRESS, allowed_special="all")
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, no debris


def test_load_rejects_other_and_broken_files(tmp_path, tok):
    path = tmp_path / "tokenizer.json"
    CharTokenizer("abc").save(path)
    with pytest.raises(ValueError, match="holds a 'char' tokenizer, not a byte-pair"): BPETokenizer.load(path)
    GPT2Tokenizer().save(path)
    with pytest.raises(ValueError, match="holds a 'gpt2' tokenizer"): BPETokenizer.load(path)
    tok.save(path)
    good = json.loads(path.read_text())
    for broken in [{k: v for k, v in good.items() if k != "merges"}, {**good, "merges": [[5000, 1]]},
                   {**good, "merges": [[97, 98], [97, 98]]}, {**good, "byte_ids": [0] * 256},
                   {**good, "pattern": "(unclosed"}, {**good, "special_tokens": ["<|x|>", "<|x|>"]},
                   {**good, "merges": 7}]:
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match="not a valid bpe tokenizer file"): BPETokenizer.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer file"): BPETokenizer.load(path)
    with pytest.raises(FileNotFoundError, match="does not exist"): BPETokenizer.load(tmp_path / "missing.json")


def test_training_errors(text):
    with pytest.raises(ValueError, match="at least 257"): BPETokenizer.train(text, 256)
    with pytest.raises(ValueError, match="at least 258"): BPETokenizer.train(text, 257, special_tokens=("<|a|>", "<|b|>"))
    assert BPETokenizer.train(text, 256, special_tokens=()).vocab_size == 256
    with pytest.raises(ValueError, match="empty text"): BPETokenizer.train("", 1000)
    with pytest.raises(ValueError, match=r"ran out of pairs to merge after 2 merges: ask for vocab_size <= 259"):
        BPETokenizer.train("abab", 1000)
    with pytest.raises(ValueError, match="not a valid regular expression"): BPETokenizer.train(text, 300, pattern="(")
    with pytest.raises(ValueError, match="distinct, non-empty"): BPETokenizer.train(text, 300, special_tokens=("",))


def test_a_pattern_that_skips_characters_is_refused():
    tok = BPETokenizer([], pattern=r"\p{L}+")
    assert tok.encode("ab") == [97, 98]
    with pytest.raises(ValueError, match="skips some characters"): tok.encode("a b")
    with pytest.raises(ValueError, match="skips some characters"): BPETokenizer.train("a b", 300, pattern=r"\p{L}+")
    with pytest.raises(ValueError, match="not a valid regular expression"): BPETokenizer([], pattern="(")


def test_split_helpers(text):
    assert "".join(split_chunks(text + STRESS)) == text + STRESS
    assert split_specials("a<|endoftext|>b", [ENDOFTEXT]) == ["a", ENDOFTEXT, "b"]
    assert split_specials("x<|a|>b<|a|>", ["<|a|>", "<|a|>b"]) == ["x", "<|a|>b", "", "<|a|>", ""]
    assert split_specials("<|a|>", []) == ["<|a|>"]
    assert check_text(STRESS) is STRESS
    assert train_merges("ab<|endoftext|>ab", 258) == [(97, 98)]


def test_gpt2_files():
    chars = gpt2_byte_chars()
    assert len(set(chars)) == 256 and all(c.isprintable() and not c.isspace() for c in chars)
    assert chars[32] == "Ġ" and chars[10] == "Ċ" and chars[ord("A")] == "A"
    merges, byte_ids = gpt2_merges()
    assert len(merges) == 50_000 and sorted(byte_ids) == list(range(256))
    assert byte_ids[ord("!")] == 0 and byte_ids[ord(" ")] == 220
    assert vocab_bytes(merges, byte_ids)[256:258] == [b" t", b" a"]


def test_gpt2_offline_error_says_what_to_do(tmp_path, monkeypatch):
    import requests

    def offline(url): raise requests.ConnectionError(f"cannot reach {url}")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    with pytest.raises(ConnectionError, match="connect to the internet once.*seed_offline_caches"):
        BPETokenizer.from_gpt2()
