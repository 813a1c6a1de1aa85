"`benchmarks/report_cards.py`: its arguments (bad ones: one line, exit 2, nothing trained) and what it counts."
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanogpt_plus.checkpoint import save_checkpoint
from nanogpt_plus.fastgen import prepare_decoding, save_quantized
from nanogpt_plus.gpt import GPT, GPTConfig
from nanogpt_plus.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("report_cards", ROOT / "benchmarks" / "report_cards.py")
cards = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cards)


def test_from_dir_pairs(tmp_path):
    (tmp_path / "a").mkdir()
    assert cards.parse_from_dirs([f"recipe={tmp_path / 'a'}", f"lora={tmp_path}"]) == {"recipe": tmp_path / "a", "lora": tmp_path}
    assert cards.parse_from_dirs([]) == {}
    for bad, words in [(["recipe"], "is not NAME=DIR"), ([f"={tmp_path}"], "is not NAME=DIR"), (["recipe="], "is not NAME=DIR"),
                       ([f"gpt5={tmp_path}"], "names no model 'gpt5'"), ([f"recipe={tmp_path}"] * 2, "twice"),
                       ([f"recipe={tmp_path / 'missing'}"], "no directory")]:
        with pytest.raises(ValueError, match=words): cards.parse_from_dirs(bad)


def test_models_list():
    assert cards.parse_models("lora-int8, recipe") == ["lora-int8", "recipe"]
    for bad in ("recipe,gpt5", "", ","):
        with pytest.raises(ValueError, match="--models"): cards.parse_models(bad)


@pytest.mark.parametrize("argv, words", [
    (["--from-dir", "recipe=/no/such/dir"], "there is no directory /no/such/dir"),
    (["--models", "gpt5"], "unknown gpt5"),
    (["--suite", "huge"], "--suite 'huge'"),
])
def test_bad_arguments_exit_2_in_one_line(tmp_path, argv, words):
    out = tmp_path / "cards.jsonl"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report_cards.py"), "--out", str(out),
                           "--work", str(tmp_path / "work"), *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert words in done.stderr and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not out.exists() and not (tmp_path / "work").exists()  # nothing trained, nothing written


def test_a_directory_that_holds_no_model_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "cards.jsonl"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report_cards.py"), "--out", str(out), "--models", "recipe",
                           "--from-dir", f"recipe={tmp_path / 'empty'}", "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "recipe:" in done.stderr and "not a checkpoint" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not out.exists() and list((tmp_path / "empty").iterdir()) == []  # nothing written, the directory untouched


def test_an_int8_copy_counts_the_parameters_of_its_float_model(tmp_path):
    tok = CharTokenizer("abcdefgh \n")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0))
    n = sum(p.numel() for p in model.parameters())
    save_checkpoint(tmp_path / "float", model, tok)
    save_quantized(tmp_path / "int8", prepare_decoding(model, "int8"), tok)
    f, q = cards.describe(tmp_path / "float"), cards.describe(tmp_path / "int8")
    assert f["parameters"] == q["parameters"] == n
    assert q["weights_bytes"] < f["weights_bytes"] / 2  # int8 weights: about a quarter of float32's bytes
