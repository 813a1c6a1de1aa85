"Chapter 16: the decode kernels, int8 weights, prepared models, the fast decode step, quantized checkpoints, the CLI."
import copy
import json
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from nanogpt_plus import fastgen
from nanogpt_plus.bigram import generate
from nanogpt_plus.checkpoint import CheckpointError, commit, save_checkpoint
from nanogpt_plus.cli import main
from nanogpt_plus.fastgen import (DECODE_DTYPES, DecodeEmbedding, DecodeLinear, FastDecoder, block_rows,
                                  decode_kernels, fast_step_supported, kv_cache_bytes, load_quantized, perplexity,
                                  prepare_decoding, quantize_weight, save_quantized, time_rounds, unblock_rows,
                                  weight_bytes)
from nanogpt_plus.gpt import OVERFLOW_MODES, GPT, CachedDecoder, GPTConfig
from nanogpt_plus.tokenizer import CharTokenizer

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
X86_WITH_CC = platform.machine().lower() in ("x86_64", "amd64") and os.name == "posix" and shutil.which("cc")


def small_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**dict(vocab_size=65, context_size=32, n_layer=2, n_head=4, n_embd=64), **kw})).eval()


def test_kernels_are_built_where_they_can_be():
    "On x86-64 with a C compiler the kernels must build: a broken kernel must fail here, not fall back unseen."
    k = decode_kernels()
    if X86_WITH_CC: assert set(k.matvec) == {torch.float32, torch.bfloat16, torch.int8}, k.problem
    else: assert k.matvec or k.problem


@pytest.mark.skipif(not X86_WITH_CC, reason="the C kernels are for x86-64 with a C compiler")
@pytest.mark.parametrize("N, K, M", [(1, 1, 1), (3, 17, 2), (4, 16, 1), (13, 40, 3), (7, 3072, 1), (50257, 64, 1),
                                     (33, 800, 32)])
def test_kernels_match_torch(N, K, M):
    g = torch.Generator().manual_seed(N * K + M)
    w, b, x = torch.randn(N, K, generator=g), torch.randn(N, generator=g), torch.randn(M, K, generator=g)
    q, s = quantize_weight(w)
    for weight, scale, dense in ((w, None, w), (w.bfloat16(), None, w.bfloat16().float()), (q, s, q.float() * s[:, None])):
        layer = DecodeLinear(weight, scale, b)
        assert layer.kernel
        want = x @ dense.t() + b
        torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-5 * (1 + want.abs().max().item()))


