"Chapter 17b: exports to ONNX (onnxruntime round trip) and GGUF (llama.cpp round trip), and their refusals."
import errno
import math

import numpy as np
import pytest
import torch

from nanogpt_plus.fastgen import prepare_decoding
from nanogpt_plus.formats import (CacheStep, ExportError, OnnxDecoder, export_onnx, float_model, write_new_file)
from nanogpt_plus.gpt import GPT, GPTConfig
from nanogpt_plus.tokenizer import CharTokenizer

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
MODERN = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False, bias=False)
GQA = MODERN | dict(n_kv_head=2)  # chapter 17: 4 query heads share 2 key/value heads


def sharp_model(seed: int = 0, **options) -> GPT:
    "A random GPT whose weights are large enough that its next-token choices are clear (no near-ties)."
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=len(set(CORPUS)), context_size=256, n_layer=2, n_head=4, n_embd=32, **options)
    model = GPT(cfg).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if p.dim() == 2: p.mul_(4)  # N(0, 0.08) matrices: logits spread over several units
    return model


@torch.no_grad()
def greedy(model, prompt, n):
    cache, ids, out = model.new_kv_cache(1), list(prompt), []
    logits, _ = model(torch.tensor([prompt]), kv_cache=cache, last_only=True)
    for _ in range(n):
        out.append(logits[0, -1]); ids.append(int(logits[0, -1].argmax()))
        logits, _ = model(torch.tensor([ids[-1:]]), kv_cache=cache)
    return ids[len(prompt):], torch.stack(out).numpy()


def onnx_greedy(path, prompt, n, context_size):
    dec, ids, out = OnnxDecoder(path, context_size), list(prompt), []
    logits = dec(prompt)[-1]
    for _ in range(n):
        out.append(logits); ids.append(int(logits.argmax()))
        logits = dec(ids[-1:])[-1]
    return ids[len(prompt):], np.stack(out)


# --- writing files -------------------------------------------------------------------------------------------

