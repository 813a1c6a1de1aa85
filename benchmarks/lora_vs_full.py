"""Chapter 14's comparison of full fine-tuning against LoRA, over several seeds.

For each seed: pre-train the `small` GPT (0.8 M parameters) for 300 steps on tiny-shakespeare without *Romeo and
Juliet*, then fine-tune it on the play for 60 steps, fully (learning rate 3e-4) and with LoRA at ranks 1, 4 and 16
(learning rate 5e-3, alpha = 2 r), every run through `nanogpt-plus train` in a process of its own, exactly as the
chapter's `slow` cells do with seed 1. The seed sets the base's initial weights, both runs' batches and the adapters'
initial weights. One JSON line per fine-tune goes to --out (appended; a seed already in the file is skipped):
its trainable parameters, AdamW's state in bytes, the peak resident memory of its process, the time per step, the
size of what it saved, and the loss over the whole validation split of the play and of the rest, before and after.

    python benchmarks/lora_vs_full.py --seeds 1,2,3 --out nanogpt_plus/results/lora_vs_full.jsonl
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from nanogpt_plus.checkpoint import load_checkpoint, load_trainer_state
from nanogpt_plus.data import tiny_shakespeare, train_val_split
from nanogpt_plus.lora import ADAPTER_WEIGHTS, is_adapter, load_adapted
from nanogpt_plus.train import evaluate

RUNS = {"full": ["--learning-rate", 3e-4]}
for _r in (1, 4, 16):
    RUNS[f"LoRA r={_r}"] = ["--use-lora", "--lora-rank", _r, "--lora-alpha", 2 * _r, "--learning-rate", 5e-3]


def split_play() -> tuple[str, str]:
    "Romeo and Juliet, and tiny-shakespeare without it (the chapter's split)."
    text = tiny_shakespeare()
    start, end = text.index("SAMPSON:\nGregory, o' my word"), text.index("WARWICK:\nI wonder how the king escaped")
    return text[start:end], text[:start] + text[end:]


def run(*argv) -> int:
    "Run `nanogpt-plus ARGV` in a new process (one thread); its peak resident memory in bytes."
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen([sys.executable, "-m", "nanogpt_plus", *map(str, argv)], stdout=log, stderr=subprocess.STDOUT,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        _, status, usage = os.wait4(p.pid, 0)
        if os.waitstatus_to_exitcode(status):
            log.seek(0)
            raise SystemExit(f"nanogpt-plus {' '.join(map(str, argv[:2]))} failed:\n{log.read()}")
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux counts kilobytes


def val_loss(model, tokenizer, text: str) -> float:
    "Loss over the whole validation split (the last 10%) of `text`, as `train` reports it."
    _, val = train_val_split(torch.tensor(tokenizer.encode(text)), 0.1)
    return evaluate(model, val, 64, batch_size=64, device="cpu")


def one_seed(seed: int, romeo: str, rest: str) -> list[dict]:
    "The base and its four fine-tunes for one seed: one record per fine-tune."
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "rest.txt").write_text(rest, encoding="utf-8")
        (work / "romeo.txt").write_text(romeo, encoding="utf-8")
        run("train", "gpt", "--data", work / "rest.txt", "--size", "small", "--max-iters", 300, "--learning-rate", 3e-3,
            "--warmup-iters", 30, "--eval-interval", 100, "--eval-iters", 10, "--out-dir", work / "base", "--no-progress",
            "--seed", seed)
        base, tok = load_checkpoint(work / "base")
        before = {"romeo": val_loss(base, tok, romeo), "rest": val_loss(base, tok, rest)}
        records = []
        for name, flags in RUNS.items():
            d = work / name
            peak = run("train", "gpt", "--init-from", work / "base", "--data", work / "romeo.txt", "--max-iters", 60,
                       "--warmup-iters", 10, "--eval-interval", 15, "--eval-iters", 10, "--no-progress", "--seed", seed,
                       "--out-dir", d, *flags)
            model = load_adapted(d)[0] if is_adapter(d) else load_checkpoint(d)[0]
            state = load_trainer_state(d)
            records.append({
                "run": name, "seed": seed,
                "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad) if is_adapter(d) else model.num_params(),
                "optimizer_bytes": sum(t.numel() * t.element_size() for s in state["optimizer"]["state"].values() for t in s.values()),
                "peak_bytes": peak, "step_s": round(state["train_time"] / state["step"], 5),
                "saved_bytes": (d / (ADAPTER_WEIGHTS if is_adapter(d) else "model.safetensors")).stat().st_size,
                "romeo_before": before["romeo"], "romeo_after": val_loss(model, tok, romeo),
                "rest_before": before["rest"], "rest_after": val_loss(model, tok, rest),
                "load": round(os.getloadavg()[0], 1)})
            print(f"seed {seed} {name:>10}: play {records[-1]['romeo_before']:.4f} -> {records[-1]['romeo_after']:.4f}, "
                  f"rest {records[-1]['rest_before']:.4f} -> {records[-1]['rest_after']:.4f}", flush=True)
    return records


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds")
    p.add_argument("--out", required=True, help="JSON lines file, appended to")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    done = {json.loads(line)["seed"] for line in out.read_text().splitlines() if line.strip()} if out.exists() else set()
    romeo, rest = split_play()
    for seed in (int(s) for s in args.seeds.split(",")):
        if seed in done: continue
        records = one_seed(seed, romeo, rest)
        with out.open("a") as f:  # a whole seed at a time, so the file never holds half of one
            f.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    main()