@pytest.mark.parametrize("dtype", list(DECODE_DTYPES.values()))
@pytest.mark.parametrize("N, K", [(1, 1), (5, 70), (8, 64), (65, 96)])
def test_block_rows_round_trip(dtype, N, K):
    w = (torch.arange(N * K).view(N, K) % 251 - 125).to(dtype)
    b = block_rows(w)
    C = 64 // w.element_size()
    assert b.shape == (-(-N // 4), -(-K // C), 4, C) and b.is_contiguous()
    assert torch.equal(unblock_rows(b, N, K), w)
    assert torch.equal(b[0, 0, 1, :min(C, K)], w[1, :C]) if N > 1 else True  # row 1's first cache line, second
    assert b.float().sum() == w.float().sum()  # the padding is zeros


@pytest.mark.parametrize("dtype", list(DECODE_DTYPES.values()))
@pytest.mark.parametrize("kernel", [True, False])
def test_decode_linear_every_path(dtype, kernel):
    "One row and many, with and without bias, the kernel and PyTorch's paths: the product of the stored weights."
    torch.manual_seed(0)
    for bias in (True, False):
        lin = nn.Linear(64, 24, bias=bias)
        layer = DecodeLinear.from_linear(lin, dtype, kernel)
        rounded_inputs = not layer.kernel and dtype != torch.float32  # PyTorch's bf16 and int8 CPU paths take bf16
        for shape in ((1, 1, 64), (2, 3, 64), (40, 64)):  # 40 rows: above KERNEL_ROWS, an ordinary product
            x = torch.randn(*shape)
            want = F.linear(x, layer.dense(), lin.bias)
            tol = (2e-2 if rounded_inputs and x.numel() // 64 <= fastgen.KERNEL_ROWS else 1e-5) * want.abs().max().item()
            torch.testing.assert_close(layer(x), want, rtol=0, atol=tol)
            assert layer(x).dtype == torch.float32 and layer(x).shape == (*shape[:-1], 24)


def test_kernels_unavailable_falls_back(monkeypatch, tmp_path):
    "No compiler: `decode_kernels` says why, and layers use PyTorch's kernels with the same results."
    monkeypatch.setenv("CC", "no-such-compiler-here")
    monkeypatch.setenv("NANOGPT_PLUS_HOME", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    decode_kernels.cache_clear()
    try:
        k = decode_kernels()
        assert k.matvec == {} and k.problem
        lin = nn.Linear(32, 8)
        layer = DecodeLinear.from_linear(lin, torch.float32)
        assert not layer.kernel
        x = torch.randn(1, 32)
        torch.testing.assert_close(layer(x), lin(x))
        assert list(tmp_path.iterdir()) == []  # nothing written
    finally:
        decode_kernels.cache_clear()


@pytest.mark.skipif(not X86_WITH_CC, reason="the C kernels are for x86-64 with a C compiler")
def test_kernels_are_built_with_openmp_where_the_compiler_has_it():
    "gcc has -fopenmp: a build that lost it would run on one thread unseen."
    if shutil.which("gcc") and os.path.realpath(shutil.which(os.environ.get("CC", "cc"))) == os.path.realpath(shutil.which("gcc")):
        assert decode_kernels().openmp


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(not X86_WITH_CC, reason="the C kernels are for x86-64 with a C compiler")
@pytest.mark.parametrize("dtype", list(DECODE_DTYPES.values()))
def test_kernels_same_bits_with_any_number_of_threads(dtype, monkeypatch, two_threads):
    "Each output row is one thread's sum in a fixed order: 1, 2 and 3 threads give the same bits, odd sizes too."
    monkeypatch.setattr(fastgen, "THREAD_BYTES", 1)  # threads even for the small matrices of a test
    g = torch.Generator().manual_seed(0)
    for N, K, M in [(3, 17, 1), (37, 200, 2), (1000, 768, 1), (257, 96, 16)]:
        lin = nn.Linear(K, N)
        with torch.no_grad(): lin.weight.copy_(torch.randn(N, K, generator=g))
        layer, x = DecodeLinear.from_linear(lin, dtype), torch.randn(M, K, generator=g)
        ys = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert fastgen.kernel_threads(layer.weight.numel() * layer.weight.element_size()) == n
            ys.append(layer(x))
        assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2]), (N, K, M)
        torch.testing.assert_close(ys[0], F.linear(x, layer.dense(), lin.bias), rtol=0, atol=1e-4 * ys[0].abs().max().item())


@pytest.mark.parametrize("dtype", list(DECODE_DTYPES))
def test_generation_same_logits_and_tokens_with_1_and_2_threads(dtype, monkeypatch, two_threads):
    "A whole generation, prompt and steps: the logits bit for bit and the tokens, on one thread and on two."
    monkeypatch.setattr(fastgen, "THREAD_BYTES", 1)
    m = prepare_decoding(small_gpt(n_embd=96, context_size=24), dtype)
    prompt = torch.randint(0, 65, (2, 20), generator=torch.Generator().manual_seed(4))  # 20 rows: the kernel's path
    runs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        dec = FastDecoder(m, 2)
        with torch.inference_mode():
            logits = [dec(prompt[:, :L]) for L in range(6, 21)]
            tokens = generate(m, prompt[:, :5], 40, temperature=0, decoder=FastDecoder(m, 2))  # past the window of 24
        runs.append((torch.stack(logits), tokens))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_kernels_without_openmp_run_on_one_thread(monkeypatch, tmp_path, two_threads):
    "A compiler without -fopenmp: the kernels build without it, say so, and give the same results."
    if not X86_WITH_CC: pytest.skip("the C kernels are for x86-64 with a C compiler")
    fake = tmp_path / "bin" / "cc"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && echo "unsupported option -fopenmp" >&2 '
                    f'&& exit 1; done\nexec {shutil.which("cc")} "$@"\n')
    fake.chmod(0o755)
    x, lin = torch.randn(2, 300), nn.Linear(300, 900)
    torch.set_num_threads(2)
    want = DecodeLinear.from_linear(lin, torch.int8)(x)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("NANOGPT_PLUS_HOME", str(tmp_path / "home"))
    decode_kernels.cache_clear()
    try:
        k = decode_kernels()
        assert k.problem is None and not k.openmp and set(k.matvec) == {torch.float32, torch.bfloat16, torch.int8}
        assert torch.equal(DecodeLinear.from_linear(lin, torch.int8)(x), want)
    finally:
        decode_kernels.cache_clear()


def test_quantize_weight_bounds_and_edge_cases():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 300, generator=g) * torch.logspace(-6, 3, 50)[:, None]  # rows of very different sizes
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.abs().max() <= 127
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 * (1 + 1e-5)).all()
    assert (q.abs().amax(1) == 127).all()
    q0, s0 = quantize_weight(torch.zeros(3, 4))
    assert (q0 == 0).all() and torch.isfinite(s0).all()
    q1, _ = quantize_weight(torch.tensor([[1.0, -1.0, 0.5, 1e-9]]))
    assert q1.tolist() == [[127, -127, 64, 0]]


