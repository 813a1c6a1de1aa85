"""Training step time: full fine-tuning against LoRA at several ranks, in one process (chapter 14).

The model is chapter 14's base (`GPTConfig.from_name("small")`: 4 blocks, 4 heads, 128 wide, context 64, a
65-token vocabulary, random weights); batches of 32 windows of 64 random tokens; chapter 8's `Trainer` with its
CLI defaults on this machine (`dtype="auto"`). Each variant (full, LoRA at `--ranks` on every linear layer) has its own
model and trainer, warmed up first; then `--rounds` rounds, each timing `--steps` steps of every variant in turn, so
that load from other processes hits all alike; the median round counts. It also checks the work is what it claims:
LoRA's optimizer holds state for the adapter weights only. Prints one JSON line: seconds per step for each variant,
and each one's ratio to the full fine-tune.

    python benchmarks/lora_step.py [--ranks 1 4 16] [--rounds 5] [--steps 5] [--threads 1]
"""
import argparse
import json
import platform
import statistics
import time

import torch

from nanogpt_plus.gpt import GPT, GPTConfig
from nanogpt_plus.lora import add_lora
from nanogpt_plus.train import TrainConfig, Trainer


def trainer(rank: int | None, data) -> Trainer:
    "A trainer for the same random base: fully trainable (rank None) or with LoRA adapters of `rank`."
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("small"))
    if rank is not None: model = add_lora(model, rank, 2 * rank)
    config = TrainConfig(max_iters=10_000, batch_size=32, context_size=64, warmup_iters=0)
    t = Trainer(model, data[:-10_000], data[-10_000:], config, "cpu")
    if rank is not None:
        t.train_step()  # creates the optimizer state
        assert all("lora_" in n for n, p in model.named_parameters() if p in t.optimizer.state), "state beyond the adapters"
    return t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = torch.randint(0, 65, (200_000,), generator=torch.Generator().manual_seed(0))
    variants = {"full": trainer(None, data), **{f"lora_r{r}": trainer(r, data) for r in args.ranks}}
    for t in variants.values():
        for _ in range(2): t.train_step()  # warm-up
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, t in variants.items():
            t0 = time.perf_counter()
            for _ in range(args.steps): t.train_step()
            times[name].append((time.perf_counter() - t0) / args.steps)
    step_s = {name: statistics.median(v) for name, v in times.items()}
    print(json.dumps({"benchmark": "lora_step", "model": "small (0.8M)", "batch": "32 x 64", "threads": args.threads,
                      "dtype": str(variants["full"].dtype), "rounds": args.rounds, "steps_per_round": args.steps,
                      "step_s": {k: round(v, 4) for k, v in step_s.items()},
                      "ratio_to_full": {k: round(v / step_s["full"], 3) for k, v in step_s.items()},
                      "machine": platform.machine(), "shared_machine": True}))


if __name__ == "__main__":
    main()
