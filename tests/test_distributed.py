"""Training on several processes (chapter 15), with real torchrun launches of 2 CPU processes (gloo) and tiny models:
DDP and FSDP2 equal one process with the same global batch, checkpoints resume across world sizes (exactly with the
same one), two "machines" on 127.0.0.1, a signal on one process, a killed process, and launches that are refused."""
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanogpt_plus import cli
from nanogpt_plus.checkpoint import MANIFEST, load_checkpoint, load_trainer_state
from nanogpt_plus.data import get_batch
from nanogpt_plus.distributed import bytes_sent_per_step, end_process, rank_batches, share_of_step, torchrun_job
from nanogpt_plus.train import TrainConfig, read_metrics

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak!\n\nAll:\nSpeak, speak.\n"  # 31 characters: an odd
# vocabulary, so that the embedding's rows do not split evenly between 2 processes (FSDP2 pads the last shard)
MODEL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--context-size", "16", "--batch-size", "4",
         "--dtype", "float32", "--seed", "7", "--no-progress"]
STEPS = ["--max-iters", "20", "--lr-decay-iters", "20", "--eval-interval", "10", "--eval-iters", "3",
         "--log-interval", "5", "--grad-clip", "0.1"]  # a clip this small acts at every step: it is tested too
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # what the `torchrun` script runs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "input.txt"
    path.write_text(CORPUS * 60, encoding="utf-8")
    return path


def train_args(data, out, *extra):
    return ["train", "gpt", "--data", str(data), "--out-dir", str(out), *MODEL, *STEPS, *extra]


def torchrun(data, out, *extra, nproc=2, launcher=("--standalone",), timeout=300):
    "Run `torchrun ... -m nanogpt_plus train gpt` to the end; the completed process."
    cmd = [*TORCHRUN, *launcher, "--nproc-per-node", str(nproc), "-m", "nanogpt_plus", *train_args(data, out, *extra)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def single(data, out, *extra):
    "One plain process, here in the test's process (fast)."
    assert cli.main(train_args(data, out, *extra)) == 0


def weights(out) -> torch.Tensor:
    model, _ = load_checkpoint(out)
    return torch.cat([t.flatten() for t in model.state_dict().values()])


def largest_difference(a, b) -> float:
    return (weights(a) - weights(b)).abs().max().item()


def evaluations(out) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in read_metrics(Path(out) / "metrics.jsonl") if "val_loss" in r]


# --- sharing out a batch (no processes needed) ---

def one_process_windows(data, config, steps):
    g = torch.Generator().manual_seed(config.seed)
    return [torch.cat([get_batch(data, config.batch_size, config.context_size, g)[0]
                       for _ in range(config.grad_accum_steps)]) for _ in range(steps)]


@pytest.mark.parametrize("batch_size,accum,world", [(4, 4, 2), (4, 2, 2), (4, 1, 2), (4, 3, 2), (6, 1, 3), (2, 6, 4),
                                                    (5, 8, 8), (3, 1, 1)])
def test_the_processes_share_out_exactly_the_one_process_batch(batch_size, accum, world):
    data = torch.arange(1000)  # a window's first token is its start: windows are easy to compare
    config = TrainConfig(batch_size=batch_size, grad_accum_steps=accum, context_size=8, seed=3)
    gens = [torch.Generator().manual_seed(config.seed) for _ in range(world)]
    micro, count = share_of_step(batch_size, accum, world)
    assert micro * count * world == batch_size * accum and micro <= batch_size
    for step, expected in enumerate(one_process_windows(data, config, steps=3)):
        shares = [rank_batches(data, config, g, r, world) for r, g in enumerate(gens)]
        assert all(len(s) == count and all(x.shape == (micro, 8) for x, _ in s) for s in shares)
        got = torch.cat([x for s in shares for x, _ in s])
        assert torch.equal(got, expected), step  # the same windows, in the same order
        assert all(torch.equal(y[:, :-1], x[:, 1:]) for s in shares for x, y in s)
    assert len({g.get_state().sum().item() for g in gens}) == 1  # every process's generator is where one process's is


def test_a_world_size_that_does_not_divide_the_step_is_refused():
    with pytest.raises(ValueError, match="cannot be shared evenly by 3 processes: make one of them a multiple of 3"):
        share_of_step(4, 1, 3)
    with pytest.raises(ValueError, match="a multiple of 2"):
        share_of_step(3, 3, 6)
    assert share_of_step(32, 1, 2) == (16, 1) and share_of_step(8, 4, 2) == (8, 2) and share_of_step(4, 3, 2) == (2, 3)


