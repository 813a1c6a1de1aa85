"Chapter 19's metrics against values computed independently here, and `nanogpt-plus eval` in a subprocess."
import bz2
import hashlib
import json
import lzma
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from nanogpt_plus.checkpoint import save_checkpoint
from nanogpt_plus.data import tiny_shakespeare, train_val_split
from nanogpt_plus.evaluate import (KneserNey, bits_per_char, calibration, compressor_bpc, copied_share, heldout_text,
                                   load_any, longest_copy, sample_texts, shared_windows, welch_test, wilson_interval)
from nanogpt_plus.fastgen import prepare_decoding, save_quantized
from nanogpt_plus.gpt import GPT, GPTConfig
from nanogpt_plus.lora import add_lora, describe_base, save_adapter
from nanogpt_plus.tokenizer import CharTokenizer

TEXT = tiny_shakespeare()[:250]  # the text a small model learns by heart


def tiny_gpt(tok, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, context_size=32, n_layer=1, n_head=2, n_embd=48, dropout=0.0))


def memorised(tok):
    "A tiny GPT trained on TEXT until it recites it."
    model, data = tiny_gpt(tok), torch.tensor(tok.encode(TEXT))
    opt, g = torch.optim.AdamW(model.parameters(), lr=1e-2), torch.Generator().manual_seed(0)
    for _ in range(600):
        i = torch.randint(len(data) - 33, (16,), generator=g)
        x = torch.stack([data[j:j + 33] for j in i])  # (16, 33)
        _, loss = model(x[:, :-1], x[:, 1:]); opt.zero_grad(); loss.backward(); opt.step()
    return model.eval()


def test_memorising_model_copies_and_untrained_model_does_not():
    tok = CharTokenizer(tiny_shakespeare())
    copy = sample_texts(memorised(tok), tok, 2, 200)
    fresh = sample_texts(tiny_gpt(tok), tok, 2, 200)
    share = lambda s: sum(copied_share(t, TEXT, 20) for t in s) / len(s)
    assert share(copy) > 0.5 and len(longest_copy(copy[0], TEXT)) > 50
    assert share(fresh) == 0.0 and len(longest_copy(fresh[0], TEXT)) < 8
    # by brute force: every 20-gram of the sample looked up in the text
    grams = [copy[0][i:i + 20] for i in range(len(copy[0]) - 19)]
    assert copied_share(copy[0], TEXT, 20) == sum(g in TEXT for g in grams) / len(grams)


def test_compressors_equal_the_standard_library():
    train, val = train_val_split(tiny_shakespeare())
    a, b = train[-30_000:], val[:3000]
    for name, squeeze in [("zlib", lambda x: zlib.compress(x, 9)), ("bz2", lambda x: bz2.compress(x, 9)),
                          ("lzma", lambda x: lzma.compress(x, preset=9))]:
        direct = 8 * (len(squeeze((a + b).encode())) - len(squeeze(a.encode()))) / len(b)
        assert compressor_bpc(name, a, b) == direct
        assert 1.5 < direct < 4.5  # a compressor given context beats 8 bits per character


def test_kneser_ney_probabilities_sum_to_one():
    text = train_val_split(tiny_shakespeare())[0][:100_000]
    for order in (2, 3, 5):
        kn = KneserNey(text, order)
        for h in ["", "K", "the ", "ROMEO:\n", "qqqqz"]:
            assert math.isclose(sum(kn.prob(c, h) for c in kn.vocab), 1.0, abs_tol=1e-9)
    # a higher order predicts held-out text better than a lower one, and both beat the uniform 6 bits
    val = train_val_split(tiny_shakespeare())[1][:3000]
    assert KneserNey(text, 4).bpc(val) < KneserNey(text, 2).bpc(val) < math.log2(len(set(text)))


def test_bits_per_char_equals_the_models_loss():
    tok = CharTokenizer(tiny_shakespeare())
    model, text = tiny_gpt(tok), tiny_shakespeare()[1000:1033]
    ids = torch.tensor(tok.encode(text))
    _, loss = model(ids[None, :-1], ids[None, 1:])
    r = bits_per_char(model, tok, text, 32)
    assert math.isclose(r["bpc"], loss.item() / math.log(2), rel_tol=1e-5) and r["chars"] == 32


