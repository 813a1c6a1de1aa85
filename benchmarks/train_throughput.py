"""Training throughput: our GPT (as `nanogpt-plus train` runs it) against transformers' GPT2LMHeadModel, like with like.

Every model trains on the same batches in the same process, at batch 8 and at batch 32, in the medium
shape of chapter 8c (chapter 6's `medium` preset: 6 layers, 6 heads, 384 wide, context 256, vocabulary 65; no dropout; no biases for ours, biases for
GPT-2, which always has them; `--bias` gives ours biases too):

- `ours`: `nanogpt_plus.train.Trainer.train_step` with its defaults: autocast to the dtype `--dtype auto` picks
  (bfloat16 on CPUs with AMX or AVX512-BF16, float32 elsewhere), fused AdamW, gradient clipping, the attention
  path chapter 4 measures as the faster one on this machine, and chapter 5's GELU (the exact kernel in bfloat16 on
  a CPU). Its `Trainer` also makes glibc keep freed memory (chapter 7a); that setting holds for the whole process,
  so the peers below run with it too (any user can set it, as any user can switch on bfloat16);
- `peer_sdpa` and `peer_eager`: `GPT2LMHeadModel` in the *same* precision (autocast to our dtype), PyTorch's fused
  tanh GELU (`gelu_pytorch_tanh`, the same function as GPT-2's `gelu_new`, which transformers writes out in several
  operations), fused AdamW, gradient clipping, with its sdpa attention and with its eager (written-out) attention.
  The faster of the two on this machine is `peer_same`, the best-configured peer, and `ratio_vs_peer_same` is
  against it (`ratio_vs_peer_sdpa` is against sdpa whichever wins);
- `peer_fp32`: `GPT2LMHeadModel` as a user gets it by default: float32, its default attention, torch's default
  AdamW, gradient clipping;
- `ours_fp32` (with `--fp32`): our trainer with `dtype="float32"`, to check that the float32 path (what a CPU without
  fast bfloat16 runs) does not lose to `peer_fp32`.
- with `--peer-variants`, `peer_sdpa` with its GELU changed, to check that the fused tanh kernel is its best: GPT-2's
  `gelu_new`, and the exact GELU (a different function, which the peer would have to take in float32 too).

The models take turns in every round, so that load from other processes hits all alike, and each round also
measures the matmul peak of bfloat16 and of float32 (best of short bursts of square matmuls). Throughputs are the
median over rounds; MFU (model FLOPs utilisation) is per round, tokens/s x FLOPs per token / the peak of the
model's dtype measured in that round, then the median. FLOPs per token are our model's `flops_per_token`:
6 x (matmul parameters) + 12 x n_layer x n_embd x context, the same count for the peer (its biases and layer norms
are not matmuls). Prints one JSON line.

    python benchmarks/train_throughput.py                  # batch 8 and 32, the medium shape
    python benchmarks/train_throughput.py --fp32 --threads 1   # on a machine shared with other work
    python benchmarks/train_throughput.py --batch-sizes 8 --n-layer 4 --n-embd 128 --n-head 4 --context-size 64
    python benchmarks/train_throughput.py --batch-sizes 8 --peer-variants --rounds 5   # are the peer's settings its best?
"""
import argparse
import json
import platform
import statistics
import sys
import time

import torch

from nanogpt_plus.attention import ATTENTION_PATHS
from nanogpt_plus.data import get_batch
from nanogpt_plus.gpt import GPT, GPTConfig
from nanogpt_plus.perf import matmul_peak
from nanogpt_plus.train import Trainer, TrainConfig


def our_step(shape: dict, data, B: int, T: int, dtype: str, bias: bool):
    "A training step of our model, as `Trainer` takes it."
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, context_size=T, dropout=0.0, bias=bias, **shape))
    trainer = Trainer(model, data[:180_000], data[180_000:],
                      TrainConfig(batch_size=B, context_size=T, warmup_iters=0, dtype=dtype))
    return trainer.train_step, trainer.dtype, model.flops_per_token(T)


TUNED = dict(attention="sdpa", gelu="gelu_pytorch_tanh", fused_adamw=True)
PEER_SAME = {"peer_sdpa": TUNED, "peer_eager": dict(TUNED, attention="eager")}  # the faster one is `peer_same`
PEER_VARIANTS = {"peer_gelu_new": dict(TUNED, gelu="gelu_new"), "peer_exact_gelu": dict(TUNED, gelu="gelu")}