def test_weight_and_cache_bytes():
    with torch.device("meta"): m = GPT(GPTConfig.from_name("gpt2"))
    n = m.num_params()
    assert weight_bytes(m) == 4 * (n - 1023 * 768) == 494_616_576  # the position table: one row; 494.6 MB as in the issue
    assert kv_cache_bytes(m, 0) == 2 * 12 * 768 * 4 and kv_cache_bytes(m, 9, batch_size=2) == 10 * 2 * 2 * 12 * 768 * 4
    small = small_gpt()
    p = prepare_decoding(copy.deepcopy(small), "int8")
    linear = sum(l.weight.numel() for l in p.modules() if isinstance(l, DecodeLinear))
    floats = sum(t.numel() for name, t in p.named_parameters() if t.is_floating_point() and "pos_emb" not in name)
    assert weight_bytes(p) == linear + 4 * floats + 4 * 64  # int8 weights, float32 rest, one position row


def test_prepare_decoding_keeps_the_tie_and_the_model():
    small = small_gpt()
    idx = torch.randint(0, 65, (2, 10))
    for dtype in DECODE_DTYPES:
        p = prepare_decoding(copy.deepcopy(small), dtype)
        assert isinstance(p.tok_emb, DecodeEmbedding) and p.tok_emb.table is p.lm_head.weight
        assert all(not t.requires_grad for t in p.parameters()) and not p.training
        torch.testing.assert_close(p.tok_emb.weight, p.lm_head.dense())
        err = (p(idx)[0] - small(idx)[0]).abs().max().item()
        assert err < {"float32": 1e-5, "bfloat16": 0.05, "int8": 0.05}[dtype], (dtype, err)
    with pytest.raises(ValueError, match="dtype must be one of"): prepare_decoding(small_gpt(), "int4")


@pytest.mark.parametrize("dtype", ["none", *DECODE_DTYPES])
@pytest.mark.parametrize("overflow", OVERFLOW_MODES)
def test_fast_decoder_gives_the_cached_decoders_logits_bit_for_bit(dtype, overflow):
    small = small_gpt(context_size=16)
    m = small if dtype == "none" else prepare_decoding(small, dtype)
    assert fast_step_supported(m)
    seq = torch.randint(0, 65, (2, 60), generator=torch.Generator().manual_seed(1))  # far past the window of 16
    slow, fast = CachedDecoder(m, 2, overflow), FastDecoder(m, 2, overflow)
    with torch.inference_mode():
        for L in range(3, 60): assert torch.equal(fast(seq[:, :L]), slow(seq[:, :L])), L
        restart = seq.flip(1)  # a new sequence: the decoder starts again
        assert torch.equal(fast(restart[:, :5]), slow(restart[:, :5]))


