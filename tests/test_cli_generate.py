"The `nanogpt-plus generate` command, run in a subprocess against tiny checkpoints written here."
import os
import subprocess
import sys

import pytest
import torch

from nanogpt_plus.bigram import BigramLanguageModel
from nanogpt_plus.checkpoint import save_checkpoint
from nanogpt_plus.cli import main
from nanogpt_plus.gpt import GPT, GPTConfig
from nanogpt_plus.tokenizer import CharTokenizer

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    "A tiny GPT checkpoint (context 16) and a bigram checkpoint, with a character tokenizer."
    root = tmp_path_factory.mktemp("ckpt")
    tok = CharTokenizer(CORPUS)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, context_size=16, n_layer=2, n_head=2, n_embd=16))
    save_checkpoint(root / "gpt", gpt, tok)
    save_checkpoint(root / "bigram", BigramLanguageModel(tok.vocab_size), tok)
    return root


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "nanogpt_plus", "generate", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def ok(*args, **kw):
    r = run(*args, **kw)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_fixed_seed_is_repeatable_and_continues_the_prompt(ckpts):
    args = ("gpt", "--checkpoint", ckpts / "gpt", "--continue-tokens", "First", "--max-new-tokens", 40, "--fix-seed")
    a = ok(*args)
    assert a.startswith("First") and len(a) == len("First") + 40 + 1  # prompt, 40 characters, newline
    assert ok(*args) == a
    assert set(a[5:-1]) <= set(CORPUS)


def test_greedy_same_text_with_and_without_cache_past_the_context(ckpts):
    args = ("gpt", "--checkpoint", ckpts / "gpt", "--continue-tokens", "hear", "--max-new-tokens", 50,
            "--temperature", 0)  # 54 tokens > context 16: exercises the exact overflow path
    assert ok(*args) == ok(*args, "--use-kv-cache")


def test_empty_prompt_and_num_samples(ckpts):
    out = ok("gpt", "--checkpoint", ckpts / "gpt", "--continue-tokens", "", "--max-new-tokens", 10,
             "--num-samples", 3, "--seed", 1, "--top-k", 5, "--top-p", 0.9)
    assert [line for line in out.splitlines() if line.startswith("--- sample")] == [
        f"--- sample {i} ---" for i in (1, 2, 3)]


def test_bigram_and_default_size_directory(ckpts, tmp_path):
    assert len(ok("bigram", "--checkpoint", ckpts / "bigram", "--max-new-tokens", 12, "--seed", 0)) == 13
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "gpt-small").symlink_to(ckpts / "gpt")
    assert len(ok("gpt", "--size", "small", "--max-new-tokens", 5, "--fix-seed", cwd=tmp_path)) == 6


@pytest.mark.parametrize("args, msg", [
    (("gpt", "--temperature", -1), "--temperature"),
    (("gpt", "--top-k", 0), "--top-k"),
    (("gpt", "--top-p", 1.5), "--top-p"),
    (("bigram", "--use-kv-cache"), "--use-kv-cache"),
    (("bigram", "--gpt2-config", "gpt2"), "generate gpt"),
    (("gpt", "--checkpoint", "{bigram}"), "bigram"),  # a checkpoint of the other kind
    (("gpt", "--size", "small", "--gpt2-config", "gpt2"), "pass one of"),  # nanoGPTplus refused this too
    (("gpt", "--checkpoint", "{bigram}", "--gpt2-config", "gpt2"), "pass one of"),
    (("gpt", "--size", "huge"), "has no size 'huge'"),
    (("bigram", "--size", "small"), "has no size 'small'"),
])
def test_bad_input_is_exit_2(ckpts, args, msg, capsys):
    "In process, through `cli.main` (the subprocess tests below check the process boundary)."
    args = [str(a).format(bigram=ckpts / "bigram") for a in args]
    if not {"--checkpoint", "--size"} & set(args):
        args += ["--checkpoint", str(ckpts / args[0])]
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and msg in err, err


def test_unknown_character_is_exit_2_without_traceback(ckpts):
    r = run("gpt", "--checkpoint", ckpts / "gpt", "--continue-tokens", "Zebra")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error:") and "'Z'" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_missing_default_checkpoint_says_what_to_do(tmp_path):
    r = run("gpt", "--size", "medium", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "checkpoints/gpt-medium" in r.stderr and "--checkpoint" in r.stderr, r.stderr


def test_gpt2_config_from_a_local_directory(tmp_path):
    "A tiny random GPT-2 saved by transformers: loaded through --gpt2-config, BPE text, empty prompt."
    import transformers  # a dev dependency: a missing install should fail here, not skip
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32))
    hf.save_pretrained(tmp_path / "tiny-gpt2")
    args = ("gpt", "--gpt2-config", tmp_path / "tiny-gpt2", "--max-new-tokens", 40, "--temperature", 0)
    plain = ok(*args, "--continue-tokens", "Hello, world")
    assert plain.startswith("Hello, world")
    assert ok(*args, "--continue-tokens", "Hello, world", "--use-kv-cache") == plain  # 44 tokens > context 32
    assert ok(*args, "--dtype", "bfloat16", "--use-kv-cache")  # empty prompt: starts at <|endoftext|>


def test_prompt_longer_than_the_context_is_cropped_with_a_note(ckpts, capsys):
    prompt = CORPUS[:30]  # 30 characters > context 16
    assert main(["generate", "gpt", "--checkpoint", str(ckpts / "gpt"), "--continue-tokens", prompt,
                 "--max-new-tokens", "5", "--seed", "0", "--use-kv-cache"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(prompt) and len(captured.out) == 30 + 5 + 1
    assert "note: the prompt has 30 tokens; the model sees only the last 16" in captured.err


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--num-samples"])
def test_counts_below_one_are_refused_by_the_parser(ckpts, flag, capsys):
    with pytest.raises(SystemExit) as e: main(["generate", "gpt", "--checkpoint", str(ckpts / "gpt"), flag, "0"])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_the_bigram_size_of_nanogptplus(ckpts, tmp_path):
    "`generate bigram --size large` reads the default bigram directory, as nanoGPTplus's command did."
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "bigram").symlink_to(ckpts / "bigram")
    assert len(ok("bigram", "--size", "large", "--max-new-tokens", 7, "--seed", 0, cwd=tmp_path)) == 8
