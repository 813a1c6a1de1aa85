"""Several processes on one machine: tokens/s of 1 process x T threads (and x 1 thread) against N processes x T/N
threads (DDP and FSDP2), and the memory each process holds for weights, gradients and optimizer state under DDP and
under FSDP2.

Every run trains the same GPT on the same global batch (the windows of `--grad-accum-steps` micro-batches of
`--batch-size`, chapter 15), float32, from random tokens. A run is a fresh launch: `python` for one process, torchrun
for N. The launches alternate (one of each, then again) so that other load on the machine hits all alike; each run
reports the median time of its timed steps, and the median over the rounds counts.

Memory: `state_bytes` counts the bytes of the tensors a process holds after a backward (weights, gradients,
optimizer moments: its shards under FSDP2); the resident set size is what the operating system saw, the Python
interpreter and torch's libraries included: its peak (ru_maxrss) and its value after the last step. The trainer
sets glibc's thresholds itself (`reuse_freed_memory`, chapter 7a: freed blocks up to 1 GiB are kept for reuse), so
what the operating system sees is what a training run of the library holds. Prints one JSON line; `--out FILE`
also appends it to FILE (the book reads `nanogpt_plus/results/distributed_throughput.jsonl`).

    python benchmarks/distributed_throughput.py                  # small GPT (4 x 128, context 64) on 2 processes
    python benchmarks/distributed_throughput.py --memory-only --n-layer 8 --n-embd 512 --n-head 8 --batch-size 8 --steps 10
    python benchmarks/distributed_throughput.py --out nanogpt_plus/results/distributed_throughput.jsonl   # keep it
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


def worker(args) -> None:
    "One process of a run (or the whole run): train, time the steps, write this process's numbers as JSON."
    import torch

    from nanogpt_plus.distributed import DistributedTrainer, end_process, joined, state_bytes, torchrun_job
    from nanogpt_plus.gpt import GPT, GPTConfig
    from nanogpt_plus.train import Trainer, TrainConfig

    torch.set_num_threads(args.threads)
    job = torchrun_job(args.strategy, "cpu")
    with joined(job):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=65, context_size=args.context_size, n_layer=args.n_layer, n_head=args.n_head,
                              n_embd=args.n_embd))
        data = torch.randint(65, (200_000,), generator=torch.Generator().manual_seed(0))
        config = TrainConfig(batch_size=args.batch_size, grad_accum_steps=args.grad_accum_steps,
                             context_size=args.context_size, dtype="float32", warmup_iters=0)
        t = (Trainer(model, data, data, config) if job is None else DistributedTrainer(model, data, data, config, job))
        times = []
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            t.train_step()
            if i >= args.warmup: times.append(time.perf_counter() - start)
        n = args.batch_size * args.context_size
        x, y = data[:n].view(args.batch_size, -1), data[1:n + 1].view(args.batch_size, -1)  # (B, T) each
        t.forward(x, y)[1].backward()  # gradients present, as in the middle of a step
        rank = 0 if job is None else job.rank
        Path(args.report, f"rank{rank}.json").write_text(json.dumps({
            "step_s": statistics.median(times), "state_bytes": state_bytes(t.model, t.optimizer),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_bytes": rss()}))
    end_process(0)  # under torchrun, no Python shutdown: gloo's leftover threads could abort it (chapter 15)


def rss() -> int | None:
    "The resident set size of this process now (Linux), in bytes."
    try: return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
    except (OSError, StopIteration): return None


def launch(args, nproc: int, strategy: str | None, threads: int, env: dict) -> dict:
    "Start one run; its processes' reports."
    with tempfile.TemporaryDirectory() as report:
        common = ["--worker", "--report", report, "--threads", str(threads), *args.model_args]
        if strategy: common += ["--strategy", strategy]
        cmd = ([sys.executable, __file__, *common] if nproc == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), __file__, *common])
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), **env)
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        return {int(p.stem[4:]): json.loads(p.read_text()) for p in Path(report).glob("rank*.json")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--context-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-accum-steps", type=int, default=2, help="micro-batches per step, over all processes")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of the one process; N processes get T/N each")
    p.add_argument("--memory-only", action="store_true", help="one DDP run and one FSDP2 run, for their memory")
    p.add_argument("--out", type=Path, help="a JSON lines file to append the line to")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    model_keys = ("n_layer", "n_head", "n_embd", "context_size", "batch_size", "grad_accum_steps", "steps", "warmup")
    args.model_args = [a for k in model_keys for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    if args.worker: return worker(args)

    load = os.getloadavg()[0]
    each = max(1, args.threads // args.nproc)
    runs = {"one": (1, None, args.threads, {}), "one-1-thread": (1, None, 1, {}), "ddp": (args.nproc, "ddp", each, {}),
            "fsdp": (args.nproc, "fsdp", each, {})}
    if args.memory_only:
        runs = {name: runs[name] for name in ("ddp", "fsdp")}
        args.rounds = 1
    results = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items(): results[name].append(launch(args, *run))
    tokens = args.batch_size * args.grad_accum_steps * args.context_size
    out = {"benchmark": "distributed_throughput", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
           "memory_only": args.memory_only, "config": {k: getattr(args, k) for k in model_keys}, "nproc": args.nproc,
           "threads": args.threads, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
           "load_average_before": round(load, 2), "load_average_after": round(os.getloadavg()[0], 2)}
    for name, reports in results.items():
        step_s = statistics.median(max(r["step_s"] for r in rep.values()) for rep in reports)  # the slowest process sets the pace
        last = reports[-1]
        out[name] = {"tokens_per_s": round(tokens / step_s, 1), "processes": runs[name][0], "threads_each": runs[name][2],
                     "state_bytes_per_process": [sum(last[r]["state_bytes"].values()) for r in sorted(last)],
                     "state_bytes_detail_rank0": last[0]["state_bytes"],
                     "peak_rss_bytes_per_process": [last[r]["peak_rss_bytes"] for r in sorted(last)],
                     "final_rss_bytes_per_process": [last[r]["rss_bytes"] for r in sorted(last)]}
    if "one" in out:
        for name in ("one-1-thread", "ddp", "fsdp"):
            out[name]["speed_vs_one"] = round(out[name]["tokens_per_s"] / out["one"]["tokens_per_s"], 3)
    print(json.dumps(out))
    if args.out:
        with open(args.out, "a") as f: f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