def test_bytes_sent_per_step():
    assert bytes_sent_per_step(1000, 1, "ddp") == 0
    assert bytes_sent_per_step(1000, 2, "ddp") == 4000  # all-reduce: 2 (N-1)/N of the gradient bytes
    assert bytes_sent_per_step(1000, 4, "fsdp") == 9000  # 3 (N-1)/N: gather, gather again, reduce-scatter
    assert bytes_sent_per_step(1000, 4, "fsdp", micro_steps=2) == 15000  # the weights are gathered per micro-batch
    with pytest.raises(ValueError, match="unknown strategy"): bytes_sent_per_step(1000, 2, "zero3")


def test_torchrun_job_reads_torchrun_s_environment():
    assert torchrun_job(None, "cpu", env={}) is None  # one plain process
    job = torchrun_job("fsdp", "cpu", env={"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (job.strategy, job.rank, job.world_size, job.local_rank, job.backend, job.main) == ("fsdp", 3, 4, 1, "gloo", False)
    assert torchrun_job(None, "cpu", env={"RANK": "0", "WORLD_SIZE": "2"}).strategy == "ddp"  # the default
    with pytest.raises(ValueError, match="torchrun starts them"): torchrun_job("ddp", "cpu", env={})
    with pytest.raises(ValueError, match="unknown strategy"): torchrun_job("zero", "cpu", env={})


# --- bad launches get one clear line ---

def fails(capsys, argv, match):
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err, err


def test_parallel_without_torchrun_is_refused(tmp_path, data, capsys):
    fails(capsys, train_args(data, tmp_path / "o", "--parallel", "fsdp"), match="--parallel fsdp needs several processes")
    assert not (tmp_path / "o").exists()


def test_a_world_size_that_does_not_divide_the_batch_is_refused(tmp_path, data, capsys, monkeypatch):
    "What each of 3 processes started by torchrun sees (checked before they connect, so no process waits)."
    for name, value in dict(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    fails(capsys, train_args(data, tmp_path / "o", "--grad-accum-steps", "1"),
          match="--grad-accum-steps 1 x --batch-size 4 = 4 windows cannot be shared evenly by 3 processes")


def test_a_plain_process_ends_as_usual(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as e: end_process(3)
    assert e.value.code == 3


def test_a_job_process_ends_with_its_status_and_everything_it_printed(tmp_path, data):
    "Under torchrun `python -m nanogpt_plus` ends with os._exit (no Python shutdown, see `end_process`): nothing is lost."
    job = dict({k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # buffered stdout, as python -m has by default
    run = lambda *extra: subprocess.run([sys.executable, "-m", "nanogpt_plus", *train_args(data, tmp_path / "o", *extra)],
                                        env=job, capture_output=True, text=True, timeout=300)
    r = run("--max-iters", "2")  # a job of one process: it connects, trains, leaves the group
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("done: 2 steps"), r.stdout  # print()ed to a pipe, so buffered: flushed before os._exit
    r = run("--max-iters", "2")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "already holds a checkpoint" in r.stderr, r.stderr


# --- real runs: 2 processes against 1 ---

@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    "Runs made on first use and shared by the tests: name -> output directory."
    root, made = tmp_path_factory.mktemp("runs"), {}

    def get(name):
        if name not in made:
            out, kind, accum = root / name, *name.split("-")
            if kind == "one": single(data, out, "--grad-accum-steps", accum)
            else:
                r = torchrun(data, out, "--grad-accum-steps", accum, "--parallel", kind)
                assert r.returncode == 0, r.stderr[-3000:]
            made[name] = out
        return made[name]
    return get


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("accum", ["2", "4"])  # per process: 1 micro-batch (no accumulation), or 2
def test_two_processes_equal_one_with_the_same_global_batch(runs, strategy, accum):
    one, two = runs(f"one-{accum}"), runs(f"{strategy}-{accum}")
    assert largest_difference(one, two) < 1e-5  # 20 steps, float32, every step clipped
    assert load_trainer_state(two)["step"] == 20
    for (s1, v1), (s2, v2) in zip(evaluations(one), evaluations(two), strict=True):
        assert s1 == s2 and math.isclose(v1, v2, abs_tol=1e-5)
    keys = lambda out: [sorted(r) for r in read_metrics(out / "metrics.jsonl")]
    assert keys(one) == keys(two)  # the same records: a distributed run logs like one process


def test_resume_with_another_number_of_processes(runs, data, tmp_path):
    "2 -> 1 (DDP) and 1 -> 2 (FSDP2) both continue to what one process does in one go (to float round-off)."
    r = torchrun(data, tmp_path / "two-then-one", "--grad-accum-steps", "4", "--max-iters", "10")
    assert r.returncode == 0, r.stderr[-3000:]
    single(data, tmp_path / "two-then-one", "--grad-accum-steps", "4", "--resume")
    single(data, tmp_path / "one-then-two", "--grad-accum-steps", "4", "--max-iters", "10")
    r = torchrun(data, tmp_path / "one-then-two", "--grad-accum-steps", "4", "--resume", "--parallel", "fsdp")
    assert r.returncode == 0, r.stderr[-3000:]
    for out in ("two-then-one", "one-then-two"):
        assert load_trainer_state(tmp_path / out)["step"] == 20
        assert largest_difference(runs("one-4"), tmp_path / out) < 1e-5
        assert [s for s, _ in evaluations(tmp_path / out)] == [0, 10, 20]


def test_resume_with_the_same_number_of_processes_is_bit_exact(runs, data, tmp_path):
    out = tmp_path / "split"
    r = torchrun(data, out, "--grad-accum-steps", "4", "--max-iters", "10", "--parallel", "fsdp")
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(data, out, "--grad-accum-steps", "4", "--resume", "--parallel", "fsdp")
    assert r.returncode == 0, r.stderr[-3000:]
    assert largest_difference(runs("fsdp-4"), out) == 0
    assert evaluations(runs("fsdp-4")) == evaluations(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_through_torchrun_s_rendezvous(runs, data, tmp_path):
    "Two torchruns of one process each, as on two machines, meeting at --rdzv-endpoint: the same run as one torchrun of two."
    out, port = tmp_path / "nodes", free_port()
    cmd = lambda node: [*TORCHRUN, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--rdzv-endpoint",
                        f"127.0.0.1:{port}", "-m", "nanogpt_plus", *train_args(data, out, "--grad-accum-steps", "4")]
    nodes = [subprocess.Popen(cmd(n), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    results = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [err[-2000:] for _, err in results]
    assert largest_difference(runs("ddp-4"), out) == 0
    assert "2 processes (ddp)" in results[0][1] + results[1][1]


# --- signals and failures ---

def workers(parent: int, n: int, timeout: float = 120) -> dict[int, int]:
    "{rank: pid} of the `n` processes torchrun (process `parent`) started, read from /proc."
    deadline, found = time.time() + timeout, {}
    while len(found) < n and time.time() < deadline:
        for p in Path("/proc").iterdir():
            try:
                if not p.name.isdigit() or int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent: continue
                env = dict(kv.split("=", 1) for kv in (p / "environ").read_bytes().decode().split("\0") if "=" in kv)
                found[int(env["RANK"])] = int(p.name)
            except (OSError, ValueError, KeyError, IndexError): pass  # gone, or not yet a worker
        time.sleep(0.1)
    return found


def start_long_run(data, out, *extra):
    "A run of 2 processes that would go on for a long time, once it has written its first checkpoint."
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "nanogpt_plus",
           *train_args(data, out, "--grad-accum-steps", "2", "--max-iters", "1000000", "--eval-interval", "25", *extra)]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not (out / MANIFEST).exists(): time.sleep(0.1)
    assert p.poll() is None and (out / MANIFEST).exists(), "the run did not start"
    ranks = workers(p.pid, 2)
    assert sorted(ranks) == [0, 1], ranks
    return p, ranks


@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])
def test_sigterm_on_one_process_stops_all_at_the_same_step_with_one_checkpoint(data, tmp_path, strategy):
    out = tmp_path / "run"
    p, ranks = start_long_run(data, out, "--parallel", strategy)
    time.sleep(0.5)
    os.kill(ranks[1], signal.SIGTERM)  # not process 0, which writes the checkpoints: it must hear of it
    text, _ = p.communicate(timeout=120)
    assert p.returncode != 0
    stopped = [line for line in text.splitlines() if line.startswith("terminated at step ")]
    assert len(stopped) == 1, text[-3000:]  # process 0 reports it, once
    step = int(stopped[0].split()[3].rstrip(":"))
    assert load_trainer_state(out)["step"] == step and json.loads((out / MANIFEST).read_text())["step"] == step
    assert "exitcode  : 143" in text  # torchrun's summary: the processes ended as SIGTERM asks
    assert not [f.name for f in out.iterdir() if f.name.endswith((".new", ".tmp", ".pending"))]


def test_a_killed_process_stops_the_others_with_a_clear_message(data, tmp_path):
    out = tmp_path / "run"
    p, ranks = start_long_run(data, out, "--parallel", "fsdp")
    saved = json.loads((out / MANIFEST).read_text())["step"]
    os.kill(ranks[1], signal.SIGKILL)
    text, _ = p.communicate(timeout=120)  # no hang (a hang times out here): the others fail at their next collective
    assert p.returncode != 0
    assert "lost the others after step" in text or "Signal 9 (SIGKILL)" in text, text[-3000:]
    assert "rank      : 1" in text  # torchrun's summary names the process that died
    model, _ = load_checkpoint(out)  # the last checkpoint is whole
    assert load_trainer_state(out)["step"] >= saved and all(t.isfinite().all() for t in model.state_dict().values())


@pytest.mark.slow
def test_ctrl_c_on_torchrun_stops_every_process_with_one_checkpoint(data, tmp_path):
    "A terminal sends Ctrl-C to torchrun alone (its processes run in sessions of their own); it passes SIGINT on."
    out = tmp_path / "run"
    p, _ = start_long_run(data, out, "--parallel", "ddp")
    p.send_signal(signal.SIGINT)
    text, _ = p.communicate(timeout=120)
    stopped = [line for line in text.splitlines() if line.startswith("interrupted at step ")]
    assert len(stopped) == 1, text[-3000:]
    assert load_trainer_state(out)["step"] == int(stopped[0].split()[3].rstrip(":"))


@pytest.mark.slow
def test_a_hung_process_makes_the_others_give_up_after_the_timeout(data, tmp_path):
    out = tmp_path / "run"
    p, ranks = start_long_run(data, out, "--parallel", "ddp", "--dist-timeout", "5")
    os.kill(ranks[1], signal.SIGSTOP)  # alive but silent: torchrun cannot tell, the timeout can
    try: text, _ = p.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError): os.kill(ranks[1], signal.SIGKILL)
    assert p.returncode != 0 and "lost the others after step" in text and "imed out" in text, text[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_with_dropout_is_bit_exact_for_the_same_number_of_processes(data, tmp_path, strategy):
    "Each process's dropout masks come back: every process's random state is in the checkpoint."
    common = ["--grad-accum-steps", "4", "--dropout", "0.1", "--parallel", strategy]
    for out, extra in (("straight", []), ("split", ["--max-iters", "10"]), ("split", ["--resume"])):
        r = torchrun(data, tmp_path / out, *common, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    assert largest_difference(tmp_path / "straight", tmp_path / "split") == 0


@pytest.mark.slow
def test_three_processes_for_a_batch_of_four_are_refused(data, tmp_path):
    "Every process refuses; torchrun ends the others at the first exit status 2, so not all may get to say so."
    r = torchrun(data, tmp_path / "o", "--grad-accum-steps", "1", nproc=3)
    assert r.returncode != 0
    assert 1 <= r.stderr.count("cannot be shared evenly by 3 processes") <= 3, r.stderr[-3000:]
    assert "training gpt" not in r.stderr and not (tmp_path / "o" / MANIFEST).exists()  # nothing trained or written


def test_a_distributed_run_counts_the_flops_of_one_process_with_the_same_batch(data, tmp_path):
    "The whole run's FLOPs, Muon's Newton-Schulz iterations included, as one process counts them and a budget assumes."
    muon = ("--optimizer", "muon", "--grad-accum-steps", "2", "--max-iters", "2")
    r = torchrun(data, tmp_path / "two", *muon, "--parallel", "ddp")
    assert r.returncode == 0, r.stderr[-3000:]
    single(data, tmp_path / "one", *muon)
    one, two = load_trainer_state(tmp_path / "one"), load_trainer_state(tmp_path / "two")
    assert one["flops"] > 0 and two["flops"] == one["flops"], (one["flops"], two["flops"])