def test_existing_file_refused_unless_overwrite(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_text("old")
    with pytest.raises(ExportError, match="already exists.*overwrite=True"): write_new_file(target, lambda t: t.write_text("new"))
    assert target.read_text() == "old"
    write_new_file(target, lambda t: t.write_text("new"), overwrite=True)
    assert target.read_text() == "new"


def test_failed_write_leaves_nothing_behind(tmp_path):
    def full_disk(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ExportError, match="No space left.*nothing was written"): write_new_file(tmp_path / "m.gguf", full_disk)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "m.gguf").write_text("old")
    with pytest.raises(ExportError, match="old file is unchanged"): write_new_file(tmp_path / "m.gguf", full_disk, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and (tmp_path / "m.gguf").read_text() == "old"


def test_bad_paths(tmp_path):
    with pytest.raises(ExportError, match="is a directory"): write_new_file(tmp_path, lambda t: None)
    with pytest.raises(ExportError, match="does not exist: create it"): write_new_file(tmp_path / "no" / "m.onnx", lambda t: None)


def test_export_onnx_refuses_existing_file_and_other_models(tmp_path):
    (tmp_path / "m.onnx").write_text("old")
    with pytest.raises(ExportError, match="already exists"): export_onnx(sharp_model(), tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_text() == "old"
    with pytest.raises(ExportError, match="only a GPT"): export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")


# --- int8 models are de-quantized --------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", [False, True], ids=["pytorch-layout", "kernel-layout"])
@pytest.mark.parametrize("options", [{}, MODERN], ids=["tied", "untied"])
def test_float_model_dequantizes_int8(kernel, options):
    model = sharp_model(**options)
    int8 = prepare_decoding(sharp_model(**options), "int8", kernel=kernel)
    plain = float_model(int8)
    assert isinstance(plain.blocks[0].attn.qkv, torch.nn.Linear)
    torch.testing.assert_close(plain.blocks[1].mlp.fc.weight, int8.blocks[1].mlp.fc.dense())
    x = torch.randint(0, model.config.vocab_size, (1, 40))  # > 32 rows: the int8 layer multiplies by the dense matrix
    torch.testing.assert_close(plain(x)[0], int8(x)[0], atol=1e-5, rtol=1e-5)
    assert float_model(model) is model  # a float32 model is exported as it is


# --- ONNX ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, MODERN, GQA, MODERN | dict(qk_norm=True, mlp="relu2", logit_softcap=10.0)],
                         ids=["gpt2-block", "modern", "grouped-query", "every-option"])
def test_cache_step_matches_forward(options):
    model = sharp_model(**options)
    c = model.config
    ids = torch.randint(0, c.vocab_size, (2, 12))
    nkv = c.n_kv_head or c.n_head  # the cache holds the key/value heads only
    empty = torch.zeros(c.n_layer, 2, nkv, 0, c.n_embd // c.n_head)
    a, k, v = CacheStep(model)(ids[:, :7], empty, empty)
    b, k, v = CacheStep(model)(ids[:, 7:], k, v)
    torch.testing.assert_close(torch.cat([a, b], 1), model(ids)[0], atol=1e-5, rtol=1e-5)
    assert k.shape == (c.n_layer, 2, nkv, 12, c.n_embd // c.n_head)


@pytest.mark.parametrize("options", [{}, MODERN, GQA, MODERN | dict(qk_norm=True, mlp="relu2", logit_softcap=10.0)],
                         ids=["gpt2-block", "modern", "grouped-query", "every-option"])
def test_onnx_greedy_200_tokens(tmp_path, options):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install nanogpt-plus[interop])")
    model = sharp_model(**options)
    path = export_onnx(model, tmp_path / "m.onnx")
    prompt = CharTokenizer(CORPUS).encode("First Citizen:\n")
    ours, our_logits = greedy(model, prompt, 200)
    theirs, their_logits = onnx_greedy(path, prompt, 200, model.context_size)
    assert ours == theirs
    assert np.abs(our_logits - their_logits).max() < 1e-4
    assert np.ptp(our_logits, axis=0).max() > 0.1  # the logits move from step to step: the cache's contents matter


def test_onnx_batch_and_context_limit(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install nanogpt-plus[interop])")
    import onnxruntime
    model = sharp_model(**MODERN)
    path = export_onnx(model, tmp_path / "m.onnx")
    c = model.config
    ids = torch.randint(0, c.vocab_size, (3, 9))
    empty = np.zeros((c.n_layer, 3, c.n_head, 0, c.n_embd // c.n_head), np.float32)
    logits, *_ = onnxruntime.InferenceSession(str(path)).run(None, {"input_ids": ids.numpy(), "past_keys": empty, "past_values": empty})
    np.testing.assert_allclose(logits, model(ids)[0].numpy(), atol=1e-4)
    dec = OnnxDecoder(path, context_size=8)
    with pytest.raises(ValueError, match="exceed the context size 8"): dec(list(range(9)))


# --- GGUF ----------------------------------------------------------------------------------------------------

from nanogpt_plus.attention import Rotary  # noqa: E402
from nanogpt_plus.formats import (GGUF_DTYPES, bpe_merges, export_gguf, gguf_architecture, gguf_tokenizer,  # noqa: E402
                                  interleave_rope_rows)

QWEN3 = MODERN | dict(qk_norm=True)


@pytest.mark.parametrize("options,arch", [({}, "gpt2"), (MODERN, "llama"), (GQA, "llama"), (QWEN3, "qwen3")])
def test_gguf_architecture(options, arch):
    assert gguf_architecture(sharp_model(**options).config) == arch


@pytest.mark.parametrize("options,named", [(MODERN | dict(mlp="relu2"), "relu2"), (dict(logit_softcap=30.0), "logit_softcap"),
                                           (dict(pos_emb="rope"), "pos_emb='rope'"), (dict(qk_norm=True), "qk_norm"),
                                           (MODERN | dict(bias=True), "bias=True"), (dict(n_kv_head=2), "n_kv_head=2")])
def test_gguf_refuses_what_llama_cpp_cannot_express(tmp_path, options, named):
    with pytest.raises(ExportError, match=named): export_gguf(sharp_model(**options), None, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_gguf_bad_arguments(tmp_path):
    with pytest.raises(ExportError, match="dtype must be one of f32, f16, q8_0"): export_gguf(sharp_model(), None, tmp_path / "m.gguf", dtype="q4")
    (tmp_path / "m.gguf").write_text("old")
    with pytest.raises(ExportError, match="already exists"): export_gguf(sharp_model(), None, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_text() == "old"
    with pytest.raises(ExportError, match="several bytes"): gguf_tokenizer(CharTokenizer("abcé"), 4)
    with pytest.raises(ExportError, match="do not belong together"): gguf_tokenizer(CharTokenizer(CORPUS), 5)


def test_rope_permutation_turns_adjacent_pairs_like_ours():
    "Rows reordered by interleave_rope_rows and turned in adjacent pairs give our rotated-halves result, reordered."
    torch.manual_seed(0)
    nh, hs = 3, 8
    q = torch.randn(1, nh, 5, hs)  # (B, nh, T, hs): one projection's output per head
    ours, _ = Rotary(hs)(q, q, past=2)
    flat = q.transpose(1, 2).reshape(5, nh * hs).T  # (nh*hs, T): rows as a projection's rows
    p = interleave_rope_rows(flat, nh).T.reshape(1, 5, nh, hs).transpose(1, 2)  # (B, nh, T, hs) in llama.cpp's order
    a = Rotary(hs).angles(2, 5)  # (T, hs/2)
    x1, x2 = p[..., 0::2], p[..., 1::2]
    theirs = torch.stack([x1 * a.cos() - x2 * a.sin(), x1 * a.sin() + x2 * a.cos()], -1).flatten(-2)
    order = interleave_rope_rows(torch.arange(nh * hs)[:, None], nh).flatten()[:hs]
    torch.testing.assert_close(theirs, ours[..., order])


@pytest.mark.parametrize("options", [{}, MODERN, QWEN3], ids=["gpt2", "llama", "qwen3"])
@pytest.mark.parametrize("dtype", GGUF_DTYPES)
def test_gguf_file_reads_back(tmp_path, options, dtype):
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install nanogpt-plus[interop])")
    model, tok = sharp_model(**options), CharTokenizer(CORPUS)
    path = export_gguf(model, tok, tmp_path / "m.gguf", dtype=dtype)
    r = gguf.GGUFReader(path)
    arch = gguf_architecture(model.config)
    assert r.fields["general.architecture"].contents() == arch
    assert r.fields[f"{arch}.block_count"].contents() == 2 and r.fields[f"{arch}.attention.head_count"].contents() == 4
    assert r.fields["tokenizer.ggml.tokens"].contents() == [ch.replace("\n", "Ċ").replace(" ", "Ġ") for ch in tok.chars]
    tensors = {t.name: t for t in r.tensors}
    assert all(t.data_offset % 32 == 0 for t in r.tensors)
    emb = tensors["token_embd.weight"]
    want = model.tok_emb.weight.numpy()
    if dtype == "f32": np.testing.assert_array_equal(emb.data, want)
    if dtype == "f16": np.testing.assert_array_equal(emb.data, want.astype(np.float16))
    if dtype == "q8_0":
        back = gguf.quants.dequantize(emb.data, emb.tensor_type).reshape(want.shape)
        assert np.abs(back - want).max() <= np.abs(want).max() / 127  # one int8 step of the largest block at most
    assert ("output.weight" in tensors) == (not model.config.tie_embeddings)


def test_gpt2_merges_reproduce_tiktoken():
    "Byte-pair encoding with the recovered merge list gives tiktoken's ids."
    tiktoken = pytest.importorskip("tiktoken")
    try: enc = tiktoken.get_encoding("gpt2")
    except Exception: pytest.skip("tiktoken's GPT-2 vocabulary is not cached (tools/seed_offline_caches.py)")
    ranks = enc._mergeable_ranks
    merge_rank = {a + b: i for i, (a, b) in enumerate(bpe_merges(ranks))}
    def encode_word(word: bytes):
        parts = [word[i:i + 1] for i in range(len(word))]
        while len(parts) > 1:
            best, i = min((merge_rank.get(a + b, math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
            if best == math.inf: break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [ranks[p] for p in parts]
    for word in [b" Shakespeare", b" tokenization", b"Hello", b" 1234", b"\xc3\xa9t\xc3\xa9"]:
        assert encode_word(word) == enc.encode_ordinary(word.decode()), word


# --- llama.cpp round trips (llama-cpp-python compiles llama.cpp: an optional extra) ------------------------------

def llama_cpp_or_skip():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install nanogpt-plus[interop])")


def open_llama(path, **kwargs):
    "llama-cpp-python's Llama without llama.cpp's extra buffer types: their AMX int8 kernels crash (SIGILL) on CPUs that report AMX where the OS has not enabled it."
    llama_cpp = llama_cpp_or_skip()
    import llama_cpp.llama as module
    default = module.llama_cpp.llama_model_default_params
    def params():
        p = default(); p.use_extra_bufts = False; return p
    module.llama_cpp.llama_model_default_params = params
    try: return llama_cpp.Llama(str(path), verbose=False, **kwargs)
    finally: module.llama_cpp.llama_model_default_params = default


def llama_greedy(path, prompt, n):
    llm = open_llama(path, n_ctx=256, n_threads=1, logits_all=True, type_k=0, type_v=0)  # a float32 cache, as ours
    llm.eval(prompt)
    ids, out = list(prompt), []
    for _ in range(n):
        logits = np.array(llm.scores[llm.n_tokens - 1]); out.append(logits); ids.append(int(logits.argmax()))
        llm.eval(ids[-1:])
    return ids[len(prompt):], np.stack(out)


@pytest.mark.parametrize("options", [{}, MODERN, GQA, QWEN3], ids=["gpt2", "llama", "llama-gqa", "qwen3"])
def test_llama_cpp_greedy_equals_ours_f32(tmp_path, options):
    llama_cpp_or_skip()
    model, tok = sharp_model(**options), CharTokenizer(CORPUS)
    path = export_gguf(model, tok, tmp_path / "m.gguf")
    prompt = tok.encode("First Citizen:\n")
    ours, our_logits = greedy(model, prompt, 100)
    theirs, their_logits = llama_greedy(path, prompt, 100)
    assert ours == theirs
    assert np.abs(our_logits - their_logits).max() < 1e-3  # llama.cpp's own float32 kernels


def test_llama_cpp_needs_the_rope_permutation(tmp_path, monkeypatch):
    "Without reordering the q/k rows, llama.cpp's llama runs another model: the permutation is what makes it ours."
    llama_cpp_or_skip()
    import nanogpt_plus.formats as formats
    model, tok = sharp_model(**MODERN), CharTokenizer(CORPUS)
    monkeypatch.setattr(formats, "interleave_rope_rows", lambda w, n_head: w)
    path = export_gguf(model, tok, tmp_path / "m.gguf")
    prompt = tok.encode("First Citizen:\n")
    _, our_logits = greedy(model, prompt, 20)
    _, their_logits = llama_greedy(path, prompt, 20)
    assert np.abs(our_logits - their_logits).max() > 1e-2


def test_llama_cpp_tokenizes_like_ours(tmp_path):
    llama_cpp_or_skip()
    tok = CharTokenizer(CORPUS)
    path = export_gguf(sharp_model(), tok, tmp_path / "m.gguf")
    llm = open_llama(path, n_ctx=64, vocab_only=True)
    assert llm.tokenize(CORPUS.encode(), add_bos=False, special=False) == tok.encode(CORPUS)


def test_llama_cpp_tokenizes_gpt2_bpe_like_tiktoken(tmp_path):
    llama_cpp_or_skip()
    from nanogpt_plus.tokenizer import GPT2Tokenizer
    try: tok = GPT2Tokenizer()
    except ConnectionError: pytest.skip("tiktoken's GPT-2 vocabulary is not cached (tools/seed_offline_caches.py)")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, context_size=64, n_layer=1, n_head=2, n_embd=32, bias=False)).eval()
    path = export_gguf(model, tok, tmp_path / "m.gguf", dtype="f16")
    llm = open_llama(path, n_ctx=64, vocab_only=True)
    text = "First Citizen:\nBefore we proceed any further, hear me speak.  Ça va? 1234 <|endoftext|>"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text)


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_llama_cpp_smaller_weights_stay_close(tmp_path, dtype):
    llama_cpp_or_skip()
    model, tok = sharp_model(**MODERN), CharTokenizer(CORPUS)
    path = export_gguf(model, tok, tmp_path / "m.gguf", dtype=dtype)
    prompt = tok.encode("First Citizen:\n")
    _, our_logits = greedy(model, prompt, 20)
    _, their_logits = llama_greedy(path, prompt, 20)
    assert np.abs(our_logits - their_logits).max() < (0.05 if dtype == "f16" else 0.2)
    assert path.stat().st_size < export_gguf(model, tok, tmp_path / "f32.gguf").stat().st_size * (0.6 if dtype == "f16" else 0.4)
