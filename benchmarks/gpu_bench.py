"""The GPU measurements of `tools/gpu_check.sh`: training throughput and MFU against transformers' GPT-2, and batch-1
generation against the memory bandwidth, each measured in the same process as its hardware limit.

    python benchmarks/gpu_bench.py train --shape medium          # 6 layers, 384 wide, context 256 (the `medium` preset)
    python benchmarks/gpu_bench.py train --shape gpt2            # GPT-2 124M: 12 layers, 768 wide, context 1024
    python benchmarks/gpu_bench.py generate --shape gpt2         # batch 1, greedy, float32 and bfloat16
    python benchmarks/gpu_bench.py train --shape tiny --device cpu   # the same code at a CPU's size (a smoke test)

`train`: our `Trainer.train_step` (bf16 autocast on a GPU, fused AdamW, gradient clipping) and transformers'
`GPT2LMHeadModel` in the same precision (its sdpa attention, PyTorch's tanh GELU, fused AdamW, clipping) take turns in
every round on the same batches; each round also measures the bf16 matmul peak (square products). Tokens/s are
medians over rounds, MFU = tokens/s x our FLOPs per token / that round's peak, median over rounds.
`generate`: tokens/s of greedy decoding with our key-value cache at batch 1 (float32, then bfloat16 weights) against
a device-to-device copy's bandwidth: the roof is bandwidth / weight bytes read per token. One JSON line per run.
"""
import argparse
import json
import statistics
import sys
import time

import torch

from nanogpt_plus.data import get_batch
from nanogpt_plus.gpt import GPT, GPTConfig
from nanogpt_plus.train import Trainer, TrainConfig

SHAPES = {  # (n_layer, n_head, n_embd, context, vocabulary, batch)
    "tiny": (2, 2, 64, 64, 65, 4),
    "medium": (6, 6, 384, 256, 65, 64),
    "gpt2": (12, 12, 768, 1024, 50304, 16),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda": torch.cuda.synchronize(device)


def timed(fn, device: torch.device, n: int = 1) -> float:
    "Seconds for `n` calls of `fn`, the device's queue drained before and after."
    sync(device)
    start = time.perf_counter()
    for _ in range(n): fn()
    sync(device)
    return time.perf_counter() - start


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int) -> float:
    "FLOP/s of the best of 5 bursts of square `size` products in `dtype`: the compute roof of this run."
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    n = 20 if device.type == "cuda" else 2
    timed(lambda: a @ b, device, 2)
    return max(n * 2 * size**3 / timed(lambda: a @ b, device, n) for _ in range(5))


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    "Bytes/s of a device-to-device copy (bytes read plus bytes written), the best of 5: the memory roof."
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timed(lambda: dst.copy_(src), device, 2)
    return max(2 * 5 * src.numel() / timed(lambda: dst.copy_(src), device, 5) for _ in range(5))


def our_step(shape, data, device):
    n_layer, n_head, n_embd, T, V, B = shape
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, context_size=T, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=0.0))
    trainer = Trainer(model, data, data[:T * 4], TrainConfig(batch_size=B, context_size=T, warmup_iters=0), device)
    return trainer.train_step, trainer.dtype, model.flops_per_token(T)


def peer_step(shape, data, device, dtype):
    "A training step of transformers' GPT-2 in the same precision, with its fast settings."
    from transformers import GPT2Config, GPT2LMHeadModel
    n_layer, n_head, n_embd, T, V, B = shape
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=V, n_positions=T, n_layer=n_layer, n_head=n_head, n_embd=n_embd, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_pytorch_tanh", bos_token_id=0,
                        eos_token_id=0)
    config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    rng = torch.Generator().manual_seed(1337)

    def step():
        x, y = get_batch(data, B, T, rng, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def train_bench(args, device) -> dict:
    shape = SHAPES[args.shape]
    data = torch.randint(shape[4], (2_000_000,), generator=torch.Generator().manual_seed(0))
    ours, dtype, flops_per_token = our_step(shape, data, device)
    steps = {"ours": ours, "transformers": peer_step(shape, data, device, dtype)}
    for step in steps.values():
        for _ in range(3): step()  # warm-up: kernels, allocator, optimizer state
    tokens = shape[3] * shape[5] * args.steps
    tps, mfu, peaks = {k: [] for k in steps}, {k: [] for k in steps}, []
    for _ in range(args.rounds):
        peaks.append(matmul_peak(device, dtype, 4096 if device.type == "cuda" else 512))
        for name, step in steps.items():
            tps[name].append(tokens / timed(lambda: [step() for _ in range(args.steps)], device))
            mfu[name].append(tps[name][-1] * flops_per_token / peaks[-1])
    med = {k: statistics.median(v) for k, v in tps.items()}
    return {"tokens_per_s": {k: round(v, 1) for k, v in med.items()},
            "ratio_vs_transformers": round(med["ours"] / med["transformers"], 3),
            "mfu": {k: round(statistics.median(v), 4) for k, v in mfu.items()},
            "matmul_peak_tflops": round(statistics.median(peaks) / 1e12, 2), "dtype": str(dtype)[6:],
            "flops_per_token": flops_per_token}


def generate_bench(args, device) -> dict:
    n_layer, n_head, n_embd, T, V, _ = SHAPES[args.shape]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, context_size=T, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=0.0))
    model = model.to(device).eval()
    bandwidth = copy_bandwidth(device, 1024 if device.type == "cuda" else 64)
    idx = torch.zeros(1, 1, dtype=torch.long, device=device)
    out = {"copy_bandwidth_gbs": round(bandwidth / 1e9, 1)}
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        model.generate(idx, 8, top_k=1, use_kv_cache=True)  # warm-up
        rates = [args.tokens / timed(lambda: model.generate(idx, args.tokens, top_k=1, use_kv_cache=True), device)
                 for _ in range(args.rounds)]
        rate = statistics.median(rates)
        out[str(dtype)[6:]] = {"tokens_per_s": round(rate, 1), "weight_mb": round(weight_bytes / 1e6, 1),
                               "roof_tokens_per_s": round(bandwidth / weight_bytes, 1),
                               "fraction_of_roof": round(rate * weight_bytes / bandwidth, 3)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["train", "generate"])
    p.add_argument("--shape", choices=sorted(SHAPES), default="medium")
    p.add_argument("--device", default="cuda")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="training steps per model and round")
    p.add_argument("--tokens", type=int, default=200, help="tokens generated per round")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available(): sys.exit("gpu_bench: no CUDA GPU here (use --device cpu)")
    result = train_bench(args, device) if args.what == "train" else generate_bench(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"benchmark": f"gpu_{args.what}", "shape": args.shape, "config": dict(zip(
        ("n_layer", "n_head", "n_embd", "context_size", "vocab_size", "batch_size"), SHAPES[args.shape])),
        **result, "device": name, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
