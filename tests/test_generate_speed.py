"benchmarks/generate_speed.py: the llama.cpp peer (exactly n greedy tokens, ours in f32), its refusal without llama-cpp-python, one small run."
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from nanogpt_plus.bigram import generate
from nanogpt_plus.fastgen import FastDecoder, prepare_decoding
from nanogpt_plus.formats import export_gguf
from nanogpt_plus.gpt import GPT, GPTConfig
from nanogpt_plus.tokenizer import CharTokenizer

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "generate_speed.py"
spec = importlib.util.spec_from_file_location("generate_speed", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
TOK = CharTokenizer("First Citizen:\nBefore we proceed any further, hear me speak.\n")


def llama_cpp_or_skip():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install nanogpt-plus[interop])")


def sharp_model(seed=0):
    "A random GPT with weights large enough that its greedy choices are clear (no near-ties to flip on rounding)."
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=TOK.vocab_size, context_size=128, n_layer=2, n_head=4, n_embd=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2: p.mul_(4)
    return model


def our_greedy(model, prompt, n, dtype="float32"):
    "Ours as the benchmark runs it: prepared weights and `FastDecoder`."
    m = GPT(model.config).eval()
    m.load_state_dict(model.state_dict())  # a copy, as the benchmark's build() makes
    m = prepare_decoding(m, dtype)
    with torch.inference_mode():
        out = generate(m, torch.tensor([prompt]), n, temperature=0, decoder=FastDecoder(m, 1))
    return out[0, len(prompt):].tolist()


def test_llama_cpp_peer_makes_n_tokens_equal_to_ours_in_f32(tmp_path):
    llama_cpp_or_skip()
    model, prompt, n = sharp_model(), TOK.encode("First Citizen:"), 100
    peer = bench.llama_cpp_peer(export_gguf(model, TOK, tmp_path / "m.gguf"), threads=1, n_ctx=len(prompt) + n)
    theirs = peer(prompt, n)
    assert len(theirs) == n and len(peer(prompt, 7)) == 7
    assert theirs == our_greedy(model, prompt, n)
    assert peer(prompt, n) == theirs  # a second run starts afresh: nothing of the first one's cache is left
    peer.llm.close()


def test_llama_cpp_peer_does_not_stop_at_end_of_text(tmp_path, monkeypatch):
    "With an end-of-text token that greedy decoding picks early, the peer still makes every token asked for."
    llama_cpp_or_skip()
    import nanogpt_plus.formats as formats
    model, prompt, n = sharp_model(), TOK.encode("First Citizen:"), 60
    ours = our_greedy(model, prompt, n)
    fields = formats.gguf_tokenizer(TOK, TOK.vocab_size) | dict(special=dict(bos=ours[3], eos=ours[3]))
    monkeypatch.setattr(formats, "gguf_tokenizer", lambda tokenizer, vocab_size: fields)  # llama.cpp's end of text
    peer = bench.llama_cpp_peer(export_gguf(model, TOK, tmp_path / "eot.gguf"), threads=1, n_ctx=len(prompt) + n)
    assert peer.llm.token_eos() == ours[3]
    assert peer(prompt, n) == ours
    peer.llm.close()


def test_without_llama_cpp_one_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    with pytest.raises(RuntimeError, match=r"needs llama-cpp-python \(pip install nanogpt-plus\[interop\]\)"):
        bench.llama_cpp_peer(tmp_path / "m.gguf", threads=1, n_ctx=32)
    monkeypatch.setattr(sys, "argv", ["generate_speed.py", "--models", "recipe", "--rounds", "1"])
    with pytest.raises(SystemExit) as e: bench.main()  # before any model is built or timed
    assert e.value.code == 2
    assert "error: the llama.cpp peer needs llama-cpp-python" in capsys.readouterr().err


def test_a_small_run_writes_llama_cpp_columns(monkeypatch, tmp_path, capsys):
    "The whole benchmark on a tiny shape, one round: one JSON line with llama.cpp beside each of our formats."
    llama_cpp_or_skip()
    monkeypatch.setitem(bench.SHAPES, "tiny", dict(vocab_size=65, context_size=64, n_layer=1, n_head=2, n_embd=64))
    out = tmp_path / "speed.jsonl"
    monkeypatch.setattr(sys, "argv", ["generate_speed.py", "--models", "tiny", "--threads", "1", "--rounds", "1",
                                      "--new-tokens", "12", "--prompt-tokens", "4", "--out", str(out)])
    torch_threads = torch.get_num_threads()
    try: bench.main()
    finally: torch.set_num_threads(torch_threads)
    line = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == line
    for d, g in bench.GGUF_FOR.items():
        assert line[f"llama_cpp_{g}_tokens_per_s"] > 0
        assert line[d]["llama_cpp_format"] == g and line[d]["ratio_to_llama_cpp"] > 0
        assert 0 <= line[d]["same_greedy_tokens_as_llama_cpp"] <= 1 and 0 <= line[d]["llama_cpp_same_until"] <= 12
        assert 0 <= line[f"llama_cpp_{g}_same_greedy_tokens_as_fp32"] <= 1
    assert line["float32"]["tokens_per_s"] > 0 and "transformers_float32_tokens_per_s" in line  # the older columns stay
    assert line["llama_cpp_version"] and "llama_cpp_problem" not in line


def test_a_file_llama_cpp_cannot_load_is_reported_not_measured(monkeypatch, tmp_path):
    llama_cpp_or_skip()
    monkeypatch.setitem(bench.SHAPES, "tiny", dict(vocab_size=65, context_size=64, n_layer=1, n_head=2, n_embd=64))
    ours, peers, ref = bench.build("tiny", ["float32"], [])
    good = bench.export_ggufs(ref, tmp_path, ["f32"])["f32"]
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(good.read_bytes()[:1000])  # cut short, as an interrupted copy leaves it
    args = type("Args", (), dict(new_tokens=6, prompt_tokens=4, rounds=1))
    torch_threads = torch.get_num_threads()
    try: res = bench.measure("tiny", 1, ours, peers, args, {"f32": broken})
    finally: torch.set_num_threads(torch_threads)
    assert str(broken) in res["llama_cpp_problem"]
    assert "llama_cpp_f32_tokens_per_s" not in res and "ratio_to_llama_cpp" not in res["float32"]
    assert res["float32"]["tokens_per_s"] > 0
