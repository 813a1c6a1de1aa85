"""Generation speed: our GPT with its key-value cache against Hugging Face `transformers`, same process.

GPT-2 124M architecture, random weights, fp32, a 16-token prompt, 200 new greedy tokens, batch 1, CPU.
Prints one JSON line: ours_tokens_per_s (with the cache), peer_tokens_per_s (`GPT2LMHeadModel.generate`
with its cache), ratio (ours / peer), cache_speedup (ours with / ours without the cache), our speed with
the default row-major weight layout (ours uses `to_decode_layout`, as the CLI does) and with bf16 weights. Both models get the same weights (copied from the peer), so their greedy tokens must
agree: the script checks it, so the two sides provably do the same work.

    python benchmarks/generate_speed.py [--new-tokens 200] [--no-cache-off] [--no-bf16] [--threads N]
"""
import argparse
import json
import sys
import time

import torch


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def timed(fn, repeats=1):
    "Best wall time of `repeats` calls of `fn` (seconds) and its last result."
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per variant (best is kept)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-cache-off", action="store_true", help="skip the slow run without the cache")
    ap.add_argument("--no-bf16", action="store_true", help="skip the run with bf16 weights")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from nanogpt_plus.generate import generate, to_decode_layout
    from nanogpt_plus.gpt import GPT, GPTConfig

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    peer = GPT2LMHeadModel(GPT2Config()).eval()  # 124M: 12 layers, 12 heads, 768 wide, context 1024
    ours = GPT(GPTConfig.from_name("gpt2")).eval()
    copy_weights(peer, ours)
    ours_row_major = GPT(ours.config).eval()  # the default layout, for comparison
    ours_row_major.load_state_dict(ours.state_dict())
    to_decode_layout(ours)  # what `nanogpt-plus generate` does: column-major weights for one-token steps

    n, T0 = args.new_tokens, args.prompt_tokens
    idx = torch.randint(0, 50257, (1, T0), generator=torch.Generator().manual_seed(1))

    def run_peer(k=n):
        return peer.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=k, min_new_tokens=k,
                             do_sample=False, use_cache=True, pad_token_id=0)

    def run_ours(k=n, model=ours, cache=True):
        return generate(model, idx, k, temperature=0, use_kv_cache=cache)

    with torch.inference_mode():
        run_peer(8), run_ours(8)  # warm-up: first calls allocate and pick kernels
        t_peer, out_peer = timed(run_peer, args.repeats)
        log(f"transformers: {n / t_peer:.2f} tokens/s")
        t_ours, out_ours = timed(run_ours, args.repeats)
        log(f"ours, cache: {n / t_ours:.2f} tokens/s")
        same = torch.equal(out_peer, out_ours)
        result = dict(ours_tokens_per_s=round(n / t_ours, 2), peer_tokens_per_s=round(n / t_peer, 2),
                      ratio=round(t_peer / t_ours, 3))
        t_rm, out_rm = timed(lambda: run_ours(model=ours_row_major), 1)
        result["ours_row_major_tokens_per_s"] = round(n / t_rm, 2)
        same = same and torch.equal(out_rm, out_ours)
        if not args.no_cache_off:
            t_off, out_off = timed(lambda: run_ours(cache=False), 1)
            result["cache_speedup"] = round(t_off / t_ours, 2)
            result["ours_no_cache_tokens_per_s"] = round(n / t_off, 2)
            log(f"ours, no cache: {n / t_off:.2f} tokens/s")
            same = same and torch.equal(out_off, out_ours)
        if not args.no_bf16:
            ours_bf16 = GPT(ours.config).eval()
            ours_bf16.load_state_dict(ours.state_dict())
            to_decode_layout(ours_bf16.to(torch.bfloat16))
            run_ours(8, ours_bf16)
            t_bf16, out_bf16 = timed(lambda: run_ours(model=ours_bf16), args.repeats)
            result["ours_bf16_tokens_per_s"] = round(n / t_bf16, 2)
            result["bf16_same_tokens_frac"] = round((out_bf16 == out_ours)[:, T0:].float().mean().item(), 3)
    fp32_bytes = sum(p.numel() * 4 for p in ours.parameters()) - ours.pos_emb.weight.numel() * 4
    result.update(same_tokens=bool(same), new_tokens=n, prompt_tokens=T0, threads=torch.get_num_threads(),
                  weight_mb_per_token_fp32=round(fp32_bytes / 1e6, 1))
    print(json.dumps(result))


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


if __name__ == "__main__":
    main()
