"""`--tokenizer bpe:N` on the command line (issue 18): learned from the training split only, stored in the checkpoint,
read back by `generate` and `--resume` (never learned again), `prepare` with it, and the bad inputs."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from nanogpt_plus import cli
from nanogpt_plus.bigram import generate
from nanogpt_plus.bpe import BPETokenizer
from nanogpt_plus.checkpoint import load_checkpoint, load_trainer_state
from nanogpt_plus.data import tiny_shakespeare
from nanogpt_plus.tokens import load_tokens

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--context-size", "16", "--batch-size", "4",
        "--eval-iters", "1", "--eval-interval", "2", "--no-progress", "--device", "cpu", "--dtype", "float32"]
TAIL = "\n" + "xqxq " * 800  # the last 10% of the file: a pair a tokenizer that saw it would merge first


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    "36,000 characters of Shakespeare, then 4,001 of `xqxq`: the first 90% of the characters is Shakespeare alone."
    path = tmp_path_factory.mktemp("data") / "input.txt"
    path.write_text(tiny_shakespeare()[:36_000] + TAIL, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, data):
    "A tiny GPT trained for 2 steps with `--tokenizer bpe:300`, by the real program."
    out = tmp_path_factory.mktemp("runs") / "bpe"
    r = run("train", "gpt", "--data", data, "--tokenizer", "bpe:300", "--max-iters", 2, "--out-dir", out, *TINY)
    assert r.returncode == 0, r.stderr
    assert "learned a byte-pair tokenizer of 300 tokens from the first 90%" in r.stderr
    return out


def run(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "nanogpt_plus", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def fails(capsys, *args, match):
    "In process: `main` returns 2 and prints one `error:` line that contains `match`."
    capsys.readouterr()
    assert cli.main(list(map(str, args))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err, err


def test_the_checkpoint_holds_a_bpe_learned_from_the_training_split_only(ckpt, data):
    saved = json.loads((ckpt / "tokenizer.json").read_text())
    assert saved["type"] == "bpe" and len(saved["merges"]) == 300 - 257
    model, tok = load_checkpoint(ckpt)
    assert model.config.vocab_size == tok.vocab_size == 300
    text = data.read_text(encoding="utf-8")
    assert tok.merges == BPETokenizer.train(text[:int(len(text) * 0.9)], 300).merges
    assert (ord("x"), ord("q")) not in tok.merges  # the validation text's most frequent pair was never seen
    assert (ord("x"), ord("q")) in BPETokenizer.train(text, 300).merges  # ... and would have been learned first
    assert "tokenizer = \"bpe:300\"" in (ckpt / "run.toml").read_text()


def test_generate_streams_the_text_of_the_tokens(ckpt):
    prompt, n = "ROMEO:", 40
    r = run("generate", "gpt", "--checkpoint", ckpt, "--continue-tokens", prompt, "--max-new-tokens", n,
            "--temperature", 0, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    model, tok = load_checkpoint(ckpt)  # the same greedy tokens, decoded at once
    ids = tok.encode(prompt)
    out = generate(model.eval(), torch.tensor([ids]), n, temperature=0.0)[0, len(ids):]
    assert r.stdout == prompt + tok.decode(out) + "\n"
    assert run("generate", "gpt", "--checkpoint", ckpt, "--max-new-tokens", 5, "--device", "cpu").returncode == 0


def test_an_empty_prompt_starts_from_a_newline():
    tok = BPETokenizer.train("To be, or not to be:\nthat is the question.\n" * 20, 270)
    assert cli.start_token(tok) == 10 and tok.eot_token == 269  # the text never held <|endoftext|>


def test_resume_keeps_the_tokenizer_and_never_learns_it_again(ckpt, tmp_path, data, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "gpt", "--data", str(data), "--tokenizer", "bpe:300", "--max-iters", "2",
                     "--out-dir", str(out), *TINY]) == 0
    before = (out / "tokenizer.json").read_bytes()
    capsys.readouterr()
    assert cli.main(["train", "gpt", "--data", str(data), "--max-iters", "4", "--out-dir", str(out), "--resume",
                     "--tokenizer", "bpe:300", *TINY]) == 0
    assert "learned a byte-pair tokenizer" not in capsys.readouterr().err
    assert (out / "tokenizer.json").read_bytes() == before and load_trainer_state(out)["step"] == 4
    fails(capsys, "train", "gpt", "--data", data, "--max-iters", 6, "--out-dir", out, "--resume", "--tokenizer",
          "bpe:301", *TINY, match="--tokenizer bpe:301 contradicts the checkpoint's tokenizer, bpe:300")
    fails(capsys, "train", "gpt", "--data", data, "--max-iters", 6, "--out-dir", out, "--resume", "--tokenizer",
          "char", *TINY, match="contradicts the checkpoint's tokenizer")


def test_prepare_with_bpe_and_train_on_its_tokens(tmp_path, data, capsys):
    tokens = tmp_path / "tokens"
    assert cli.main(["prepare", str(data), "--out-dir", str(tokens), "--tokenizer", "bpe:300", "--no-progress"]) == 0
    ids, tok = load_tokens(tokens)
    text = data.read_text(encoding="utf-8")
    assert tok.kind == "bpe" and tok.merges == BPETokenizer.train(text[:int(len(text) * 0.9)], 300).merges
    np.testing.assert_array_equal(ids, tok.encode(text))  # the fast path's ids are the teaching encoder's
    out = tmp_path / "run"
    assert cli.main(["train", "gpt", "--data", str(tokens), "--max-iters", "2", "--out-dir", str(out), *TINY]) == 0
    assert load_checkpoint(out)[1].merges == tok.merges
    for other in ("char", "bpe:400"):
        fails(capsys, "train", "gpt", "--data", tokens, "--tokenizer", other, "--out-dir", tmp_path / "o", *TINY,
              match=f"holds bpe:300 tokens, not {other}")


def test_a_token_directory_must_hold_the_checkpoints_tokenizer(tmp_path, data, capsys):
    "Same kind and size is not enough: other merges give other ids."
    out, tokens = tmp_path / "run", tmp_path / "tokens"
    assert cli.main(["train", "gpt", "--data", str(data), "--tokenizer", "bpe:300", "--max-iters", "2",
                     "--out-dir", str(out), *TINY]) == 0
    other = tmp_path / "other.txt"
    other.write_text(tiny_shakespeare()[-40_000:], encoding="utf-8")
    assert cli.main(["prepare", str(other), "--out-dir", str(tokens), "--tokenizer", "bpe:300", "--no-progress"]) == 0
    fails(capsys, "train", "gpt", "--data", tokens, "--max-iters", 4, "--out-dir", out, "--resume", *TINY,
          match="was made with another tokenizer than the checkpoint's")


def test_the_bigram_trains_on_bpe_tokens_too(tmp_path, data):
    out = tmp_path / "bigram"
    assert cli.main(["train", "bigram", "--data", str(data), "--tokenizer", "bpe:260", "--max-iters", "2",
                     "--out-dir", str(out), "--batch-size", "4", "--eval-iters", "1", "--no-progress"]) == 0
    assert load_checkpoint(out)[0].vocab_size == 260


@pytest.mark.parametrize("value", ["bpe:200", "bpe:256", "bpe", "bpe:4k", "sentencepiece"])
def test_bad_tokenizer_values_stop_the_parser(value, capsys):
    for command in (["train", "gpt"], ["prepare", "x.txt", "--out-dir", "x"]):
        with pytest.raises(SystemExit) as e: cli.main([*command, "--tokenizer", value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "use bpe:N with N >= 257, e.g. bpe:4096" in err, err


def test_bad_input(tmp_path, data, capsys):
    fails(capsys, "train", "gpt", "--gpt2-config", "gpt2", "--tokenizer", "bpe:4096", match="--gpt2-config trains "
          "with GPT-2's tokenizer: drop --tokenizer bpe:4096")
    fails(capsys, "train", "gpt", "--data", data, "--tokenizer", "bpe:100000", "--out-dir", tmp_path / "o", *TINY,
          match="ran out of pairs to merge")
    fails(capsys, "train", "gpt", "--data", data, "--tokenizer", "bpe:100000", "--out-dir", tmp_path / "o", *TINY,
          match="use --tokenizer bpe:N with N <= ")
    (tmp_path / "blank.txt").write_text("\n \n")
    fails(capsys, "train", "gpt", "--data", tmp_path / "blank.txt", "--tokenizer", "bpe:300", "--out-dir",
          tmp_path / "o", *TINY, match="is empty")
    fails(capsys, "prepare", tmp_path / "missing.txt", "--out-dir", tmp_path / "t", "--tokenizer", "bpe:300",
          match="does not exist")
    (tmp_path / "bad.toml").write_text('model = "gpt"\ntokenizer = "bpe:200"\n')
    fails(capsys, "train", "--config", tmp_path / "bad.toml", match="bad.toml: tokenizer expected char, gpt2 or bpe:N")
    assert not (tmp_path / "o" / "config.json").exists()  # nothing was written but the run lock


def test_a_damaged_tokenizer_in_the_checkpoint(ckpt, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    saved = json.loads((broken / "tokenizer.json").read_text())
    (broken / "tokenizer.json").write_text(json.dumps({**saved, "merges": saved["merges"][:-1]}))  # one token short
    capsys.readouterr()
    assert cli.main(["generate", "gpt", "--checkpoint", str(broken), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "tokenizer" in err and "Traceback" not in err, err
