"`nanogpt-plus train`: runs in a subprocess, bad input (exit 2, no traceback), exact resume, Ctrl-C."
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanogpt_plus import cli, train

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
FAST = ["--batch-size", "4", "--context-size", "16", "--eval-iters", "2", "--eval-interval", "10", "--no-progress"]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(CORPUS * 60, encoding="utf-8")
    return path


def run(*args, **kw):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "nanogpt_plus.cli", "train", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300, **kw)


def fails(capsys, *args, match):
    "In process (fast): `main` returns 2 and prints one `error:` line that contains `match`."
    assert cli.main(["train", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err, err


def test_train_bigram_writes_a_checkpoint_that_loads(tmp_path, data):
    out = tmp_path / "ck"
    r = run("bigram", "--data", data, "--max-iters", 30, "--out-dir", out, "--seed", 3, "--device", "cpu", *FAST)
    assert r.returncode == 0, r.stderr
    assert "validation loss" in r.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt", "metrics.jsonl", "loss.png",
            "best"} <= {p.name for p in out.iterdir()}
    model, tok = train.load_checkpoint(out)
    assert tok.decode(tok.encode("hear me")) == "hear me"
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["val_loss_full"] < 4.0


def test_progress_bar_shows_loss_lr_and_tokens_per_second(tmp_path, data):
    r = run("bigram", "--data", data, "--max-iters", 20, "--out-dir", tmp_path / "ck", "--batch-size", "4",
            "--context-size", "16", "--eval-iters", "1")
    assert r.returncode == 0, r.stderr
    assert "loss=" in r.stderr and "lr=" in r.stderr and "tok_s=" in r.stderr


def test_bad_data_files(tmp_path, capsys):
    fails(capsys, "bigram", "--data", tmp_path / "missing.txt", "--out-dir", tmp_path / "o", match="does not exist")
    (tmp_path / "empty.txt").write_text("\n")
    fails(capsys, "bigram", "--data", tmp_path / "empty.txt", "--out-dir", tmp_path / "o", match="is empty")
    (tmp_path / "latin1.txt").write_bytes("Où est la plume? ".encode("latin-1") * 100)
    fails(capsys, "bigram", "--data", tmp_path / "latin1.txt", "--out-dir", tmp_path / "o", match="not UTF-8")
    (tmp_path / "tiny.txt").write_text("abc")
    fails(capsys, "bigram", "--data", tmp_path / "tiny.txt", "--out-dir", tmp_path / "o", match="too few")


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "abc"])
def test_dataset_fraction_out_of_range(tmp_path, data, capsys, value):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "bigram", "--data", str(data), "--dataset-fraction", value])
    assert e.value.code == 2
    assert "--dataset-fraction" in capsys.readouterr().err


def test_dataset_fraction_uses_the_start_of_the_text(tmp_path, data):
    out = tmp_path / "ck"
    assert cli.main(["train", "bigram", "--data", str(data), "--dataset-fraction", "0.5", "--max-iters", "2",
                     "--out-dir", str(out), *FAST]) == 0
    assert train.load_trainer_state(out)["data_tokens"] == len(CORPUS * 60) // 2


def test_unknown_device(tmp_path, data, capsys):
    fails(capsys, "bigram", "--data", data, "--device", "tpu", "--out-dir", tmp_path / "o", match="unknown device")


def test_bad_checkpoint_directories(tmp_path, data, capsys):
    fails(capsys, "bigram", "--data", data, "--resume", "--out-dir", tmp_path / "nowhere", match="does not exist")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    fails(capsys, "bigram", "--data", data, "--resume", "--out-dir", tmp_path / "junk", match="is not a checkpoint")
    out = tmp_path / "ck"
    assert cli.main(["train", "bigram", "--data", str(data), "--max-iters", "2", "--out-dir", str(out), *FAST]) == 0
    capsys.readouterr()
    fails(capsys, "gpt", "--data", data, "--resume", "--out-dir", out, match="holds a bigram model, not a gpt model")
    fails(capsys, "bigram", "--data", data, "--out-dir", out, match="already holds a checkpoint")  # loses nothing
    fails(capsys, "bigram", "--data", data, "--resume", "--out-dir", out, match="larger --max-iters")
    fails(capsys, "bigram", "--data", data, "--dataset-fraction", "0.5", "--resume", "--max-iters", "4",
          "--out-dir", out, match="the data differ")


def test_errors_have_no_traceback_in_a_real_process(tmp_path):
    r = run("bigram", "--data", tmp_path / "missing.txt")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_resume_20_plus_20_equals_40(tmp_path, data):
    common = ["bigram", "--data", data, "--seed", 5, "--lr-decay-iters", 40, *FAST]
    assert run(*common, "--max-iters", 40, "--out-dir", tmp_path / "straight").returncode == 0
    assert run(*common, "--max-iters", 20, "--out-dir", tmp_path / "split").returncode == 0
    r = run(*common, "--max-iters", 40, "--out-dir", tmp_path / "split", "--resume")
    assert r.returncode == 0, r.stderr
    a, _ = train.load_checkpoint(tmp_path / "straight")
    b, _ = train.load_checkpoint(tmp_path / "split")
    torch.testing.assert_close(a.logits_table.weight, b.logits_table.weight, rtol=1e-5, atol=1e-6)
    assert train.load_trainer_state(tmp_path / "split")["step"] == 40


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path, data):
    out = tmp_path / "ck"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.Popen([sys.executable, "-m", "nanogpt_plus.cli", "train", "bigram", "--data", str(data),
                          "--max-iters", "1000000", "--out-dir", str(out), *FAST], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.2)  # wait until it is really training
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    step = train.load_trainer_state(out)["step"]
    assert step >= 10
    r = run("bigram", "--data", data, "--max-iters", step + 5, "--out-dir", out, "--resume", *FAST)
    assert r.returncode == 0, r.stderr
    assert train.load_trainer_state(out)["step"] == step + 5


def test_help_and_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "nanogpt_plus.cli", "train", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--dataset-fraction" in r.stdout and "--resume" in r.stdout
    with pytest.raises(SystemExit) as e: cli.main(["--help"])
    assert e.value.code == 0


def test_train_gpt_with_shape_overrides(tmp_path, data, capsys):
    out = tmp_path / "gpt"
    assert cli.main(["train", "gpt", "--data", str(data), "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                     "--dropout", "0", "--max-iters", "3", "--out-dir", str(out), *FAST]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "gpt"
    assert {k: config["config"][k] for k in ("n_layer", "n_head", "n_embd", "context_size", "dropout")} == {
        "n_layer": 1, "n_head": 2, "n_embd": 16, "context_size": 16, "dropout": 0.0}
    model, _ = train.load_checkpoint(out, kind="gpt")
    assert model.config.vocab_size == len(set(CORPUS))
    capsys.readouterr()
    fails(capsys, "bigram", "--data", data, "--n-layer", "2", "--out-dir", tmp_path / "b", match="--n-layer applies to")
    fails(capsys, "gpt", "--data", data, "--n-head", "5", "--n-embd", "16", "--out-dir", tmp_path / "g",
          match="divisible")