def test_cache_stays_exact_in_float32_past_the_window():
    m = prepare_decoding(small_gpt(context_size=16), "float32")
    prompt = torch.randint(0, 65, (3, 4), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        no_cache = generate(m, prompt, 50, temperature=0)
        assert torch.equal(generate(m, prompt, 50, temperature=0, decoder=FastDecoder(m, 3)), no_cache)
        assert torch.equal(generate(m, prompt, 50, temperature=0, use_kv_cache=True), no_cache)


def test_other_models_keep_the_generic_path():
    class Variant(GPT): pass
    v = Variant(small_gpt().config).eval()
    assert not fast_step_supported(v) and FastDecoder(v, 1).step is None
    with torch.inference_mode():
        out = generate(v, torch.zeros(1, 1, dtype=torch.long), 20, temperature=0, decoder=FastDecoder(v, 1))
        assert torch.equal(out, generate(v, torch.zeros(1, 1, dtype=torch.long), 20, temperature=0))
    with pytest.raises(ValueError, match="overflow must be one of"): FastDecoder(small_gpt(), 1, overflow="wrap")


def test_perplexity_is_e_to_the_mean_cross_entropy():
    m = small_gpt()
    ids = torch.randint(0, 65, (32 * 3 + 5,), generator=torch.Generator().manual_seed(3))
    x, y = ids[:96].view(3, 32), ids[1:97].view(3, 32)
    want = F.cross_entropy(m(x)[0].flatten(0, 1), y.flatten()).exp().item()
    assert abs(perplexity(m, ids, 32, batch_size=2) - want) < 1e-4 * want


def test_time_rounds_alternates():
    calls = []
    ticks = iter(range(1000))
    t = time_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, clock=lambda: next(ticks))
    assert calls == ["a", "b"] * 4 and t == {"a": [1, 1, 1], "b": [1, 1, 1]}


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_quantized_checkpoint_round_trip(tmp_path, dtype):
    tok = CharTokenizer(CORPUS)
    m = prepare_decoding(small_gpt(vocab_size=tok.vocab_size), dtype)
    save_quantized(tmp_path / "q", m, tok)
    names = set(load_file(tmp_path / "q" / "model.safetensors"))
    assert "lm_head.weight" in names and not any(n.startswith("tok_emb.") for n in names)  # the tied table once
    assert json.loads((tmp_path / "q" / "config.json").read_text())["weights"] == dtype
    loaded, tok2 = load_quantized(tmp_path / "q")
    assert tok2.vocab_size == tok.vocab_size and loaded.tok_emb.table is loaded.lm_head.weight
    idx = torch.randint(0, tok.vocab_size, (2, 12))
    assert torch.equal(loaded(idx)[0], m(idx)[0])
    with torch.inference_mode():
        a = generate(m, idx[:, :3], 40, temperature=0, decoder=FastDecoder(m, 2))
        assert torch.equal(generate(loaded, idx[:, :3], 40, temperature=0, decoder=FastDecoder(loaded, 2)), a)


def test_quantized_checkpoint_errors(tmp_path):
    tok = CharTokenizer(CORPUS)
    small = small_gpt(vocab_size=tok.vocab_size)
    with pytest.raises(ValueError, match="save_checkpoint"): save_quantized(tmp_path / "f", small, tok)
    save_checkpoint(tmp_path / "float", small, tok)
    with pytest.raises(CheckpointError, match="load_checkpoint"): load_quantized(tmp_path / "float")
    q = prepare_decoding(copy.deepcopy(small), "int8")
    save_quantized(tmp_path / "q", q, tok)
    good = load_file(tmp_path / "q" / "model.safetensors")
    meta = (tmp_path / "q" / "config.json").read_text()

    def rewrite(name, tensors):  # a consistent checkpoint (manifest and all) whose weights are wrong
        d = tmp_path / name
        commit(d, {"config.json": lambda p: p.write_text(meta), "tokenizer.json": tok.save,
                   "model.safetensors": lambda p: save_file(tensors, str(p))})
        return d
    cases = {"missing": {k: v for k, v in good.items() if k != "blocks.0.mlp.fc.weight"},
             "dtype": {**good, "blocks.0.mlp.fc.weight": good["blocks.0.mlp.fc.weight"].float()},
             "shape": {**good, "blocks.0.mlp.fc.weight": good["blocks.0.mlp.fc.weight"][:-1]},
             "scales": {k: v for k, v in good.items() if k != "blocks.1.attn.qkv.scale"},
             "extra": {**good, "blocks.9.ln1.weight": torch.ones(3)},
             "no norm": {k: v for k, v in good.items() if k != "ln_f.weight"}}
    for name, tensors in cases.items():
        with pytest.raises(CheckpointError, match="model.safetensors"): load_quantized(rewrite(name, tensors))
    (tmp_path / "q" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="checksum"): load_quantized(tmp_path / "q")


