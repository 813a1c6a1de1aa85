"""Chapter 13's CPU speed-run: train the recipe for a budget of training FLOPs and print one JSON line.

`--budget 5e13` runs the shipped run configuration `speedrun-5e13`, `--budget 1.5e14` runs `speedrun-1.5e14`, as a
user would (`nanogpt-plus train --config NAME`, in a process of its own), on tiny-shakespeare. The line has the
validation loss over the whole validation split (the last 10% of the text) at the end, the training FLOPs the
trainer counted (chapter 13's formula: Muon's Newton-Schulz products included, evaluation not), the optimizer steps,
the training tokens, the training time (`wall_s`, evaluations excluded; `total_s` includes start-up and
evaluations), tokens per second of training, the load average before and after, and the run's configuration (its
`run.toml`). `--baseline` runs chapter 8's GPT-2 recipe (`shakespeare-char`) for the same budget instead. Times
depend on the machine and on what else it is doing; the loss and the FLOPs do not.

    python benchmarks/speedrun.py --budget 5e13
    python benchmarks/speedrun.py --budget 1.5e14 --out-dir runs/speedrun   # keep the checkpoint and metrics
    python benchmarks/speedrun.py --budget 5e13 --out nanogpt_plus/results/speedrun.jsonl   # and keep the line, curve and sample

`--out FILE` appends the line to FILE with two more keys: `curve` (validation loss on fixed batches against FLOPs)
and `sample` (400 characters after "ROMEO:", temperature 0.8, a fixed seed). `--from-dir DIR` reads a run that
finished in DIR (one started with `--out-dir DIR`) instead of training again. `--seeds K` trains K runs, seeds 1337,
1338, ... (each in DIR/seed-S with `--out-dir DIR`), appends one line per run to `--out`, and prints one line: the
first run's keys with `val_loss` their mean, `val_loss_std` (n - 1), `seeds` and `val_losses`. `--device cuda` trains on a GPU
(`tools/gpu_check.sh`); `--smoke` spends 0.1% of the budget, to check that the run works (on a CPU, in seconds).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from nanogpt_plus.speedrun import run_summary, start_run, wait_run

RECIPES = {5e13: "speedrun-5e13", 1.5e14: "speedrun-1.5e14"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, required=True, choices=sorted(RECIPES), help="training FLOPs: 5e13 or 1.5e14")
    p.add_argument("--baseline", action="store_true", help="chapter 8's GPT-2 recipe (shakespeare-char) for the budget")
    p.add_argument("--threads", type=int, help="torch threads of the run (default: torch's, one per core)")
    p.add_argument("--out-dir", type=Path, help="where the run's files stay (default: a temporary directory)")
    p.add_argument("--out", type=Path, help="a JSON lines file to append the line to, with the curve and a sample")
    p.add_argument("--from-dir", type=Path, help="summarise the run that finished in this directory, do not train")
    p.add_argument("--device", help="where to train (default: the recipe's, auto: a GPU if there is one)")
    p.add_argument("--seeds", type=int, default=1, help="how many runs, seeds 1337, 1338, ... (default: 1)")
    p.add_argument("--smoke", action="store_true",
                   help="0.1%% of the budget (a step or two): checks that the run works, measures nothing")
    args = p.parse_args(argv)
    name = "shakespeare-char" if args.baseline else RECIPES[args.budget]
    budget = args.budget / 1000 if args.smoke else args.budget
    flags = ["--max-flops", f"{budget:g}"] if args.baseline or args.smoke else []
    if args.smoke: flags += ["--warmup-iters", "2", "--eval-interval", "10"]
    if args.device: flags += ["--device", args.device]
    if args.seeds < 1: p.error("--seeds must be at least 1")
    if args.from_dir and args.seeds > 1: p.error("--from-dir reads one run: leave out --seeds")
    seeds = [1337 + i for i in range(args.seeds)]
    lines = [one_run(args, name, flags, budget, seed, single=args.seeds == 1) for seed in seeds]
    losses = [line["val_loss"] for line in lines]
    if len(lines) > 1:
        mean = sum(losses) / len(losses)
        std = (sum((x - mean) ** 2 for x in losses) / (len(losses) - 1)) ** 0.5
        print(json.dumps(lines[0] | {"val_loss": round(mean, 4), "val_loss_std": round(std, 4), "seeds": seeds,
                                     "val_losses": losses}))
    else: print(json.dumps(lines[0]))


def one_run(args, name: str, flags: list, budget: float, seed: int, single: bool) -> dict:
    "Train (or read) one run with `seed`; its JSON line, also appended to `--out` with its curve and a sample."
    flags = flags + ([] if single else ["--seed", str(seed)])
    with tempfile.TemporaryDirectory() as tmp:
        out = args.from_dir or args.out_dir or Path(tmp) / "run"
        if args.out_dir and not single: out = args.out_dir / f"seed-{seed}"
        load, start = os.getloadavg()[0], time.perf_counter()
        if not args.from_dir:
            if args.out_dir: flags.append("--overwrite")
            wait_run(start_run(name, out, *flags, threads=args.threads))
        total = time.perf_counter() - start
        summary = run_summary(out)
        config = tomllib.loads((out / "run.toml").read_text())
        line = {"recipe": name, "val_loss": summary["val_loss"], "flops": summary["flops"], "budget": budget,
                "steps": summary["steps"], "tokens": summary["tokens"], "wall_s": summary["wall_s"],
                "total_s": None if args.from_dir else round(total, 1), "tokens_per_s": summary["tokens_per_s"],
                "load_avg": None if args.from_dir else [round(load, 1), round(os.getloadavg()[0], 1)],
                "cpus": os.cpu_count(), "device": args.device or "auto", "config": config}
        if args.out:
            with open(args.out, "a") as f: f.write(json.dumps(line | {"curve": summary["curve"], "sample": sample(out)}) + "\n")
        return line


def sample(run_dir: Path, prompt: str = "ROMEO:") -> str:
    "400 characters of the model in `run_dir` after `prompt`, at temperature 0.8, with a fixed seed."
    cmd = [sys.executable, "-m", "nanogpt_plus", "generate", "gpt", "--checkpoint", str(run_dir), "--continue-tokens",
           prompt, "--max-new-tokens", "400", "--temperature", "0.8", "--fix-seed"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode: raise SystemExit(f"sampling {run_dir} failed: {done.stderr.strip()}")
    return done.stdout


if __name__ == "__main__":
    main()