def test_calibration_and_intervals_against_independent_computations():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(500, generator=g)
    right = (torch.rand(500, generator=g) < conf ** 2).long()
    ece = 0.0
    for k in range(10):  # by hand: bins [k/10, (k+1)/10)
        m = [(c, r) for c, r in zip(conf.tolist(), right.tolist()) if k / 10 <= c < (k + 1) / 10]
        if m: ece += len(m) / 500 * abs(sum(c for c, _ in m) / len(m) - sum(r for _, r in m) / len(m))
    assert math.isclose(calibration(conf, right)["ece"], ece, abs_tol=1e-6)
    ci = stats.binomtest(37, 90).proportion_ci(confidence_level=0.95, method="wilson")
    assert all(math.isclose(x, y, abs_tol=1e-3) for x, y in zip(wilson_interval(37, 90), (ci.low, ci.high)))
    a, b = [1.51, 1.49, 1.53, 1.50], [1.47, 1.48, 1.44]
    ref = stats.ttest_ind(a, b, equal_var=False)
    w = welch_test(a, b)
    assert math.isclose(w["t"], ref.statistic, rel_tol=1e-9) and math.isclose(w["p"], ref.pvalue, abs_tol=1e-6)


def test_heldout_plays_share_no_50_character_window_with_tiny_shakespeare():
    plays = heldout_text("plays")
    assert len(plays) > 2_000_000 and "\n\nMACBETH:\n" in plays
    assert shared_windows(plays, tiny_shakespeare(), 50) == []
    assert "Shall I compare thee to a summer's day?" in heldout_text("poems")


# ---- the command line -------------------------------------------------------------------------------------------

def run(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "nanogpt_plus", "eval", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)


def snapshot(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = CharTokenizer(tiny_shakespeare())
    save_checkpoint(root / "gpt", tiny_gpt(tok), tok)
    return root


def test_eval_writes_the_report_beside_the_checkpoint_and_touches_nothing(ckpt):
    before = snapshot(ckpt / "gpt")
    (ckpt / "mine.txt").write_text("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 20)
    r = run("--checkpoint", ckpt / "gpt", "--text", ckpt / "mine.txt")
    assert r.returncode == 0, r.stderr
    after = snapshot(ckpt / "gpt")
    assert {k: v for k, v in after.items() if k in before} == before
    assert {"report.md", "report.json", "bpc.png", "reliability.png"} <= set(after)
    assert "bits/char" in (ckpt / "gpt" / "report.md").read_text()
    report = json.loads((ckpt / "gpt" / "report.json").read_text())
    assert set(report["bpc"]) == {"training", "validation", "unseen plays", "poems", "mine.txt"}
    assert report["compressors"]["lzma"]["mine.txt"] < 1.0  # a text repeated 20 times costs lzma little
    assert "eval (quick)" in r.stderr  # the progress bar


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "a_file", "empty_text", "latin1_text", "suite",
                                  "unwritable"])
def test_bad_input_exits_2_with_one_sentence(ckpt, case):
    (ckpt / "empty.txt").write_text("")
    (ckpt / "latin1.txt").write_bytes("Où est le roi?".encode("latin-1"))
    (ckpt / "plain").mkdir(exist_ok=True)
    args = {"missing": ["--checkpoint", ckpt / "nope"], "not_a_checkpoint": ["--checkpoint", ckpt / "plain"],
            "a_file": ["--checkpoint", ckpt / "empty.txt"],
            "empty_text": ["--checkpoint", ckpt / "gpt", "--text", ckpt / "empty.txt"],
            "latin1_text": ["--checkpoint", ckpt / "gpt", "--text", ckpt / "latin1.txt"],
            "suite": ["--checkpoint", ckpt / "gpt", "--suite", "huge"],
            "unwritable": ["--checkpoint", ckpt / "gpt", "--out-dir", ckpt / "empty.txt" / "sub"]}[case]
    before = snapshot(ckpt / "gpt")
    r = run(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert snapshot(ckpt / "gpt") == before
    assert not (ckpt / "nope").exists()


def test_load_any_reads_int8_copies_and_lora_adapters(ckpt, tmp_path):
    tok = CharTokenizer(tiny_shakespeare())
    model = tiny_gpt(tok)
    save_quantized(tmp_path / "int8", prepare_decoding(tiny_gpt(tok), "int8"), tok)
    base = describe_base(model, str(ckpt / "gpt"))
    save_adapter(tmp_path / "adapter", add_lora(model, 2, 4.0), base)
    text = tiny_shakespeare()[:200]
    ref = bits_per_char(tiny_gpt(tok), tok, text, 32)["bpc"]
    for d in ("int8", "adapter"):
        m, t = load_any(tmp_path / d)
        assert abs(bits_per_char(m, t, text, 32)["bpc"] - ref) < 0.05  # int8 rounding; a zero-initialised adapter


def test_t_tail_matches_scipy_even_for_tiny_p_values():
    stats = pytest.importorskip("scipy.stats")
    from nanogpt_plus.evaluate import _t_sf2
    for df in (2, 3.78, 10):
        for t in (0.3, 2.0, 5.0, 21.0):
            assert math.isclose(_t_sf2(t, df), 2 * stats.t.sf(t, df), rel_tol=1e-6)
