"""Generation speed against the memory-bandwidth roofline, and against Hugging Face `transformers`, in one process.

GPT-2 124M architecture with random weights (the same weights in both models), a 16-token prompt, 200 new tokens,
greedy decoding, batch 1, CPU. Every round times each variant once, in turn, and reads a 256 MB buffer twice (chapter 16's
prefetching reader and torch's sum; the faster counts) to measure the memory bandwidth of that moment; the results are medians over rounds, and each ratio is the median of the ratios within
rounds, so a change of machine load (other jobs) hits both sides of a ratio alike.

Threads: chapter 16's C kernels compute on one thread, so the like-with-like run is `--threads 1 --clock cpu`: the
peer on one thread too, and the roofline of the bandwidth one thread reads. With more threads PyTorch's sum reads
faster than one kernel thread, and the fractions fall against that roofline.

Variants: ours, prepared as `nanogpt-plus generate --dtype D --use-kv-cache` does (chapter 16's `prepare_decoding` and
`FastDecoder`: C kernels where they build), with float32, bfloat16 and int8 (weight-only, one scale per output
channel) weights; optionally the same through PyTorch's kernels, and the float32 step under torch.compile; the peer's
`GPT2LMHeadModel.generate` in float32 with its cache. For each of ours: tokens/s, the ratio to the peer, the bytes
one token reads (weights and key-value cache), the roofline (bandwidth / bytes per token) and the fraction of it
reached, and the fraction of greedy tokens equal to our float32 tokens (float32 itself must equal the peer's).

    python benchmarks/generate_speed.py [--new-tokens 200] [--rounds 5] [--threads N] [--clock wall|cpu]
                                        [--dtypes float32,bfloat16,int8] [--torch-kernels] [--no-peer] [--compile]

Prints one JSON line (progress goes to stderr).
"""
import argparse
import json
import statistics
import sys
import time

