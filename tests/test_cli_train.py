"`nanogpt-plus train`: runs in a subprocess, bad input (exit 2, no traceback), exact resume, signals, run files."
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanogpt_plus import cli
from nanogpt_plus.checkpoint import load_checkpoint, load_trainer_state

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
FAST = ["--batch-size", "4", "--context-size", "16", "--eval-iters", "2", "--eval-interval", "10", "--no-progress"]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(CORPUS * 60, encoding="utf-8")
    return path


def run(*args, **kw):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "nanogpt_plus", "train", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300, **kw)


def fails(capsys, *args, match):
    "In process (fast): `main` returns 2 and prints one `error:` line that contains `match`."
    capsys.readouterr()  # forget what earlier calls printed
    assert cli.main(["train", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err, err


def test_train_bigram_writes_a_checkpoint_that_loads(tmp_path, data):
    out = tmp_path / "ck"
    r = run("bigram", "--data", data, "--max-iters", 30, "--out-dir", out, "--seed", 3, "--device", "cpu", *FAST)
    assert r.returncode == 0, r.stderr
    assert "validation loss" in r.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt", "checkpoint.json", "metrics.jsonl",
            "loss.png", "run.toml", "best"} <= {p.name for p in out.iterdir()}
    model, tok = load_checkpoint(out)
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
    (tmp_path / "latin1.txt").write_bytes("Où est la plume?".encode("latin-1"))
    fails(capsys, "bigram", "--data", tmp_path / "latin1.txt", "--out-dir", tmp_path / "o", match="not UTF-8")
    fails(capsys, "bigram", "--data", "/dev/zero", "--out-dir", tmp_path / "o", match="not a regular file")
    os.mkfifo(tmp_path / "fifo")
    fails(capsys, "bigram", "--data", tmp_path / "fifo", "--out-dir", tmp_path / "o", match="not a regular file")


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1", "nan"])
def test_dataset_fraction_out_of_range(tmp_path, data, capsys, value):
    with pytest.raises(SystemExit) as e: cli.main(["train", "bigram", "--data", str(data), "--dataset-fraction", value])
    assert e.value.code == 2 and "--dataset-fraction" in capsys.readouterr().err


def test_dataset_fraction_keeps_the_whole_vocabulary(tmp_path, capsys):
    "nanoGPTplus's `--dataset-fraction 0.001` followed by a prompt with a character only the rest of the text has."
    path = tmp_path / "text.txt"
    path.write_text("abc def\n" * 2000 + "Hello world \n", encoding="utf-8")
    out = tmp_path / "ck"
    assert cli.main(["train", "bigram", "--data", str(path), "--dataset-fraction", "0.5", "--max-iters", "5",
                     "--out-dir", str(out), *FAST]) == 0
    _, tok = load_checkpoint(out)
    assert set("Hello world ") <= set(tok.chars)
    assert cli.main(["generate", "bigram", "--checkpoint", str(out), "--continue-tokens", "Hello world ",
                     "--max-new-tokens", "5", "--seed", "0"]) == 0
    capsys.readouterr()
    fails(capsys, "bigram", "--data", path, "--dataset-fraction", "0.001", "--out-dir", tmp_path / "o", *FAST,
          match="use --dataset-fraction 0.0113 or more")


def test_unknown_device(tmp_path, data, capsys):
    fails(capsys, "bigram", "--data", data, "--device", "tpu", "--out-dir", tmp_path / "o", match="unknown device")


def test_bad_checkpoint_directories(tmp_path, data, capsys):
    out = tmp_path / "ck"
    assert cli.main(["train", "bigram", "--data", str(data), "--max-iters", "5", "--out-dir", str(out), *FAST]) == 0
    fails(capsys, "bigram", "--data", data, "--max-iters", 5, "--out-dir", out, *FAST, match="already holds a checkpoint")
    fails(capsys, "gpt", "--data", data, "--out-dir", out, "--resume", *FAST, match="holds a bigram model")
    fails(capsys, "bigram", "--data", data, "--out-dir", out, "--resume", "--overwrite", *FAST, match="not both")
    fails(capsys, "bigram", "--data", data, "--out-dir", out, "--auto-resume", "--overwrite", *FAST, match="not both")
    fails(capsys, "bigram", "--data", data, "--out-dir", tmp_path / "nothing", "--resume", *FAST, match="nothing to resume")
    assert not (tmp_path / "nothing").exists()  # and nothing was created


def test_resuming_a_finished_run_is_a_success(tmp_path, data, capsys):
    "`--resume` (or `--auto-resume`) on a run that has done its steps: exit 0, it says so, nothing is written."
    out = tmp_path / "ck"
    assert cli.main(["train", "bigram", "--data", str(data), "--max-iters", "5", "--out-dir", str(out), *FAST]) == 0
    files = lambda: {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"}  # the run lock is taken
    before = files()
    for flag in ("--resume", "--auto-resume"):
        capsys.readouterr()
        assert cli.main(["train", "bigram", "--data", str(data), "--out-dir", str(out), flag, *FAST]) == 0
        assert "is complete: it has done its 5 steps" in capsys.readouterr().out
    assert files() == before
    assert cli.main(["train", "bigram", "--data", str(data), "--max-iters", "8", "--out-dir", str(out), "--resume", *FAST]) == 0
    assert load_trainer_state(out)["step"] == 8  # a larger --max-iters still continues it


@pytest.mark.slow
def test_a_scheduler_relaunches_the_same_command_until_it_succeeds(tmp_path, data):
    """A job scheduler's loop: launch one command, SIGKILL it once a new checkpoint is on disk, launch the very same
    command again, until it exits 0. The run ends with the weights of a run never stopped, and one more launch of the
    finished job exits 0 at once."""
    command = [sys.executable, "-m", "nanogpt_plus", "train", "gpt", "--data", str(data), "--n-layer", "1", "--n-head",
               "2", "--n-embd", "16", "--dropout", "0.1", "--max-iters", "120", "--auto-resume", "--dtype", "float32",
               *FAST]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    out = tmp_path / "job"
    kills, launches, seen = 0, 0, 0
    while launches < 20:
        launches += 1
        p = subprocess.Popen([*command, "--out-dir", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        while p.poll() is None and kills < 3:  # kill it once its checkpoint is past the last one seen
            try: step = load_trainer_state(out)["step"]
            except Exception: step = 0  # none yet, or being replaced
            if step > seen:
                seen = step
                p.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.02)
        _, err = p.communicate(timeout=300)
        if p.returncode == 0: break
        assert p.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert p.returncode == 0 and kills >= 1, (launches, kills)
    again = subprocess.run([*command, "--out-dir", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "is complete" in again.stdout
    straight = subprocess.run([*command, "--out-dir", str(tmp_path / "straight")], env=env, capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    a, b = (load_checkpoint(d)[0].state_dict() for d in (out, tmp_path / "straight"))
    for name in a: assert torch.equal(a[name], b[name]), name


def test_errors_have_no_traceback_in_a_real_process(tmp_path):
    r = run("bigram", "--data", tmp_path / "missing.txt")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_resume_20_plus_20_equals_40(tmp_path, data):
    common = ["bigram", "--data", data, "--seed", 5, "--lr-decay-iters", 40, *FAST]
    assert run(*common, "--max-iters", 40, "--out-dir", tmp_path / "straight").returncode == 0
    assert run(*common, "--max-iters", 20, "--out-dir", tmp_path / "split").returncode == 0
    r = run(*common, "--max-iters", 40, "--out-dir", tmp_path / "split", "--resume")
    assert r.returncode == 0, r.stderr
    a, _ = load_checkpoint(tmp_path / "straight")
    b, _ = load_checkpoint(tmp_path / "split")
    torch.testing.assert_close(a.logits_table.weight, b.logits_table.weight, rtol=1e-5, atol=1e-6)
    assert load_trainer_state(tmp_path / "split")["step"] == 40


def test_resume_refuses_another_text_of_the_same_length(tmp_path, data, capsys):
    out = tmp_path / "ck"
    assert cli.main(["train", "bigram", "--data", str(data), "--max-iters", "5", "--out-dir", str(out), *FAST]) == 0
    (tmp_path / "reversed.txt").write_text(data.read_text()[::-1], encoding="utf-8")
    fails(capsys, "bigram", "--data", tmp_path / "reversed.txt", "--max-iters", 10, "--out-dir", out, "--resume", *FAST,
          match="not the same ones")


def start_training(data, out, *extra):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.Popen([sys.executable, "-m", "nanogpt_plus", "train", "bigram", "--data", str(data),
                          "--max-iters", "1000000", "--out-dir", str(out), *FAST, *extra], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.2)  # wait until it is really training
    return p


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_resumable_checkpoint(tmp_path, data, sig, status):
    out = tmp_path / "ck"
    p = start_training(data, out)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == status, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    step = load_trainer_state(out)["step"]
    assert step >= 10
    r = run("bigram", "--data", data, "--max-iters", step + 5, "--out-dir", out, "--resume", *FAST)
    assert r.returncode == 0, r.stderr
    assert load_trainer_state(out)["step"] == step + 5


def test_one_trainer_per_out_dir(tmp_path, data):
    out = tmp_path / "ck"
    first = start_training(data, out)
    try:
        r = run("bigram", "--data", data, "--max-iters", 5, "--out-dir", out, "--overwrite", *FAST)
        assert r.returncode == 2 and "is in use by a running trainer" in r.stderr and f"pid {first.pid}" in r.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143  # the first run was not disturbed: it stopped when asked, with a checkpoint
    assert load_trainer_state(out)["step"] >= 10


def test_a_diverged_run_stops_with_its_last_good_checkpoint(tmp_path, data):
    out = tmp_path / "ck"
    common = ["gpt", "--data", data, "--n-layer", 1, "--n-head", 2, "--n-embd", 16, "--out-dir", out, *FAST]
    explode = ["--learning-rate", 1e37, "--grad-clip", 0]  # the weights overflow within a few steps
    r = run(*common, "--max-iters", 50, *explode)
    assert r.returncode == 2 and "became infinite or NaN" in r.stderr and "saved no checkpoint yet" in r.stderr, r.stderr
    assert run(*common, "--max-iters", 10, "--overwrite").returncode == 0
    r = run(*common, "--max-iters", 50, *explode, "--resume")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "became infinite or NaN" in r.stderr and "the last good checkpoint (step 10)" in r.stderr, r.stderr
    assert load_trainer_state(out)["step"] == 10
    assert all(p.isfinite().all() for p in load_checkpoint(out)[0].parameters())
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))  # strict JSON


def test_a_full_disk_says_which_file_and_keeps_the_checkpoint(tmp_path, data):
    "A file-size limit (RLIMIT_FSIZE) makes writes fail as a full disk would, without filling one."
    import resource
    out = tmp_path / "ck"
    common = ["gpt", "--data", data, "--n-layer", 2, "--n-head", 2, "--n-embd", 64, *FAST]
    assert run(*common, "--max-iters", 10, "--out-dir", out).returncode == 0
    files = json.loads((out / "checkpoint.json").read_text())["files"]
    before = {name: (out / name).read_bytes() for name in [*files, "checkpoint.json"]}
    limit = (out / "model.safetensors").stat().st_size // 2
    r = run(*common, "--max-iters", 20, "--out-dir", out, "--resume",
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "could not write" in r.stderr and "model.safetensors" in r.stderr and "(step 10) is intact" in r.stderr
    assert {name: (out / name).read_bytes() for name in before} == before
    assert load_trainer_state(out)["step"] == 10 and load_checkpoint(out)[0].config.n_embd == 64


def test_absurd_sizes_are_refused_at_once(tmp_path, data, capsys):
    for flags in (["--context-size", "1000000000"], ["--n-embd", "200000000", "--n-head", "1"]):
        fails(capsys, "gpt", "--data", data, *flags, "--out-dir", tmp_path / "o", "--no-progress", match="needs at least")
    import resource
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fails(capsys, "gpt", "--data", data, "--n-layer", "1000000", "--n-embd", "4096", "--n-head", "32",
          "--out-dir", tmp_path / "o", "--no-progress", match="needs at least")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing big was allocated


def test_seed_spellings_of_nanogptplus(tmp_path, data, capsys):
    "The seed's commands, translated one to one: `train bigram --size large` works; other bigram sizes do not."
    assert cli.main(["train", "bigram", "--size", "large", "--data", str(data), "--max-iters", "3",
                     "--out-dir", str(tmp_path / "b"), *FAST]) == 0
    fails(capsys, "bigram", "--size", "small", "--data", data, "--out-dir", tmp_path / "c", match="has no size 'small'")
    fails(capsys, "gpt", "--size", "small", "--gpt2-config", "gpt2", "--data", data, match="not both")
    fails(capsys, "gpt", "--size", "huge", "--data", data, match="has no size 'huge'")


def test_run_configurations(tmp_path, data, capsys):
    (tmp_path / "run.toml").write_text(f'model = "gpt"\ndata = "{data}"\nn_layer = 1\nn_head = 2\nn_embd = 16\n'
                                       'context_size = 16\nbatch_size = 4\nmax_iters = 8\neval_interval = 4\n'
                                       'eval_iters = 1\ndropout = 0.0\n')
    out = tmp_path / "ck"
    assert cli.main(["train", "--config", str(tmp_path / "run.toml"), "--max-iters", "6", "--out-dir", str(out),
                     "--no-progress"]) == 0  # the flag overrides the file
    assert load_trainer_state(out)["step"] == 6 and load_checkpoint(out)[0].config.n_layer == 1
    stored = (out / "run.toml").read_text()
    assert "max_iters = 6" in stored and "n_layer = 1" in stored
    again = tmp_path / "again"
    assert cli.main(["train", "--config", str(out / "run.toml"), "--out-dir", str(again), "--no-progress"]) == 0
    assert torch.equal(load_checkpoint(out)[0].tok_emb.weight, load_checkpoint(again)[0].tok_emb.weight)  # repeated
    (tmp_path / "typo.toml").write_text('model = "gpt"\nlerning_rate = 1e-3\n')
    fails(capsys, "--config", tmp_path / "typo.toml", match="unknown setting(s) lerning_rate")
    (tmp_path / "bad.toml").write_text('model = "gpt"\nmax_iters = -3\n')
    fails(capsys, "--config", tmp_path / "bad.toml", match="max_iters must be >= 1")
    (tmp_path / "broken.toml").write_text('model = "gpt\n')
    fails(capsys, "--config", tmp_path / "broken.toml", match="is not valid TOML")
    fails(capsys, "--config", "no-such-recipe", match="shakespeare-char")
    fails(capsys, "--data", data, match="say which model to train")
    assert "shakespeare-char" in cli.recipes()


def test_learning_rate_must_be_finite(capsys):
    for value in ("inf", "nan", "-1"):
        with pytest.raises(SystemExit) as e: cli.main(["train", "bigram", "--learning-rate", value])
        assert e.value.code == 2 and "--learning-rate" in capsys.readouterr().err


def test_prepared_tokens_train_like_the_text(tmp_path, data, capsys):
    assert cli.main(["prepare", str(data), "--out-dir", str(tmp_path / "tokens"), "--no-progress"]) == 0
    assert "train on them with" in capsys.readouterr().out
    common = ["bigram", "--max-iters", "10", "--seed", "1", *FAST]
    assert cli.main(["train", *common, "--data", str(tmp_path / "tokens"), "--out-dir", str(tmp_path / "a")]) == 0
    assert cli.main(["train", *common, "--data", str(data), "--out-dir", str(tmp_path / "b")]) == 0
    a, b = load_checkpoint(tmp_path / "a")[0], load_checkpoint(tmp_path / "b")[0]
    assert torch.equal(a.logits_table.weight, b.logits_table.weight)
    capsys.readouterr()
    fails(capsys, "gpt", "--gpt2-config", "gpt2", "--data", tmp_path / "tokens", "--out-dir", tmp_path / "c",
          match="prepare it with --tokenizer gpt2")


def test_help_and_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "nanogpt_plus", "train", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--dataset-fraction" in r.stdout and "--resume" in r.stdout and "--config" in r.stdout
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
    model, _ = load_checkpoint(out, kind="gpt")
    assert model.config.vocab_size == len(set(CORPUS))
    capsys.readouterr()
    fails(capsys, "bigram", "--data", data, "--n-layer", "2", "--out-dir", tmp_path / "b", match="--n-layer applies to")
    fails(capsys, "gpt", "--data", data, "--n-head", "5", "--n-embd", "16", "--out-dir", tmp_path / "g",
          match="divisible")
