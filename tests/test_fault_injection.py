"""A training run killed with SIGKILL at random instants, many times over (saves included), always leaves one whole
checkpoint, and the chain of resumes ends exactly where a run never interrupted ends. Slow: runs in CI's slow stage."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanogpt_plus.checkpoint import MANIFEST, load_checkpoint, load_trainer_state
from nanogpt_plus.train import read_metrics

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
STEPS = 80


def command(data, out, *extra):
    return [sys.executable, "-m", "nanogpt_plus", "train", "gpt", "--data", str(data), "--out-dir", str(out),
            "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--dropout", "0.1", "--batch-size", "4",
            "--context-size", "16", "--eval-interval", "1", "--eval-iters", "1", "--log-interval", "1",
            "--max-iters", str(STEPS), "--dtype", "float32", "--seed", "7", "--no-progress", *extra]


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")  # one thread: the same sums in every process


def same_records(a, b):
    "Metrics records equal but for the clock."
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("time_s", "tokens_per_s")} for r in rs]
    return strip(a) == strip(b)


@pytest.mark.slow
def test_sigkill_at_random_instants(tmp_path):
    data = tmp_path / "input.txt"
    data.write_text(CORPUS * 60, encoding="utf-8")
    straight = subprocess.run(command(data, tmp_path / "straight"), env=ENV, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    out, rng, kills, resumes = tmp_path / "killed", random.Random(0), 0, 0
    while kills < 25:
        resumable = (out / "trainer_state.pt").exists()
        p = subprocess.Popen(command(data, out, "--resume" if resumable else "--overwrite"), env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        metrics, deadline = out / "metrics.jsonl", time.time() + 120
        while time.time() < deadline and p.poll() is None and not metrics.exists():
            time.sleep(0.01)  # training has started
        time.sleep(rng.uniform(0, 0.6))  # then a random instant: a step, an evaluation or a save
        if p.poll() is not None: break  # the run finished before the kill
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        if not (out / MANIFEST).exists() and not (out / ".checkpoint.json.pending").exists(): continue  # none yet
        model, _ = load_checkpoint(out)  # whole and self-consistent, or this raises
        state = load_trainer_state(out)  # checks the state's step against the manifest's
        assert json.loads((out / MANIFEST).read_text())["step"] == state["step"]
        assert all(p.isfinite().all() for p in model.parameters())
        resumes += resumable
    final = subprocess.run(command(data, out, "--resume"), env=ENV, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    assert kills == 25 and resumes >= 10
    a, _ = load_checkpoint(tmp_path / "straight")
    b, _ = load_checkpoint(out)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)  # bit for bit
    assert same_records(read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(out / "metrics.jsonl"))
    assert not [p.name for p in out.iterdir() if p.name.endswith((".new", ".tmp", ".pending"))]