import torch


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def copy_weights(peer, ours):
    "Copy a transformers GPT-2 into our GPT (its Conv1D weights are stored transposed)."
    sd = peer.state_dict()
    with torch.no_grad():
        ours.tok_emb.weight.copy_(sd["transformer.wte.weight"])
        ours.pos_emb.weight.copy_(sd["transformer.wpe.weight"])
        for i, b in enumerate(ours.blocks):
            p = f"transformer.h.{i}."
            for mine, theirs in [(b.ln1, "ln_1"), (b.ln2, "ln_2")]:
                mine.weight.copy_(sd[p + theirs + ".weight"])
                mine.bias.copy_(sd[p + theirs + ".bias"])
            for mine, theirs in [(b.attn.qkv, "attn.c_attn"), (b.attn.proj, "attn.c_proj"),
                                 (b.mlp.fc, "mlp.c_fc"), (b.mlp.proj, "mlp.c_proj")]:
                mine.weight.copy_(sd[p + theirs + ".weight"].t())
                mine.bias.copy_(sd[p + theirs + ".bias"])
        ours.ln_f.weight.copy_(sd["transformer.ln_f.weight"])
        ours.ln_f.bias.copy_(sd["transformer.ln_f.bias"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians over them)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--dtypes", default="float32,bfloat16,int8", help="our variants, comma-separated")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers")
    ap.add_argument("--compile", action="store_true", help="also time our float32 decode step under torch.compile")
    ap.add_argument("--torch-kernels", action="store_true", help="also time each format through PyTorch's kernels "
                    "instead of chapter 16's C kernels")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall-clock time, or the CPU time of "
                    "this thread (one thread only: on a shared machine it leaves out the time other jobs held the core)")
    args = ap.parse_args()
    if args.clock == "cpu": args.threads = 1  # the CPU time of one thread is the whole computation only with one
    if args.threads: torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    from nanogpt_plus.bigram import generate
    from nanogpt_plus.fastgen import FastDecoder, kv_cache_bytes, prepare_decoding, read_probe, weight_bytes
    from nanogpt_plus.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    peer = None
    ours = GPT(GPTConfig.from_name("gpt2")).eval()
    if not args.no_peer:
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        peer = GPT2LMHeadModel(GPT2Config()).eval()  # 124M: 12 layers, 12 heads, 768 wide, context 1024
        copy_weights(peer, ours)
    n, T0 = args.new_tokens, args.prompt_tokens
    idx = torch.randint(0, 50257, (1, T0), generator=torch.Generator().manual_seed(1))
    dtypes = [d for d in args.dtypes.split(",") if d]
    variants = {}
    for d in dtypes:  # each from a copy of the float32 weights, prepared as `nanogpt-plus generate --dtype d` does
        m = GPT(ours.config).eval()
        m.load_state_dict(ours.state_dict())
        variants[d] = prepare_decoding(m, d)
        if args.torch_kernels:
            m = GPT(ours.config).eval()
            m.load_state_dict(ours.state_dict())
            variants[d + "+torch_kernels"] = prepare_decoding(m, d, kernel=False)
    if args.compile and "float32" in variants: variants["float32+compile"] = variants["float32"]
    del ours

    def run_ours(name, k=n):
        model = variants[name]
        return generate(model, idx, k, temperature=0, decoder=FastDecoder(model, 1, compile=name.endswith("compile")))

    def run_peer(k=n):
        return peer.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=k, min_new_tokens=k,
                             do_sample=False, use_cache=True, pad_token_id=0)

    probe = 2**28  # bytes: far more than any cache holds
    runs = {name: (lambda name=name: run_ours(name)) for name in variants}
    if peer is not None: runs["transformers"] = run_peer
    runs["bandwidth"] = read_probe(probe, kernel=True)  # reads as the kernels do, prefetching (sum where no kernels)
    runs["bandwidth_sum"] = read_probe(probe)  # torch's sum over the buffer, for reference
    times, outs = {k: [] for k in runs}, {}
    with torch.inference_mode():
        for name, f in runs.items():  # warm-up: first calls allocate, pick kernels (and compile)
            t0 = time.perf_counter()
            f() if name.startswith("bandwidth") else (run_peer(4) if name == "transformers" else run_ours(name, 4))
            log(f"warm-up {name}: {time.perf_counter() - t0:.1f} s")
        for r in range(args.rounds):
            for name, f in runs.items():
                t0 = clock()
                outs[name] = f()
                times[name].append(clock() - t0)
            log(f"round {r + 1}: " + ", ".join(f"{k} {n / v[-1]:.1f} tok/s" for k, v in times.items()
                                              if not k.startswith("bandwidth"))
                + f", bandwidth {probe / min(times['bandwidth'][-1], times['bandwidth_sum'][-1]) / 1e9:.1f} GB/s")

    bw = [probe / min(a, b) for a, b in zip(times["bandwidth"], times["bandwidth_sum"])]  # the faster probe, per round
    result = {"bandwidth_gb_s": round(statistics.median(bw) / 1e9, 2),
              "bandwidth_sum_gb_s": round(statistics.median(probe / t for t in times["bandwidth_sum"]) / 1e9, 2)}
    if peer is not None: result["transformers_tokens_per_s"] = round(n / statistics.median(times["transformers"]), 2)
    reference = outs.get("float32")
    for name in variants:
        model = variants[name]
        # bytes per generated token: the weights once, plus the keys and values read back at the mean position
        per_token = weight_bytes(model) + kv_cache_bytes(model, T0 + n // 2)
        roofline = [b / per_token for b in bw]  # tokens/s if the step did nothing but read its bytes, per round
        speed = [n / t for t in times[name]]
        res = {"tokens_per_s": round(statistics.median(speed), 2),
               "mb_per_token": round(per_token / 1e6, 1),
               "roofline_tokens_per_s": round(statistics.median(roofline), 1),
               "roofline_fraction": round(statistics.median(s / r for s, r in zip(speed, roofline)), 3)}
        if peer is not None:
            res["ratio_to_transformers_fp32"] = round(statistics.median(
                p / o for p, o in zip(times["transformers"], times[name])), 3)
        if reference is not None and name != "float32":
            res["same_greedy_tokens_as_fp32"] = round((outs[name] == reference)[:, T0:].float().mean().item(), 3)
        result[name] = res
    if peer is not None and reference is not None:
        result["fp32_tokens_equal_transformers"] = bool(torch.equal(reference, outs["transformers"]))
    result.update(clock=args.clock, new_tokens=n, prompt_tokens=T0, rounds=args.rounds, threads=torch.get_num_threads(),
                  torch=torch.__version__)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
