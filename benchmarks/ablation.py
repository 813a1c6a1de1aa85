"""Chapter 12's ablation: each change of a modern GPT alone against the GPT-2 baseline, and all of them together.

Every run trains chapter 8's recipe model (4 layers, 4 heads, 192 wide, context 64, 32 windows per step, AdamW at
3e-3 with a cosine to 3e-4, no dropout) on tiny-shakespeare with `nanogpt-plus train`, changed by one variant's
flags, for the same budget of training FLOPs (`--max-flops`, counted as chapter 13 says: Muon's own matrix products
included), with each seed. It records the validation loss over the whole validation split at the end, and the
curve of the loss on 10 fixed validation batches against FLOPs. One JSON line per run goes to --out (appended, so
an interrupted ablation resumes where it stopped: runs already in the file are skipped), and a summary line to stdout.

    python benchmarks/ablation.py --out nanogpt_plus/results/ablation.jsonl --jobs 2      # everything: 12 variants x 3 seeds
    python benchmarks/ablation.py --variants gpt2,all --seeds 1337 --jobs 2 --out /tmp/check.jsonl   # the check
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

RECIPE = ["--n-layer", "4", "--n-head", "4", "--n-embd", "192", "--context-size", "64", "--batch-size", "32",
          "--dropout", "0", "--learning-rate", "3e-3", "--min-lr", "3e-4", "--warmup-iters", "100"]
VARIANTS = {  # name: flags added to the recipe
    "gpt2": [],
    "rope": ["--pos-emb", "rope"],
    "rmsnorm": ["--norm", "rmsnorm"],
    "qk_norm": ["--qk-norm"],
    "relu2": ["--mlp", "relu2"],
    "swiglu": ["--mlp", "swiglu"],
    "untied": ["--no-tie-embeddings"],
    "softcap": ["--logit-softcap", "15"],
    "zero_init": ["--zero-init"],
    "muon": ["--optimizer", "muon", "--muon-lr", "1e-2"],
    "wsd": ["--schedule", "wsd", "--cooldown-frac", "0.3", "--min-lr", "0"],
}
VARIANTS["all"] = [f for name in ("rope", "rmsnorm", "qk_norm", "relu2", "untied", "softcap", "zero_init", "muon", "wsd")
                   for f in VARIANTS[name]]


def run(name: str, seed: int, budget: float, extra: list[str], threads: int | None = None) -> dict:
    "Train one variant with one seed in a fresh process (`threads` torch threads); its numbers from `metrics.jsonl`."
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "nanogpt_plus", "train", "gpt", *RECIPE, *VARIANTS[name], *extra,
               "--max-flops", str(budget), "--seed", str(seed), "--eval-interval", "50", "--eval-iters", "10",
               "--out-dir", tmp, "--no-progress"]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode: raise SystemExit(f"{name} (seed {seed}) failed:\n{done.stderr}")
        records = [json.loads(line) for line in Path(tmp, "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    last = [r for r in records if "loss" in r][-1]
    return {"variant": name, "seed": seed, "budget": budget, "val_loss": records[-1]["val_loss_full"],
            "flops": last["flops"], "steps": last["step"], "train_s": last["time_s"],
            "wall_s": round(time.perf_counter() - start, 1), "load": round(os.getloadavg()[0], 1),
            "curve": [[r["flops"], round(r["val_loss"], 4)] for r in evals], "flags": VARIANTS[name] + extra}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    p.add_argument("--seeds", default="1337,1338,1339")
    p.add_argument("--budget", type=float, default=1e13, help="training FLOPs per run")
    p.add_argument("--extra", default="", help="more flags for every run (one string)")
    p.add_argument("--out", type=Path, required=True, help="JSON lines file, appended to")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side, one torch thread each if more than 1")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown: p.error(f"unknown variant(s) {', '.join(unknown)}")
    done = []
    if args.out.exists():
        done = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    todo = [(name, seed) for seed in map(int, args.seeds.split(",")) for name in names
            if not any(r["variant"] == name and r["seed"] == seed and r["budget"] == args.budget for r in done)]
    threads = 1 if args.jobs > 1 else None
    with ThreadPoolExecutor(args.jobs) as pool:  # threads that wait for processes
        futures = [pool.submit(run, name, seed, args.budget, args.extra.split(), threads) for name, seed in todo]
        for future in as_completed(futures):
            result = future.result()
            with open(args.out, "a") as f: f.write(json.dumps(result) + "\n")
            done.append(result)
            print(f"{result['variant']:10s} seed {result['seed']}: val {result['val_loss']:.4f}, {result['steps']} "
                  f"steps, {result['train_s']:.0f} s", file=sys.stderr, flush=True)
    runs = [r for r in done if r["variant"] in names and r["budget"] == args.budget]
    mean = {n: statistics.mean(r["val_loss"] for r in runs if r["variant"] == n) for n in names}
    print(json.dumps({"budget": args.budget, "val_loss": {n: round(v, 4) for n, v in mean.items()}}))


if __name__ == "__main__":
    main()