def peer_step(shape: dict, data, B: int, T: int, dtype: torch.dtype, settings: dict | None = None):
    "A training step of transformers' GPT-2 with `settings` (attention, gelu, fused_adamw), or its defaults if None."
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=65, n_positions=T, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0, **shape)
    if settings: config._attn_implementation, config.activation_function = settings["attention"], settings["gelu"]
    model = GPT2LMHeadModel(config).train()
    if settings: assert model.config._attn_implementation == settings["attention"]
    fused = settings["fused_adamw"] if settings else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, fused=fused)
    rng = torch.Generator().manual_seed(1337)  # the generator our trainer draws its batches with: the same windows

    def step():
        x, y = get_batch(data[:180_000], B, T, rng)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # as ours: T targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def measure(args, B: int) -> dict:
    "Alternating rounds of every model at batch size `B`; medians of tokens/s and of MFU."
    T = args.context_size
    shape = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    data = torch.randint(65, (200_000,), generator=torch.Generator().manual_seed(0))
    ours, dtype, flops_per_token = our_step(shape, data, B, T, "auto", args.bias)
    steps = {"ours": (ours, dtype), "peer_fp32": (peer_step(shape, data, B, T, torch.float32), torch.float32)}
    peers = PEER_SAME | (PEER_VARIANTS if args.peer_variants else {})
    steps.update({name: (peer_step(shape, data, B, T, dtype, settings), dtype) for name, settings in peers.items()})
    if args.fp32: steps["ours_fp32"] = (our_step(shape, data, B, T, "float32", args.bias)[0], torch.float32)
    n = max(1, args.tokens_per_round // (B * T))  # steps per round: the same work at every batch size
    for step, _ in steps.values():  # warm-up: allocator, kernels, optimizer state, the attention path measurement
        for _ in range(2): step()
    tps, mfu, peaks = {name: [] for name in steps}, {name: [] for name in steps}, {"bfloat16": [], "float32": []}
    for _ in range(args.rounds):
        peak = {torch.bfloat16: matmul_peak(torch.bfloat16), torch.float32: matmul_peak(torch.float32)}
        for name, p in peak.items(): peaks[str(name).removeprefix("torch.")].append(p)
        for name, (step, dt) in steps.items():
            start = time.perf_counter()
            for _ in range(n): step()
            tps[name].append(n * B * T / (time.perf_counter() - start))
            mfu[name].append(tps[name][-1] * flops_per_token / peak[dt])
    med = {name: statistics.median(r) for name, r in tps.items()}
    best = max(PEER_SAME, key=med.get)  # the peer's faster attention on this machine, as its user would choose
    out = {"tokens_per_s": {name: round(m, 1) for name, m in med.items()}, "peer_same": best,
           "ratio_vs_peer_same": round(med["ours"] / med[best], 3),
           "ratio_vs_peer_sdpa": round(med["ours"] / med["peer_sdpa"], 3),
           "ratio_vs_peer_fp32": round(med["ours"] / med["peer_fp32"], 3),
           "mfu": {name: round(statistics.median(r), 4) for name, r in mfu.items()},
           "matmul_peak_gflops": {name: round(statistics.median(p) / 1e9, 1) for name, p in peaks.items()},
           "rounds_tokens_per_s": {name: [round(x, 1) for x in r] for name, r in tps.items()}}
    if args.fp32: out["ratio_fp32_vs_peer_fp32"] = round(med["ours_fp32"] / med["peer_fp32"], 3)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=384)
    p.add_argument("--context-size", type=int, default=256)
    p.add_argument("--bias", action="store_true", help="biases in our model too (GPT-2 always has them)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    p.add_argument("--tokens-per-round", type=int, default=2048,
                   help="timed tokens per model and round (at least one step): short rounds pair the models closely")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--fp32", action="store_true", help="also time our trainer in float32 against the float32 peer")
    p.add_argument("--peer-variants", action="store_true",
                   help="also time the sdpa peer with gelu_new and with the exact GELU")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads: torch.set_num_threads(args.threads)
    results = {}
    for B in args.batch_sizes:
        results[f"batch_{B}"] = measure(args, B)
        print(f"batch {B}: {json.dumps(results[f'batch_{B}'])}", file=sys.stderr, flush=True)  # progress
    print(json.dumps({
        "benchmark": "train_throughput", **results,
        "config": {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd,
                   "context_size": args.context_size, "vocab_size": 65, "bias": args.bias, "dropout": 0.0},
        "attention_paths": dict(ATTENTION_PATHS), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
