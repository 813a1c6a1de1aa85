"""Training throughput: our GPT (as `nanogpt-plus train` runs it) against transformers' GPT2LMHeadModel.

Both models have the same shape (layers, heads, width, context, vocabulary 65 as tiny-shakespeare's characters,
biases, no dropout) and train on the same batches in the same process, each as a user gets it by default on
this machine:

- ours: `nanogpt_plus.train.Trainer.train_step`, i.e. autocast to the dtype `--dtype auto` picks (bfloat16 on CPUs
  with AMX/AVX512-BF16, float32 elsewhere), fused AdamW, gradient clipping;
- peer: `GPT2LMHeadModel` in float32 (transformers' default), its default attention implementation, torch's
  default AdamW, gradient clipping.

The two are timed in alternating rounds so that load from other processes hits both alike; the median round
counts. Model FLOPs utilisation (MFU) uses the usual estimate of training FLOPs per token,
6 * (parameters without position embeddings) + 12 * n_layer * n_embd * context, against the matmul peak of our
dtype measured in this same run. Prints one JSON line.

    python benchmarks/train_throughput.py                    # 6 layers, 6 heads, 384 wide, context 256
    python benchmarks/train_throughput.py --n-layer 4 --n-embd 128 --n-head 4 --context-size 64
"""
import argparse
import json
import platform
import statistics
import time

import torch


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    "Measured FLOP/s of an n x n matmul in `dtype` (best of a few timed bursts)."
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2): a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(3): a @ b
        best = max(best, 3 * 2 * n ** 3 / (time.perf_counter() - t))
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=384)
    p.add_argument("--context-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="timed training steps per round and model")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from nanogpt_plus.gpt import GPT, GPTConfig
    from nanogpt_plus.train import Trainer, TrainConfig

    hf_logging.set_verbosity_error()
    V, T, B = 65, args.context_size, args.batch_size
    data = torch.randint(V, (200_000,), generator=torch.Generator().manual_seed(0))
    train_data, val_data = data[:180_000], data[180_000:]
    shape = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)

    torch.manual_seed(0)
    ours_model = GPT(GPTConfig(vocab_size=V, context_size=T, dropout=0.0, bias=True, **shape))
    trainer = Trainer(ours_model, train_data, val_data, TrainConfig(batch_size=B, context_size=T, warmup_iters=0),
                      progress=False)  # dtype "auto", fused AdamW: the defaults of `nanogpt-plus train`

    peer = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=T, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      **shape)).train()
    peer_opt = torch.optim.AdamW(peer.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    peer_rng = torch.Generator().manual_seed(1)

    def peer_step():
        from nanogpt_plus.data import get_batch
        x, _ = get_batch(train_data, B, T, peer_rng)
        loss = peer(input_ids=x, labels=x).loss  # transformers shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
        peer_opt.step()
        peer_opt.zero_grad(set_to_none=True)

    def timed(step, n):
        t = time.perf_counter()
        for _ in range(n): step()
        return n * B * T / (time.perf_counter() - t)

    for step in (trainer.train_step, peer_step): timed(step, 2)  # warm-up: allocator, kernels, optimizer state
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(timed(trainer.train_step, args.steps))
        theirs.append(timed(peer_step, args.steps))
    ours_tps, peer_tps = statistics.median(ours), statistics.median(theirs)

    n_params = sum(p.numel() for p in ours_model.parameters()) - ours_model.pos_emb.weight.numel()
    flops_per_token = 6 * n_params + 12 * args.n_layer * args.n_embd * T
    peak = matmul_peak(trainer.dtype)
    peak_fp32 = peak if trainer.dtype == torch.float32 else matmul_peak(torch.float32)
    print(json.dumps({
        "benchmark": "train_throughput",
        "ours_tokens_per_s": round(ours_tps, 1), "peer_tokens_per_s": round(peer_tps, 1),
        "ratio": round(ours_tps / peer_tps, 3),
        "config": {**shape, "context_size": T, "vocab_size": V, "batch_size": B, "bias": True, "dropout": 0.0},
        "ours_dtype": str(trainer.dtype).removeprefix("torch."), "peer_dtype": "float32",
        "ours_mfu": round(ours_tps * flops_per_token / peak, 4),
        "peer_mfu_vs_fp32_peak": round(peer_tps * flops_per_token / peak_fp32, 4),
        "matmul_peak_gflops": round(peak / 1e9, 1), "matmul_peak_fp32_gflops": round(peak_fp32 / 1e9, 1),
        "flops_per_token": flops_per_token, "ours_rounds": [round(x, 1) for x in ours],
        "peer_rounds": [round(x, 1) for x in theirs], "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