def run_cli(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "nanogpt_plus", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_quantize_and_generate(tmp_path):
    tok = CharTokenizer(CORPUS)
    save_checkpoint(tmp_path / "gpt", small_gpt(vocab_size=tok.vocab_size, context_size=16), tok)
    r = run_cli("quantize", "gpt", "--checkpoint", tmp_path / "gpt", "--out-dir", tmp_path / "int8")
    assert r.returncode == 0 and "int8 weights" in r.stdout, r.stderr
    greedy = ("--max-new-tokens", 40, "--temperature", 0, "--continue-tokens", "First")
    saved = run_cli("generate", "gpt", "--checkpoint", tmp_path / "int8", "--use-kv-cache", *greedy)
    direct = run_cli("generate", "gpt", "--checkpoint", tmp_path / "gpt", "--dtype", "int8", "--use-kv-cache", *greedy)
    assert saved.returncode == 0 and saved.stdout == direct.stdout and saved.stdout.startswith("First"), saved.stderr
    for dtype in ("float32", "bfloat16", "float16"):
        r = run_cli("generate", "gpt", "--checkpoint", tmp_path / "gpt", "--dtype", dtype, "--use-kv-cache", *greedy)
        assert r.returncode == 0 and len(r.stdout) == len("First") + 40 + 1, r.stderr


@pytest.mark.parametrize("args, msg", [
    (("generate", "bigram", "--checkpoint", "{bigram}", "--dtype", "int8"), "int8 weights are for GPTs"),
    (("generate", "gpt", "--checkpoint", "{int8}", "--dtype", "bfloat16"), "holds int8 weights"),
    (("quantize", "gpt", "--checkpoint", "{int8}", "--out-dir", "{tmp}/again"), "already quantized"),
    (("quantize", "gpt", "--checkpoint", "{gpt}", "--out-dir", "{int8}"), "already holds a checkpoint"),
    (("quantize", "gpt", "--out-dir", "{tmp}/none"), "pass one of"),
    (("quantize", "gpt", "--checkpoint", "{bigram}", "--out-dir", "{tmp}/b"), "bigram"),
])
def test_cli_errors(tmp_path, args, msg, capsys):
    from nanogpt_plus.bigram import BigramLanguageModel
    tok = CharTokenizer(CORPUS)
    save_checkpoint(tmp_path / "gpt", small_gpt(vocab_size=tok.vocab_size, context_size=16), tok)
    save_checkpoint(tmp_path / "bigram", BigramLanguageModel(tok.vocab_size), tok)
    assert main(["quantize", "gpt", "--checkpoint", str(tmp_path / "gpt"), "--out-dir", str(tmp_path / "int8")]) == 0
    capsys.readouterr()
    argv = [a.format(tmp=tmp_path, gpt=tmp_path / "gpt", int8=tmp_path / "int8", bigram=tmp_path / "bigram") for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and msg in err, err


def test_cli_gpt2_weights_in_int8(tmp_path):
    "A tiny random GPT-2 saved by transformers: quantized from --gpt2-config and generated from."
    import transformers  # a dev dependency
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32))
    hf.save_pretrained(tmp_path / "tiny-gpt2")
    greedy = ("--max-new-tokens", 20, "--temperature", 0, "--continue-tokens", "Hello")
    r = run_cli("generate", "gpt", "--gpt2-config", tmp_path / "tiny-gpt2", "--dtype", "int8", "--use-kv-cache", *greedy)
    assert r.returncode == 0 and r.stdout.startswith("Hello"), r.stderr
    assert run_cli("quantize", "gpt", "--gpt2-config", tmp_path / "tiny-gpt2", "--out-dir", tmp_path / "q").returncode == 0
    saved = run_cli("generate", "gpt", "--checkpoint", tmp_path / "q", "--use-kv-cache", *greedy)
    assert saved.returncode == 0 and saved.stdout == r.stdout, saved.stderr
